"""``python -m lightning_bergson <command>``: the dispatcher every command goes through.

This module stays light (no Lightning, no transformers): each command's module is imported
only when that command runs, so ``report`` and ``verify`` start in a fraction of ``fit``'s
time. ``tests/cli/test_commands.py`` runs every command's ``--help`` and one user error each.

User errors (a bad value, a missing file, a damaged or mismatched store) print one line,
``error: ...``, and exit 2; set ``LIGHTNING_BERGSON_TRACEBACK=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["COMMANDS", "Command", "main"]

PROG = "python -m lightning_bergson"
TRACEBACK_ENV = "LIGHTNING_BERGSON_TRACEBACK"


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, the one line ``--help`` shows, and what runs it."""

    name: str
    summary: str
    run: Callable[[list[str]], None]


def _lightning(name: str) -> Callable[[list[str]], None]:
    def run(argv: list[str]) -> None:
        from .lightning import run_lightning

        run_lightning([name, *argv])

    return run


def _attribute(argv: list[str]) -> None:
    from .attribute import attribute_main

    attribute_main(argv)


def _score(argv: list[str]) -> None:
    from .attribute import score_main

    score_main(argv)


def _report(argv: list[str]) -> None:
    from .report import report_main

    report_main(argv)


def _index(argv: list[str]) -> None:
    from .index import index_main

    index_main(argv)


def _lds(argv: list[str]) -> None:
    from .lds import lds_main

    lds_main(argv)


def _verify(argv: list[str]) -> None:
    from .verify import verify_main

    verify_main(argv)


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        Command(
            "fit",
            "train any LightningModule (add GradientCaptureCallback to capture)",
            _lightning("fit"),
        ),
        Command("validate", "LightningCLI validate", _lightning("validate")),
        Command("test", "LightningCLI test", _lightning("test")),
        Command("predict", "LightningCLI predict", _lightning("predict")),
        Command(
            "index", "build a gradient store post hoc from a trained model (bergson build)", _index
        ),
        Command(
            "attribute",
            "print the training examples most (and least) similar to queries",
            _attribute,
        ),
        Command("score", "score queries against every stored row into a score array", _score),
        Command("report", "render a score array (any method) as Markdown and HTML", _report),
        Command("lds", "linear datamodeling score of score arrays on the same retrains", _lds),
        Command("verify", "read every chunk of a store once and report damaged rows", _verify),
    ]
}


def _overview() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROG} <command> [options]",
        "",
        "Training-data attribution for PyTorch Lightning: capture per-example gradients",
        "during fit, then ask which training examples made the model do something.",
        "",
        "commands:",
        *(f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS.values()),
        "",
        f"Run `{PROG} <command> --help` for a command's options.",
        f"User errors print one line and exit 2 ({TRACEBACK_ENV}=1 shows the traceback).",
    ]
    return "\n".join(lines)


def _is_user_error(err: Exception) -> bool:
    """What a user can cause and fix: reported in one line, not a traceback.

    The store's errors are looked up only if the store was imported (if it was not, the
    error cannot be one of them), so ``--help`` of a light command stays light.
    """
    if isinstance(err, argparse.ArgumentError | ValueError | OSError | KeyError):
        return True
    schema = sys.modules.get("lightning_bergson.store.schema")
    store_errors = (schema.GradientStoreWriteError, schema.StoreIntegrityError) if schema else ()
    return isinstance(err, store_errors)


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m lightning_bergson`` and the ``lightning-bergson`` script."""
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in ("-h", "--help"):
        print(_overview())
        return
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"{PROG}: error: unknown command {args[0]!r}; choose from "
              f"{', '.join(COMMANDS)} (see {PROG} --help)", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    try:
        command.run(args[1:])
    except Exception as err:
        if os.environ.get(TRACEBACK_ENV) or not _is_user_error(err):
            raise
        print(f"{PROG} {command.name}: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
