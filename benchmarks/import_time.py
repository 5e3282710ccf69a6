"""Start-up cost of the light commands against ``fit``: import time in fresh interpreters.

Each command's module is imported in a new ``python -c`` process, alternating between the
commands, and the median wall time of each is printed with its ratio to ``fit``'s (whose
module loads Lightning, transformers and the training stack). The interpreter's own start
(``python -c pass``) is measured the same way and printed beside them.

Run: ``python benchmarks/import_time.py [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGETS = {
    "python itself": "pass",
    "report (lightning_bergson.cli.report)": "import lightning_bergson.cli.report",
    "verify (lightning_bergson.cli.verify)": "import lightning_bergson.cli.verify",
    "open a store (lightning_bergson.store)": "import lightning_bergson.store",
    "fit (lightning_bergson.cli.lightning)": "import lightning_bergson.cli.lightning",
}


def _once(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for code in TARGETS.values():  # warm the file cache
        _once(code)
    times: dict[str, list[float]] = {name: [] for name in TARGETS}
    for i in range(args.repeats):
        order = list(TARGETS.items())
        for name, code in order if i % 2 == 0 else order[::-1]:
            times[name].append(_once(code))
    fit = statistics.median(times["fit (lightning_bergson.cli.lightning)"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<42} median {med:6.2f} s   {med / fit:5.2f} x fit")


if __name__ == "__main__":
    main()
