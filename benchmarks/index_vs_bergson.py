"""Post-hoc index speed: our ``index`` vs ``bergson build``, whole processes, alternated.

Two cases, both random-init GPT-NeoX models written with ``save_pretrained`` (with a BPE
tokenizer trained here) and ``save_to_disk`` corpora of biographies, so nothing is
downloaded:

* ``tiny``: hidden 64, 2 layers, 1000 documents;
* ``pythia70m``: Pythia-70m's shape (hidden 512, 6 layers, 8 heads, vocabulary 50304),
  300 documents.

Each repeat runs, in turn, ``python -m lightning_bergson index`` and ``bergson build``
(projection 16, ``--token_batch_size``, float32 weights) as separate processes, and the
floor: forward plus an activation-only backward of the same batches, no hooks (a frozen
network whose lowest tracked layers' outputs are gradient leaves, the least work any
index can do). Printed per case: the median wall time, gradient-loop time (each tool's
loop around forward+backward+capture, measured inside the process), tokens/s and peak RSS,
and their ratios ours / Bergson (targets: wall and loop <= 1.00, RSS <= 1.00) and
loop / floor (target <= 1.10).

Run: ``python benchmarks/index_vs_bergson.py`` (``--help``). Bergson is an optional extra
(``pip install bergson``, then ``pip uninstall -y torchvision torchaudio bitsandbytes``);
``--bergson-python`` names an interpreter that has it. Without it only ours and the floor
are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "vocab": None, "docs": 1000},
    "pythia70m": {"hidden": 512, "layers": 6, "heads": 8, "vocab": 50304, "docs": 300},
}
LOOP = re.compile(r"gradient loop ([0-9.]+) s, (\d+) rows, (\d+) tokens")


def prepare(case: str, root: Path) -> tuple[Path, Path, int]:
    """``(model dir, dataset dir, tokens)``: a random-init model and a biography corpus."""
    import datasets
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from lightning_bergson.corpus import make_biographies
    from lightning_bergson.data import train_tokenizer

    spec = CASES[case]
    bios = list(make_biographies(max(250, spec["docs"] // 2), seed=0).texts)
    gen = torch.Generator().manual_seed(0)
    docs = []
    for i in range(spec["docs"]):  # 1 to 16 biographies per document: varied lengths
        k = int(torch.randint(1, 17, (1,), generator=gen))
        docs.append(" ".join(bios[(i + j) % len(bios)] for j in range(k)))
    tokenizer = train_tokenizer(bios, vocab_size=2048)
    vocab = spec["vocab"] or len(tokenizer)
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=spec["hidden"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        intermediate_size=4 * spec["hidden"],
        max_position_embeddings=2048,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model_dir, data_dir = root / f"{case}-model", root / f"{case}-data"
    GPTNeoXForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(data_dir))
    tokens = sum(len(ids) for ids in tokenizer(docs)["input_ids"])
    return model_dir, data_dir, tokens


def _measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run ``cmd``; ``(wall s, peak RSS MiB, stderr + stdout)``."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    # RUSAGE_CHILDREN's peak only grows; each command runs in a fresh wrapper so we
    # read the peak from inside it instead (printed by the wrapper on its last line).
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{text[-3000:]}")
    rss = float(re.findall(r"PEAK_RSS_MIB ([0-9.]+)", text)[-1])
    return wall, rss, text


WRAPPER = """
import resource, runpy, sys, time
kind, argv = sys.argv[1], sys.argv[2:]
if kind == "bergson":
    import bergson.build as build
    inner = build.collect_gradients
    def timed(**kwargs):
        start = time.perf_counter()
        inner(**kwargs)
        data, batches = kwargs["data"], kwargs["batches"]
        rows = sum(len(b) for b in batches)
        lengths = data["length"][:]
        tokens = sum(int(lengths[i]) for b in batches for i in b)
        print(f"gradient loop {time.perf_counter() - start:.3f} s, {rows} rows, {tokens} tokens",
              flush=True)
    build.collect_gradients = timed
    sys.argv = ["bergson", *argv]
    runpy.run_module("bergson", run_name="__main__")
elif kind == "ours":
    sys.argv = ["lightning_bergson", *argv]
    runpy.run_module("lightning_bergson", run_name="__main__")
else:
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
print("PEAK_RSS_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)
"""


def floor_main(model_dir: str, data_dir: str, token_batch_size: int) -> None:
    """The floor: the same token-budget batches, forward + activation-only backward, no hooks."""
    import torch
    from transformers import AutoModelForCausalLM

    from lightning_bergson.capture import DEFAULT_EXCLUDE, select_modules
    from lightning_bergson.data import TextDataModule
    from lightning_bergson.losses import causal_lm_losses

    net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    modules = select_modules(net, None, DEFAULT_EXCLUDE)
    net.requires_grad_(False)

    def leaf(module, inputs, output):
        if not output.requires_grad:
            return output.detach().requires_grad_().clone()
        return None

    for mod in modules.values():
        mod.register_forward_hook(leaf)
    dm = TextDataModule(
        data_dir,
        tokenizer=model_dir,
        max_length=None,
        append_eos=False,
        token_batch_size=token_batch_size,
        shuffle=False,
    )
    dm.setup("fit")
    rows = tokens = 0
    start = time.perf_counter()
    for batch in dm.train_dataloader():
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        causal_lm_losses(logits, batch["labels"])[0].sum().backward()
        rows += len(batch["input_ids"])
        tokens += int(batch["attention_mask"].sum())
    print(f"gradient loop {time.perf_counter() - start:.3f} s, {rows} rows, {tokens} tokens")


def commands(args, model_dir: Path, data_dir: Path, out: Path) -> dict[str, list[str]]:
    wrapper = out / "wrapper.py"
    wrapper.write_text(WRAPPER)
    ours = [
        sys.executable, str(wrapper), "ours", "index",
        "--model", str(model_dir), "--dataset", str(data_dir),
        "--store", str(out / "ours.zarr"), "--overwrite",
        "--projection_dim", str(args.projection_dim),
        "--token_batch_size", str(args.token_batch_size),
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    floor = [
        sys.executable, str(wrapper), "floor", __file__, "--floor",
        str(model_dir), str(data_dir), str(args.token_batch_size),
    ]  # fmt: skip
    cmds = {"ours": ours, "floor": floor}
    if args.bergson_python:
        cmds["bergson"] = [
            args.bergson_python, str(wrapper), "bergson", "build", str(out / "bergson"),
            "--model", str(model_dir), "--dataset", str(data_dir),
            "--projection_dim", str(args.projection_dim),
            "--token_batch_size", str(args.token_batch_size),
            "--precision", "fp32", "--overwrite",
        ]  # fmt: skip
    return cmds


def has_bergson(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import bergson"], capture_output=True)
    return probe.returncode == 0


def run_case(args, case: str, root: Path) -> dict:
    model_dir, data_dir, tokens = prepare(case, root)
    out = root / f"{case}-runs"
    out.mkdir()
    cmds = commands(args, model_dir, data_dir, out)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, dict[str, list[float]]] = {
        k: {"wall": [], "loop": [], "rss": []} for k in cmds
    }
    for rep in range(args.repeats + 1):  # the first round warms caches and is dropped
        for name, cmd in cmds.items():
            if name == "bergson":
                shutil.rmtree(out / "bergson", ignore_errors=True)
            wall, rss, text = _measure(cmd, env)
            loop = LOOP.findall(text)
            if not loop:
                raise RuntimeError(
                    f"{name}: no 'gradient loop' line in its output:\n{text[-2000:]}"
                )
            if rep:
                results[name]["wall"].append(wall)
                results[name]["loop"].append(float(loop[-1][0]))
                results[name]["rss"].append(rss)
    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in results.items()}
    return {"case": case, "tokens": tokens, "median": med, "runs": results}


def report(res: dict) -> None:
    med, tokens = res["median"], res["tokens"]
    print(f"\n== {res['case']}: {CASES[res['case']]}, {tokens} tokens ==")
    print(f"{'':10}{'wall s':>9}{'loop s':>9}{'tok/s':>10}{'RSS MiB':>10}")
    for name, m in med.items():
        print(
            f"{name:10}{m['wall']:9.2f}{m['loop']:9.2f}{tokens / m['loop']:10.0f}{m['rss']:10.0f}"
        )
    ours = med["ours"]
    print(f"loop / floor          {ours['loop'] / med['floor']['loop']:.3f}  (target <= 1.10)")
    if "bergson" in med:
        b = med["bergson"]
        print(f"wall, ours / Bergson  {ours['wall'] / b['wall']:.3f}  (target <= 1.00)")
        print(f"loop, ours / Bergson  {ours['loop'] / b['loop']:.3f}  (target <= 1.00)")
        print(f"RSS,  ours / Bergson  {ours['rss'] / b['rss']:.3f}  (target <= 1.00)")
    else:
        print("Bergson not installed in --bergson-python: ours and the floor only")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=3, help="alternated rounds (median)")
    parser.add_argument("--projection-dim", type=int, default=16)
    parser.add_argument("--token-batch-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--bergson-python", default=sys.executable, help="interpreter with bergson installed"
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny case, one round: checks the script runs"
    )
    parser.add_argument("--floor", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        floor_main(args.floor[0], args.floor[1], int(args.floor[2]))
        return
    if args.smoke:  # hidden 16, 1 layer, 24 documents; not a measurement
        CASES["smoke"] = {"hidden": 16, "layers": 1, "heads": 2, "vocab": None, "docs": 24}
        args.cases, args.repeats = ["smoke"], 1
    if args.bergson_python and not has_bergson(args.bergson_python):
        args.bergson_python = None
    root = Path(tempfile.mkdtemp())
    try:
        results = [run_case(args, case, root) for case in args.cases]
        for res in results:
            report(res)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
