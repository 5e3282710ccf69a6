"""Scores of any attribution method: the score-array format, reports and LDS.

Independent of the method that made the scores (gradient similarity, EK-FAC influence,
MAGIC metagradients) and light: importing it loads neither Lightning nor transformers.

* :mod:`.format`: the header every array carries (:class:`ScoreHeader`, its
  :class:`ScoreSettings`), the sign conventions and :func:`helpfulness`.
* :mod:`.writer`: :class:`ScoreArrayWriter`, the one creation path (streamed columns,
  crc32c chunks, ``complete`` last), and :func:`write_scores` for scores in memory.
* :mod:`.array`: :class:`ScoreArray`, which reads one back and refuses a damaged or
  incomplete array.
* :mod:`.report`: Markdown, HTML and console reports with score histograms.
* :mod:`.lds`: the linear datamodeling score (subsets, predicted losses, Spearman).

Example:
    >>> import tempfile
    >>> import numpy as np
    >>> path = write_scores(f"{tempfile.mkdtemp()}/s.zarr", np.array([[0.5, -1.0]]), [3, 4],
    ...                     method="magic", convention="metagradient")
    >>> ScoreArray.open(path).helpful().tolist()
    [[-0.5, 1.0]]
"""

from .array import ScoreArray
from .format import (
    CONVENTIONS,
    FORMAT,
    SCHEMA_VERSION,
    Convention,
    ScoreHeader,
    ScoreSettings,
    helpfulness,
)
from .writer import ScoreArrayWriter, write_scores

__all__ = [
    "CONVENTIONS",
    "FORMAT",
    "SCHEMA_VERSION",
    "Convention",
    "ScoreArray",
    "ScoreArrayWriter",
    "ScoreHeader",
    "ScoreSettings",
    "helpfulness",
    "write_scores",
]
