"""CI runs the peer comparisons: the peer libraries import, and a skipped comparison fails."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

PEERS = ("bergson", "kronfluence", "faiss", "scipy")


@pytest.mark.compare
@pytest.mark.parametrize("name", PEERS)
def test_peer_library_imports(name):
    """Under CI=true the compare extra is installed: each peer imports (its skip would fail)."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.importorskip(name)
    importlib.import_module(name)


def test_a_skipped_peer_comparison_fails_under_ci(pytester, monkeypatch):
    """The conftest hook turns the skip of a ``compare``-marked test into a failure in CI."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.compare
        def test_peer():
            pytest.importorskip("no_such_peer_library")

        def test_other():
            pytest.skip("not a peer comparison")
        """
    )
    pytester.makeini("[pytest]\nmarkers =\n    compare: peer comparisons\n")
    monkeypatch.delenv("CI", raising=False)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(skipped=2)
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*peer comparison skipped in CI*compare extra*"])
