"""PEP 562 lazy exports: a package names its public objects without importing them.

``import lightning_bergson.store`` (or the ``report`` command) then loads neither
Lightning nor transformers; the first access of ``lightning_bergson.MagicModule`` imports
:mod:`lightning_bergson.magic` and caches the object in the package's namespace.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str,
    exports: dict[str, str],
    namespace: dict[str, Any],
    moved: dict[str, tuple[str, str]] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` exporting ``name -> ".submodule"``.

    ``moved`` maps old names, still importable but no longer listed in ``__all__``, to
    ``(".module", "new name")``: a class renamed or re-homed keeps its old import path.
    """
    where = {name: (module, name) for name, module in exports.items()}
    where.update(moved or {})

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = where[name]
        value = getattr(importlib.import_module(module, package), attr)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
