"""Test-wide settings (no network, quiet Lightning, a private tokenizer cache), the shared
fixtures (a tiny LM, a batch, random stores), and the rule that CI runs the peer comparisons.

Plain helpers (oracles, recipes) live in ``oracles.py``, ``recipes.py``,
``attribution_fixtures.py`` and ``magic_oracles.py`` beside this file (on ``pythonpath``).
"""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

pytest_plugins = ["pytester"]  # tests/test_peers.py runs the CI rule below in a sandbox


@pytest.fixture(scope="module")
def tiny_lm():
    """The 2-layer GPT-NeoX of ``oracles.tiny_gpt_neox()``, shared by a module's tests: read
    it, or ``copy.deepcopy`` it before training."""
    from oracles import tiny_gpt_neox

    return tiny_gpt_neox()


@pytest.fixture(scope="module")
def lm_data():
    """``oracles.lm_batch()``: 6 right-padded examples of uneven length, ids 100..105."""
    from oracles import lm_batch

    return lm_batch()


@pytest.fixture
def make_store(tmp_path):
    """``attribution_fixtures.random_store`` in this test's directory: ``make_store(**kw)``
    returns ``(path, rows [N, D] float64 as stored, example_ids [N])``."""
    from attribution_fixtures import random_store

    def make(name: str = "g.zarr", **kwargs):
        return random_store(tmp_path / name, **kwargs)

    return make


# ---------------------------------------------------------------- peer comparisons in CI


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ``CI=true`` a skipped peer comparison (``@pytest.mark.compare``) fails: CI installs
    the ``compare`` extra, so a skip there means the comparison silently stopped running."""
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped and item.get_closest_marker("compare") is not None:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"peer comparison skipped in CI ({reason}); CI must install the compare extra "
            '(pip install -e ".[dev,compare]", see .ci/run)'
        )
