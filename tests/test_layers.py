"""Imports go down the layers of ARCHITECTURE.md, and the pure-torch layers stay light.

The package's own modules are read with ``ast`` (no import runs); the light layers are
imported in a fresh interpreter that must not load Lightning or transformers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_bergson"

LAYERS = [  # bottom up: a module imports from its own layer or the ones below
    {"_lazy", "batch", "corpus", "losses", "networks"},  # contracts, networks
    {"capture", "store", "scores", "analysis"},  # pure torch/numpy: rows, disk, scores, studies
    {"loader", "strategy", "data", "models", "training_step", "capture_store",
     "callbacks", "index"},  # the Lightning glue of data and capture
    {"attribution", "ekfac", "magic"},  # the methods
    {"cli"},  # commands
    {"__init__", "__main__"},  # the package's lazy surface
]  # fmt: skip
LIGHT = [
    "capture",
    "store",
    "scores",
    "analysis",
    "batch",
    "losses",
    "networks",
]  # no Lightning, no transformers


def _layer(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def _unit(path: Path) -> str:
    """The layer unit of a module: its top-level package or module name."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_units(path: Path) -> set[str]:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts[:-1])  # the package the module is in (for an __init__: itself)
    units = set()
    tree = ast.parse(path.read_text())
    typing_only = {  # `if TYPE_CHECKING:` imports are annotations, not dependencies
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING"
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level + 1] if node.level else []
            mod = [*base, *(node.module.split(".") if node.module else [])]
            if mod[:1] == ["lightning_bergson"]:
                names = [mod[1]] if len(mod) > 1 else [a.name for a in node.names]
                units |= set(names)
        elif isinstance(node, ast.Import):
            units |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lightning_")}
    return units


def test_every_module_has_a_layer():
    units = {_unit(p) for p in PACKAGE.rglob("*.py")}
    assert not [u for u in units if not any(u in layer for layer in LAYERS)]


def test_imports_go_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        for target in _imported_units(path) - {unit}:
            if _layer(target) > _layer(unit):
                upward.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert upward == []


def test_the_light_layers_load_neither_lightning_nor_transformers():
    code = (
        "import importlib, pkgutil, sys\n"
        f"for name in {LIGHT!r}:\n"
        "    mod = importlib.import_module('lightning_bergson.' + name)\n"
        "    for info in pkgutil.iter_modules(getattr(mod, '__path__', [])):\n"
        "        importlib.import_module(f'{mod.__name__}.{info.name}')\n"
        "print([m for m in ('lightning', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True, cwd=ROOT)  # fmt: skip
    assert out.stdout.strip() == "[]"


REGISTERED = """
import sys
{imports}
import lightning.pytorch as L
trainer = L.Trainer(strategy="bergson", logger=False, enable_progress_bar=False)
print(type(trainer.strategy).__name__)
"""


@pytest.mark.parametrize(
    "imports",
    [
        "import lightning.pytorch; import lightning_bergson",  # Lightning first, bare package
        "import lightning_bergson; from lightning_bergson import CausalLMModule",
        "import lightning_bergson; from lightning_bergson import TextDataModule",
        "from lightning_bergson import GradientCaptureCallback",
    ],
)
def test_strategy_names_are_registered_without_importing_the_strategy_module(imports):
    """README's Trainer(strategy="bergson") works after the imports a user writes anyway."""
    code = REGISTERED.format(imports=imports)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "BergsonSingleDeviceStrategy"
