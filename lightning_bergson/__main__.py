"""``python -m lightning_bergson <subcommand> ...``; see :mod:`lightning_bergson.cli`."""

from .cli import main

if __name__ == "__main__":
    main()
