"""Command line: ``python -m lightning_bergson <command>`` (or ``lightning-bergson``).

* :mod:`.main`: the dispatcher and the table of commands (``COMMANDS``), light to import.
* :mod:`.lightning`: ``fit``/``validate``/``test``/``predict`` (``BergsonCLI``).
* :mod:`.index`: ``index``, Bergson's ``build`` flags over ``fit`` with ``IndexModule``.
* :mod:`.attribute`: ``attribute`` and ``score`` with their shared option groups.
* :mod:`.report`, :mod:`.lds`, :mod:`.verify`: the commands of the same names.

No module outside this package imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .main import COMMANDS, Command, main

_EXPORTS = {"BergsonCLI": ".lightning", "cli_kwargs": ".lightning", "run_lightning": ".lightning"}
__all__ = ["COMMANDS", "BergsonCLI", "Command", "cli_kwargs", "main", "run_lightning"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from .lightning import BergsonCLI, cli_kwargs, run_lightning
