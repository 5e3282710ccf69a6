"""The analysis tools load neither Lightning nor transformers."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import lightning_bergson.analysis as a
for name in a.__all__:
    getattr(a, name)
heavy = sorted(m for m in ("lightning", "lightning.pytorch", "transformers") if m in sys.modules)
assert not heavy, heavy
"""


def test_analysis_is_light():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
