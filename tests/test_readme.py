"""The README's commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    return [line.strip() for line in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    readme = _commands((ROOT / "README.md").read_text())
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = next(c for c in readme if "pytest" in c)
    assert test_command in [line.strip() for line in ci]


def test_readme_main_job_uses_a_shipped_config():
    main = next(c for c in _commands((ROOT / "README.md").read_text()) if "fit --config" in c)
    config = re.search(r"--config (\S+)", main).group(1)
    assert (ROOT / config).is_file()


def test_readme_sections_and_paragraphs_appear_once():
    """An edit that pastes a block twice leaves two versions of every figure in it."""
    text = (ROOT / "README.md").read_text()
    headings = re.findall(r"^#+ .*$", text, re.M)
    assert len(headings) == len(set(headings)), sorted(h for h in headings if headings.count(h) > 1)
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200]
    repeated = {p[:80] for p in paragraphs if paragraphs.count(p) > 1}
    assert not repeated, repeated
