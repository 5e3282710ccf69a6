"""EK-FAC: our EkfacModule vs Kronfluence on the same model, data and settings.

Each side runs in its own subprocess (so peak memory is its own): fit all factors
(covariances, eigendecomposition, eigenvalue correction) over the training documents, then
pairwise scores of the queries against them. Same GPT-NeoX, empirical Fisher, summed token
losses, attention-masked tokens, every Linear but the output embedding (with biases),
damping ``0.1 * mean(Lambda)``, float32, no AMP. Prints times, peak memory above the
post-setup baseline (RSS on CPU, ``max_memory_allocated`` on CUDA), our/Kronfluence ratios, the
per-query Spearman between the two score matrices, and EK-FAC's (vs K-FAC's) error to the
exact empirical Fisher block of a toy model.

Run: ``python benchmarks/ekfac_vs_kronfluence.py`` (``--help`` for sizes; ``--device cuda``).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=args.seq_len,
        attn_implementation="eager",
    )
    return GPTNeoXForCausalLM(cfg).eval()


def make_rows(num: int, args: argparse.Namespace, seed: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded documents of uneven length (fixed width, so default collate works)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, args.vocab, (num, args.seq_len), generator=gen)
    lengths = torch.randint(args.seq_len // 2, args.seq_len + 1, (num,), generator=gen)
    mask = (torch.arange(args.seq_len)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return [
        {"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(num)
    ]


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_ours(model, train, queries, args, out: Path) -> tuple[torch.Tensor, float, float]:
    import lightning.pytorch as L
    from torch.utils.data import DataLoader

    from lightning_bergson import EkfacModule

    ek = EkfacModule(model, factors_dir=str(out / "ours"), overwrite=True)
    loader = DataLoader(train, batch_size=args.batch_size)
    trainer = L.Trainer(
        max_epochs=ek.num_phases,
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(ek, loader)
    fit_s = time.perf_counter() - start
    ek.network.to(args.device)
    start = time.perf_counter()
    scores = ek.pairwise_scores(DataLoader(queries, batch_size=len(queries)), loader)
    return scores, fit_s, time.perf_counter() - start


def run_kronfluence(model, train, queries, args, out: Path) -> tuple[torch.Tensor, float, float]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    from lightning_bergson.capture.hooks import DEFAULT_EXCLUDE, select_modules
    from lightning_bergson.models import causal_lm_losses

    tracked = list(select_modules(model, ("*",), DEFAULT_EXCLUDE))  # as EkfacModule's default

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return causal_lm_losses(out.logits, batch["labels"])[0].sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = LMTask()
    wrapped = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer(
        "bench",
        wrapped,
        task,
        cpu=args.device == "cpu",
        output_dir=str(out / "kf"),
        disable_tqdm=True,
    )
    start = time.perf_counter()
    analyzer.fit_all_factors(
        "ekfac",
        train,
        factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
        per_device_batch_size=args.batch_size,
        overwrite_output_dir=True,
    )
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    analyzer.compute_pairwise_scores(
        "scores",
        "ekfac",
        queries,
        train,
        per_device_query_batch_size=len(queries),
        per_device_train_batch_size=args.batch_size,
        score_args=ScoreArguments(damping_factor=None),
        overwrite_output_dir=True,
    )
    score_s = time.perf_counter() - start
    return analyzer.load_pairwise_scores("scores")["all_modules"], fit_s, score_s


def child(args: argparse.Namespace) -> None:
    """One side, in this process; prints a JSON line and saves its scores."""
    torch.set_num_threads(args.threads)
    model = make_model(args).to(args.device)
    train, queries = make_rows(args.num_train, args, 1), make_rows(args.num_query, args, 2)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = _peak_mb(args.device) if args.device == "cuda" else _rss_now_mb()
    run = run_ours if args.side == "ours" else run_kronfluence
    scores, fit_s, score_s = run(model, train, queries, args, args.out)
    save_file({"scores": scores.float().cpu().contiguous()}, str(args.out / f"{args.side}.st"))
    peak = _peak_mb(args.device) - baseline
    print(json.dumps({"side": args.side, "fit_s": fit_s, "score_s": score_s, "peak_mb": peak}))


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def toy_approximation_error() -> str:
    """EK-FAC and K-FAC vs the exact empirical Fisher of a 2-layer MLP token classifier."""
    from torch.func import functional_call, grad, vmap

    from lightning_bergson.ekfac import factors as F

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 5))
    net = net.double()
    x, y = torch.randn(256, 3, 3, dtype=torch.float64), torch.randint(0, 5, (256, 3))

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(
            functional_call(net, p, (xi,)), yi, reduction="sum"
        )

    params = {k: v.detach() for k, v in net.named_parameters()}
    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    acts = {"0": x, "2": torch.tanh(net[0](x)).detach()}
    lines = []
    for name in ("0", "2"):
        g = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"][..., None]], -1)  # (N, O, I)
        a = F.with_bias_column(acts[name]).reshape(-1, g.shape[2])  # (N*T, I+1)
        g_tok = _token_output_grads(net, name, x, y)  # (N*T, O)
        ev_a, q_a = F.eigendecompose(F.covariance_sum(a) / len(a), module=name, factor="A")
        ev_s, q_s = F.eigendecompose(F.covariance_sum(g_tok) / len(g_tok), module=name, factor="S")
        lam = F.eigenvalue_correction_sum(g, q_s, q_a) / len(g)
        flat = g.reshape(len(g), -1)
        fisher = flat.T @ flat / len(g)
        u = torch.kron(q_s, q_a)
        dense_ek = u @ torch.diag(lam.reshape(-1)) @ u.T
        dense_k = u @ torch.diag(F.kfac_eigenvalues(ev_s, ev_a).reshape(-1)) @ u.T
        err_ek = float((dense_ek - fisher).norm() / fisher.norm())
        err_k = float((dense_k - fisher).norm() / fisher.norm())
        damping = 0.1 * float(lam.mean())
        v = g[:8].reshape(8, -1)
        eye = torch.eye(len(fisher), dtype=torch.float64)
        exact = torch.linalg.solve(fisher + damping * eye, v.T).T
        ek = F.ekfac_ihvp(g[:8], q_s, q_a, lam, damping).reshape(8, -1)
        kf = F.kfac_ihvp(g[:8], q_s, ev_s, q_a, ev_a, damping).reshape(8, -1)
        lines.append(
            f"  layer {name}: block rel. error EK-FAC {err_ek:.3f} vs K-FAC {err_k:.3f}; "
            f"iHVP rel. error (damping 0.1*mean Lambda) EK-FAC "
            f"{float((ek - exact).norm() / exact.norm()):.3f} vs K-FAC "
            f"{float((kf - exact).norm() / exact.norm()):.3f}"
        )
    return "\n".join(lines)


def _token_output_grads(net, name, x, y) -> torch.Tensor:
    """Per-token gradients of the summed loss w.r.t. layer ``name``'s output, ``[N*T, O]``."""
    outs = {}
    handle = net[int(name)].register_forward_hook(lambda m, i, o: outs.setdefault("o", o))
    logits = net(x)
    handle.remove()
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, outs["o"])
    return g.reshape(-1, g.shape[-1])


def parent(args: argparse.Namespace) -> None:
    out = Path(tempfile.mkdtemp(prefix="ekfac_bench_"))
    results = {}
    for side in ("ours", "kronfluence"):
        cmd = [sys.executable, __file__, "--side", side, "--out", str(out)]
        for key in (
            "num_train",
            "num_query",
            "seq_len",
            "batch_size",
            "hidden",
            "layers",
            "heads",
            "vocab",
            "device",
            "threads",
        ):
            cmd += [f"--{key}", str(getattr(args, key))]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, kf = results["ours"], results["kronfluence"]
    print(
        f"EK-FAC on {args.device}: GPT-NeoX hidden {args.hidden} x {args.layers} layers, "
        f"{args.num_train} train / {args.num_query} query docs of <= {args.seq_len} tokens"
    )
    print(f"{'':12}{'fit s':>10}{'score s':>10}{'peak MB':>10}")
    for side, r in results.items():
        print(f"{side:12}{r['fit_s']:10.2f}{r['score_s']:10.2f}{r['peak_mb']:10.1f}")
    print(
        f"ratio ours/kronfluence: fit {ours['fit_s'] / kf['fit_s']:.2f}, "
        f"score {ours['score_s'] / kf['score_s']:.2f}, "
        f"peak memory {ours['peak_mb'] / max(kf['peak_mb'], 1e-9):.2f}"
    )
    a, b = (
        load_file(str(out / "ours.st"))["scores"],
        load_file(str(out / "kronfluence.st"))["scores"],
    )
    rhos = [_spearman(a[q], b[q]) for q in range(len(a))]
    print(
        f"per-query Spearman ours vs kronfluence: min {min(rhos):.6f}, mean "
        f"{sum(rhos) / len(rhos):.6f}; relative difference {float((a - b).norm() / b.norm()):.2e}"
    )
    print("EK-FAC approximation error to the exact empirical Fisher block (toy MLP):")
    print(toy_approximation_error())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num_train", type=int, default=256)
    p.add_argument("--num_query", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--side", choices=["ours", "kronfluence"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    child(args) if args.side else parent(args)


if __name__ == "__main__":
    main()
