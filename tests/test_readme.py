"""The README's commands are the ones CI and users run."""

from __future__ import annotations

import ast
import builtins
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


# ------------------------------------------------------------------ the Python examples

RUN = ("In Python", "Attribution: asking the store")  # run in order, in one namespace
FRAGMENTS = {  # need names of the reader's own run (a checkpoint, loaders, a model)
    "EK-FAC influence functions": {"L", "ckpt_path", "train_loader", "query_loader"},
    "MAGIC metagradients and LDS": {
        "L",
        "MagicModule",
        "model",
        "train_set",
        "train_loader",
        "query_batch",
    },
}
SMALL = {  # the only edits: tiny sizes so the run takes seconds
    'TextDataModule("bios", batch_size=32)': 'TextDataModule("bios", batch_size=32, num_people=4)',
}


def _python_blocks(text: str) -> list[tuple[str, str]]:
    """``(section heading, code)`` of every ```python block, in order."""
    out, heading = [], ""
    for part in re.split(r"(^#+ [^\n]*$|^```python\n.*?^```)", text, flags=re.M | re.S):
        if part.startswith("#"):
            heading = part.lstrip("#").strip()
        elif part.startswith("```python"):
            out.append((heading, part[len("```python\n") : -3]))
    return out


def _only_definitions(code: str) -> bool:
    body = ast.parse(code).body
    return all(isinstance(s, ast.Import | ast.ImportFrom | ast.FunctionDef) for s in body)


def _free_names(code: str) -> set[str]:
    """Names a block reads at top level but never binds (nor imports, nor gets from builtins)."""
    tree = ast.parse(code)
    bound = {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return used - bound - set(dir(builtins))


def test_every_python_block_is_run_defined_or_a_listed_fragment():
    blocks = _python_blocks((ROOT / "README.md").read_text())
    seen = {"run": [], "fragment": {}}
    for heading, code in blocks:
        if heading in RUN:
            seen["run"].append(heading)
        elif _only_definitions(code):
            exec(compile(code, f"README.md ({heading})", "exec"), {})  # imports resolve
        else:
            seen["fragment"][heading] = _free_names(code)
    assert seen["run"] == list(RUN)
    assert seen["fragment"] == FRAGMENTS  # a new block: run it here, or list what it needs


@pytest.mark.slow
def test_python_examples_run_unchanged(tmp_path):
    """The "In Python" block (tiny corpus) and then the attribution block, as a user would."""
    blocks = dict(_python_blocks((ROOT / "README.md").read_text()))
    code = "\n".join(blocks[h] for h in RUN)
    for old, new in SMALL.items():
        assert code.count(old) == 1, f"README no longer has {old!r}; update SMALL"
        code = code.replace(old, new)
    check = (
        "\nimport torch\n"
        "assert res.indices.shape == (1, 5) and scores.shape == (1, len(store))\n"
        "assert torch.allclose(result.queries, q, rtol=1e-4, atol=1e-6), 'trace != rows'\n"
        "assert torch.equal(result.indices, res.indices)\n"
        "print('README OK')\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("README OK")
