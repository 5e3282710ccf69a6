"""The floor of an exact MAGIC reverse step: one Hessian-vector product against a plain step.

A reverse step of MAGIC pulls the adjoint ``c = dL/dg`` back through the step's gradient
``g = grad_theta L(theta; w)``: it needs ``H c`` (and ``dL/dw``, the per-example
directional derivatives ``<grad l_i, c>``). Whatever the checkpoint schedule, that costs at
least one Hessian-vector product per step and query. This script times, in one process
and alternated, on the model of ``benchmarks/magic_cost.py`` (GPT-NeoX hidden 128 x 2
layers, batch 16 x 32 tokens, one thread):

- a plain step's gradient (forward + backward), the unit;
- reverse-over-reverse, what ``magic/vjp.py`` does: the gradient with its graph
  (``create_graph=True``), then the double backward to the parameters and the weights;
- forward-over-reverse: ``torch.func.jvp`` of ``torch.func.grad`` along ``c``, whose
  tangent of the per-example losses gives ``dL/dw``.

It checks that both give the same ``H c`` and ``dL/dw`` and prints each one's median time
as a multiple of the plain step. With the forward fit at about 1.1 plain fits, forward +
reverse cannot go below ``1.1 + (HVP multiple)`` plain fits for one query even when every
state is kept (schedule ``all``, no replays).

Run: ``python benchmarks/magic_hvp.py [--repeats 9]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.func import functional_call, grad, jvp
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=args.seq_len,
        attn_implementation="eager",  # SDPA on CPU is not twice differentiable
    )
    net = GPTNeoXForCausalLM(cfg).eval()
    b, s, v = args.batch_size, args.seq_len, args.vocab
    ids = torch.randint(0, v, (b, s))
    weights = torch.ones(b)
    params = {k: t.detach() for k, t in net.named_parameters()}
    names = list(params)
    n = b * (s - 1)

    def loss_fn(p: dict, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(net, p, (ids,)).logits[:, :-1].reshape(-1, v)
        per = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="none")
        per = per.view(b, s - 1).sum(1)  # each example's summed token loss
        return (w * per).sum() / n, per

    c = {k: torch.randn_like(t) for k, t in params.items()}

    def plain() -> list[torch.Tensor]:
        p = {k: t.detach().requires_grad_() for k, t in params.items()}
        return list(torch.autograd.grad(loss_fn(p, weights)[0], list(p.values())))

    def reverse_over_reverse() -> tuple[list[torch.Tensor], torch.Tensor]:
        p = {k: t.detach().requires_grad_() for k, t in params.items()}
        w = weights.clone().requires_grad_()
        g = torch.autograd.grad(loss_fn(p, w)[0], list(p.values()), create_graph=True)
        out = torch.autograd.grad(g, [*p.values(), w], [c[k] for k in names])
        return list(out[:-1]), out[-1]

    def forward_over_reverse() -> tuple[list[torch.Tensor], torch.Tensor]:
        def g_and_losses(p: dict) -> tuple[dict, torch.Tensor]:
            return grad(lambda q: loss_fn(q, weights), has_aux=True)(p)

        _, (hc, loss_tangents) = jvp(g_and_losses, (params,), (c,))
        return [hc[k] for k in names], loss_tangents / n

    hc_rr, w_rr = reverse_over_reverse()
    hc_fr, w_fr = forward_over_reverse()
    diff = max(float((a - b_).norm() / a.norm()) for a, b_ in zip(hc_rr, hc_fr, strict=True))
    diff_w = float((w_rr - w_fr).norm() / w_rr.norm())
    if diff > 1e-4 or diff_w > 1e-4:
        raise SystemExit(f"the two HVPs disagree: relative {diff:.2e} (H c), {diff_w:.2e} (dL/dw)")
    runs = {
        "plain step (forward + backward)": plain,
        "reverse-over-reverse (magic/vjp.py)": reverse_over_reverse,
        "forward-over-reverse (torch.func)": forward_over_reverse,
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    unit = statistics.median(times["plain step (forward + backward)"])
    print(
        f"GPT-NeoX hidden {args.hidden} x {args.layers} layers (eager attention), "
        f"batch {b} x {s}, "
        f"{args.threads} thread(s), median of {args.repeats} alternated runs; "
        f"H c agrees to {diff:.1e}, dL/dw to {diff_w:.1e}"
    )
    for name, t in times.items():
        med = statistics.median(t)
        print(f"{name:38s} {med * 1e3:8.1f} ms  {med / unit:5.2f}x plain step")


if __name__ == "__main__":
    main()
