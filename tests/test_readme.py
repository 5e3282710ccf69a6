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
