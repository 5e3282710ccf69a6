"""The command line's surface: every command listed and documented, one-line user errors,
no warnings on a normal call, light imports, and the CLI imported by nothing below it."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import lightning_bergson
from lightning_bergson.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lightning_bergson"
PROG = "python -m lightning_bergson"


def test_overview_lists_every_command_with_its_summary():
    out = subprocess.run([sys.executable, "-m", "lightning_bergson", "--help"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stderr == ""
    for name in ("fit", "index", "attribute", "score", "report", "lds", "verify"):
        line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith(name + " "))
        assert COMMANDS[name].summary in line
    assert out.stdout.startswith(f"usage: {PROG} <command>")


def test_unknown_command_is_one_line_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["atribute"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'atribute'" in err[0] and "attribute" in err[0]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_help_has_its_prog_and_no_warning(name, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
    out = capsys.readouterr()
    assert exit_.value.code in (0, None)
    assert f"usage: {PROG}" in out.out and "__main__.py" not in out.out
    assert "Traceback" not in out.err
    assert [str(w.message) for w in caught] == []


USER_ERRORS = {
    "fit": (["fit", "--trainer.max_epochs=abc"], "trainer.max_epochs"),
    "validate": (["validate", "--trainer.max_epochs=abc"], "trainer.max_epochs"),
    "test": (["test", "--trainer.max_epochs=abc"], "trainer.max_epochs"),
    "predict": (["predict", "--trainer.max_epochs=abc"], "trainer.max_epochs"),
    "index": (["index", "--model", "./no/such/model"], "--model=./no/such/model: no such"),
    "attribute": (
        ["attribute", "--store", "s.zarr", "--model", "./no/such/run"],
        "model=./no/such/run: no such",
    ),
    "score": (
        ["score", "--store", "s", "--model", "m", "--out", "o", "--unit_norm", "maybe"],
        'Parser key "unit_norm"',
    ),
    "report": (["report", "--scores", "./no/such.zarr", "--out", "r"], "no score array at"),
    "lds": (["lds", "--scores", "./no/such.zarr", "--fit_config", "c.yaml"], "no score array"),
    "verify": (["verify", "./no/such.zarr"], "No gradient store at no/such.zarr"),
}


def test_every_command_has_a_user_error_case():
    assert set(USER_ERRORS) == set(COMMANDS)


@pytest.mark.parametrize("name", list(USER_ERRORS))
def test_user_errors_are_one_line_and_exit_2(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, expected = USER_ERRORS[name]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"{PROG} {name}: error: ") and expected in err[0], err[0]
    assert not (tmp_path / "r").exists()


def test_attribute_and_score_share_their_options_and_defaults():
    from lightning_bergson.cli.attribute import _parser, attribute, score

    own = {"out", "top_k", "bottom", "report", "tokens", "span_tokens", "query_reduce"}
    own |= {"overwrite", "config"}
    own |= {"devices", "num_nodes", "strategy", "accelerator"}  # score's Lightning loop
    parsed = []
    for command, extra in ((attribute, []), (score, ["--out", "o"])):
        args = ["--store", "s", "--model", "m", *extra, "--fact", "all"]
        ns = _parser(command, "").parse_args(args).as_dict()
        parsed.append({k: v for k, v in ns.items() if k not in own})
    assert parsed[0] == parsed[1]
    assert parsed[0]["fact"] == "all" and parsed[0]["example_reduce"] == "mean"


def test_light_imports_leave_out_lightning_and_transformers():
    code = (
        "import sys\n"
        "import lightning_bergson.store, lightning_bergson.scores, lightning_bergson.cli\n"
        "import lightning_bergson.cli.report, lightning_bergson.cli.verify\n"
        "heavy = [m for m in ('lightning', 'transformers') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_lazy_exports_are_all_listed_and_resolve():
    from lightning_bergson import attribution

    for package in (lightning_bergson, attribution):
        assert sorted(package.__all__) == sorted(package._EXPORTS)
        for name in package.__all__:
            assert getattr(package, name).__name__ == name
        assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        _ = lightning_bergson.Nope


def _imports(path: Path) -> list[str]:
    """Absolute names of the package modules ``path`` imports."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts[:-1])  # the package the module is in (for an __init__: itself)
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            names += [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_no_module_below_the_cli_imports_it():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        bad = [n for n in _imports(path) if n == "lightning_bergson.cli" or
               n.startswith("lightning_bergson.cli.")]  # fmt: skip
        offenders += [f"{rel}: {b}" for b in bad]
    assert offenders == []
