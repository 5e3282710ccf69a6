"""Mutation testing of the core math and glue with mutmut: the kill rate per module.

For each module below, mutmut (``pip install -e ".[mutation]"``) rewrites one operator,
constant or argument at a time and runs that module's targeted tests; a mutant the tests
still pass is a *survivor*: a hole in the tests, or an equivalent change (the reasons are
kept in ``benchmarks/results/mutation.md``). Each module runs in its own copy of the
checkout (tracked and untracked, not ignored, files), so the working tree is never touched.

Slow (minutes per module on 2 cores) and not part of CI:

    python benchmarks/mutation.py                       # every module
    python benchmarks/mutation.py scaling projection    # some
    python benchmarks/mutation.py scaling --show        # and each survivor's diff
    python benchmarks/mutation.py hooks --mutants @survivors.txt   # only these (names or
                                                        # globs; @FILE: one per line)

``--mutants`` reruns named mutants (e.g. an earlier run's survivors, after new tests) and
counts only them.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> (file mutated, targeted pytest selection)
MODULES: dict[str, tuple[str, list[str]]] = {
    "scaling": (
        "lightning_bergson/capture/scaling.py",
        ["tests/capture/test_batch_contract.py", "-k", "scales or logit or tolerance"],
    ),
    "projection": (
        "lightning_bergson/capture/projection.py",
        ["tests/capture/test_collector.py", "-k", "projection or projected or seed"],
    ),
    "normalizers": (
        "lightning_bergson/capture/normalizers.py",
        [
            "tests/capture/test_optimizer_state.py",
            "tests/capture/test_collector.py",
            "-k",
            "normaliz or adafactor or adam or closed_form or conversions",
        ],
    ),
    "optimizer_state": (
        "lightning_bergson/capture/optimizer_state.py",
        ["tests/capture/test_optimizer_state.py"],
    ),
    "hooks": (
        "lightning_bergson/capture/hooks.py",
        ["tests/capture/test_collector.py", "tests/capture/test_modules.py"],
    ),
    "store_reader": (
        "lightning_bergson/store/reader.py",
        [
            "tests/store/test_store.py",
            "tests/store/test_reader_contract.py",
            # mutmut's trampolines add stack frames, so the warning-location test cannot
            # pass under it (the baseline would fail and no mutant would run)
            "-k",
            "not callers_line",
        ],
    ),
    "store_writer": ("lightning_bergson/store/writer.py", ["tests/store/test_store.py"]),
    "preconditioners": (
        "lightning_bergson/attribution/preconditioners.py",
        [
            "tests/attribution/test_preconditioner.py",
            "tests/attribution/test_preconditioner_contract.py",
        ],
    ),
    "ekfac_factors": (
        "lightning_bergson/ekfac/factors.py",
        # the pure math against explicit sums and dense solves, and the toy model's closed
        # forms (the tiny-LM fits of the other tests take ~30 s a run)
        ["tests/ekfac/test_factors.py", "-k", "factor_math or closed_forms"],
    ),
    "magic_reverse": (
        "lightning_bergson/magic/reverse.py",
        ["tests/magic/test_reverse_oracle.py"],
    ),
}


def copy_checkout(dest: Path) -> None:
    """The files git tracks, and untracked ones it does not ignore, copied to ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def configure(work: Path, target: str, selection: list[str]) -> None:
    """Append mutmut's settings for one module to the copy's ``pyproject.toml``."""
    lines = [
        "",
        "[tool.mutmut]",
        'source_paths = ["lightning_bergson"]',
        f"only_mutate = {json.dumps([target])}",
        f"pytest_add_cli_args_test_selection = {json.dumps(selection)}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]',
        'process_isolation = "forkserver"',  # torch is not fork-safe after it ran
    ]
    with (work / "pyproject.toml").open("a") as f:
        f.write("\n".join(lines) + "\n")


def mutmut(work: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "mutmut", *args], cwd=work, capture_output=True, text=True
    )
    if check and proc.returncode:
        raise RuntimeError(f"mutmut {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr}")
    return proc.stdout


def run_module(name: str, jobs: int, show: bool, mutants: list[str] | None = None) -> dict:
    """Mutate one module in a fresh copy; its counts, kill rate and survivors.

    With ``mutants`` (names or globs), only those are run and counted.
    """
    target, selection = MODULES[name]
    with tempfile.TemporaryDirectory(prefix=f"mutation_{name}_") as tmp:
        work = Path(tmp)
        copy_checkout(work)
        configure(work, target, selection)
        mutmut(work, "run", "--max-children", str(jobs), *(mutants or []), check=False)
        mutmut(work, "export-cicd-stats")
        stats = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
        results = mutmut(work, "results", "--all", "true").splitlines()
        if mutants:  # count only the named ones, from their results
            results = [ln for ln in results if _named(ln.split(":")[0].strip(), mutants)]
            status = [ln.rsplit(":", 1)[1].strip() for ln in results]
            stats = {k: status.count(v) for k, v in _STATUS.items()} | {"total": len(results)}
        survivors = [ln.split(":")[0].strip() for ln in results if ln.endswith(": survived")]
        untested = [ln.split(":")[0].strip() for ln in results if ln.endswith(": no tests")]
        diffs = {m: _diff(mutmut(work, "show", m)) for m in survivors + untested} if show else {}
    killed = stats["killed"] + stats["timeout"] + stats["segfault"]
    return {
        "module": name,
        "file": target,
        "total": stats["total"],
        "killed": killed,
        "survived": stats["survived"],
        "no_tests": stats["no_tests"],
        "kill_rate": killed / max(stats["total"], 1),
        "survivors": survivors,
        "untested": untested,
        "diffs": diffs,
    }


_STATUS = {
    "killed": "killed",
    "survived": "survived",
    "no_tests": "no tests",
    "timeout": "timeout",
    "segfault": "segfault",
}


def _named(mutant: str, patterns: list[str]) -> bool:
    return any(mutant == p or fnmatch.fnmatchcase(mutant, p) for p in patterns)


def _read_mutants(values: list[str]) -> list[str]:
    """Names and globs, ``@FILE`` expanded to its non-empty lines."""
    names = []
    for v in values:
        if v.startswith("@"):
            names += [ln.strip() for ln in Path(v[1:]).read_text().splitlines() if ln.strip()]
        else:
            names.append(v)
    return names


def _diff(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if ln.startswith(("-  ", "+  ", "- ", "+ ")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("modules", nargs="*", help=f"some of {', '.join(MODULES)} (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    p.add_argument("--show", action="store_true", help="print each survivor's diff")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--mutants",
        nargs="+",
        help="only these mutants (names or globs, @FILE for one per line); one module only",
    )
    args = p.parse_args()
    mutants = _read_mutants(args.mutants) if args.mutants else None
    if mutants and len(args.modules) != 1:
        p.error("--mutants needs exactly one module")
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        p.error(f"unknown modules {unknown}; choose from {', '.join(MODULES)}")
    rows = []
    for name in args.modules or list(MODULES):
        res = run_module(name, args.jobs, args.show, mutants)
        rows.append(res)
        print(
            f"{name:16} {res['total']:4d} mutants  killed {res['killed']:4d}  survived "
            f"{res['survived']:3d}  no tests {res['no_tests']:3d}  "
            f"kill rate {res['kill_rate']:.1%}",
            flush=True,
        )
        for mutant, diff in res["diffs"].items():
            print(f"  {mutant}\n" + "\n".join(f"    {ln}" for ln in diff.splitlines()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
