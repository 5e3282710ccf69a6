"""Per-example (projected, normalized) gradients of Linear and conv layers from module hooks.

For a linear layer with per-token input ``a`` ``[B, S, I]`` and output gradient
``g`` ``[B, S, O]``, example ``i``'s weight gradient is ``G_i = sum_t g_it a_it^T``.
A forward hook keeps ``a`` and registers a tensor hook on the layer output; the
tensor hook receives ``g`` during backward and turns ``(a, g)`` into rows:

* projected (``projection_dim=p``): ``vec(L G_i R^T) = vec((g L^T)^T (a R^T))``,
  cost linear in ``O`` and ``I``, never forming ``[B, O, I]``;
* exact (``projection_dim=0``): ``vec(G_i)``;
* Adafactor normalizer: ``g`` and ``a`` are scaled per feature first (exact, free);
* Adam normalizer: ``G_i`` is formed, divided elementwise, then projected.

``nn.Conv1d/2d/3d`` inputs are unfolded into patches first (see :mod:`.conv`), so a
convolution is a Linear over ``[B, positions, C/groups * prod(k)]`` and its block is
``weight.reshape(O, -1)``'s gradient. Which modules are hooked: :mod:`.selection`.

Tensor hooks on the output (rather than full backward hooks) keep working with
in-place operations elsewhere in the model.

Frozen networks (every weight ``requires_grad=False``, as in a post-hoc index): a tracked
layer whose output does not require grad gets an output that does (``leaf_outputs``), so
backward computes the activation gradients from the loss down to the lowest tracked layer
and no parameter gradient at all. The rows are unchanged: a layer's row needs only its
input and the gradient at its output, and where backward starts below it does not change
that gradient.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x = torch.randn(5, 7, 4)
    >>> with GradientCollector(model, projection_dim=0) as collector:
    ...     model(x).square().sum().backward()
    >>> sorted((k, tuple(v.shape)) for k, v in collector.gradients.items())
    [('0', (5, 12)), ('2', (5, 6))]
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from .conv import CONV_TYPES, grouped_gradient, grouped_projection, output_gradient, patches
from .grouped import stacked_rows, stacked_scales
from .heads import HeadConfig
from .normalizers import AdafactorNormalizer, AdamNormalizer, Normalizer
from .projection import ProjectionCache
from .selection import DEFAULT_EXCLUDE, select_modules, trackable_modules
from .selection import features as _features

__all__ = ["DEFAULT_EXCLUDE", "Block", "GradientCollector", "select_modules", "trackable_modules"]

# Numbers (inputs plus output gradients) of one stack of layers: its float32 copies are at
# most 512 MiB; further layers of the same shapes start a new stack.
_STACK_NUMEL = 2**27

Closure = Callable[[str, Tensor], None]


@dataclass(frozen=True)
class Block:
    """One stored block: a whole module or one head of it."""

    name: str
    shape: tuple[int, int]
    parent: str
    head: int | None


class _Plan:
    """Everything one module's hook needs, computed once."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        *,
        parent: nn.Module,
        head_cfg: HeadConfig | None,
        include_bias: bool,
        projection_dim: int,
    ) -> None:
        out_f, in_f = _features(module)
        self.name = name
        self.bias = include_bias and getattr(module, "bias", None) is not None
        self.out_f, self.in_f = out_f, in_f + int(self.bias)
        self.conv = module if isinstance(module, CONV_TYPES) else None
        self.groups = int(module.groups) if self.conv is not None else 1
        if head_cfg is not None:
            self._check_heads(parent, head_cfg, out_f, in_f)
        split_size = out_f if head_cfg is None or head_cfg.axis == "output" else in_f
        order = head_cfg.permutation(split_size) if head_cfg else None
        self.perm = None if order is None else torch.tensor(order)
        self.num_heads = head_cfg.num_heads if head_cfg else 1
        # One block, no head permutation, a plain matmul layer: the collector's fast path.
        self.simple = self.conv is None and self.groups == 1 and head_cfg is None
        self.split_output = head_cfg is None or head_cfg.axis == "output"
        heads = self.num_heads
        self.head_out = out_f // heads if self.split_output else out_f
        self.head_in = self.in_f if self.split_output else in_f // heads
        p = projection_dim
        shape = (p, p) if p else (self.head_out, self.head_in)
        self.blocks = [
            Block(
                head_cfg.block_name(name, h) if head_cfg else name,
                shape,
                name,
                h if head_cfg else None,
            )
            for h in range(heads)
        ]

    def _check_heads(self, parent: nn.Module, cfg: HeadConfig, out_f: int, in_f: int) -> None:
        cfg.check(self.name, out_features=out_f, in_features=in_f)
        cfg.check_fused(self.name, parent, out_features=out_f)
        if self.bias and cfg.axis == "input":
            raise ValueError(
                f"module {self.name!r}: include_bias cannot be combined with an input-axis "
                "HeadConfig (the bias belongs to no head); set include_bias=False"
            )
        if self.groups > 1:
            raise ValueError(
                f"module {self.name!r} is a grouped convolution (groups={self.groups}): its "
                "block is not split into heads; drop it from head_cfgs"
            )

    def permutation(self, device: torch.device) -> Tensor:
        """The head-gathering order of the split axis on ``device``."""
        assert self.perm is not None
        if self.perm.device != device:
            self.perm = self.perm.to(device)
        return self.perm


class GradientCollector:
    """Context manager that captures per-example gradients of Linear/Conv1D/ConvNd layers.

    Framework-free: the Lightning callback and the query side both use it, so
    training rows and query rows are processed identically.

    Args:
        model: The model whose submodules are hooked; block names are relative to it.
        projection_dim: ``p`` of the two-sided projection; 0 keeps exact gradients.
        seed: Projection seed (matrices depend only on seed, block name and shape).
        include: fnmatch globs of module names to track, frozen modules too (``("*",)``:
            every trackable module); ``None`` (default) tracks the trackable modules whose
            weight requires grad, e.g. only the adapters of a PEFT LoRA model.
        exclude: fnmatch globs of module names to skip (default: output embeddings).
        head_cfgs: Module name (or glob) -> :class:`HeadConfig` splitting it into heads.
        include_bias: Append the bias gradient as an extra input column.
        normalizers: Module name -> Adam/Adafactor normalizer (``[out, in(+1)]``).
        closure: Called as ``closure(block_name, rows [B, D_block])`` during backward (or
            from :meth:`process_pending` when ``defer``). Without it, rows are summed into
            :attr:`gradients`.
        defer: Keep ``(a, g)`` until :meth:`process_pending` (used when the normalizer is
            only known after the optimizer step).
        leaf_outputs: When a tracked layer's output does not require grad (frozen weights
            and nothing upstream requiring grad), replace it by a copy that does, so its
            row is still captured (see the module docs).
        stack_layers: Process deferred layers of equal shapes together with batched
            matmuls (:mod:`.grouped`; same math, rounding may differ in the last bits).
            ``None`` (default): on accelerators, where per-layer kernel launches dominate;
            on a CPU the per-layer path is as fast and needs no stacked copies.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(6, 4))
        >>> rows = []
        >>> with GradientCollector(model, projection_dim=2, closure=lambda k, r: rows.append(k)):
        ...     model(torch.randn(3, 5, 6)).sum().backward()
        >>> rows
        ['0']
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        projection_dim: int = 16,
        seed: int = 0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = DEFAULT_EXCLUDE,
        head_cfgs: Mapping[str, HeadConfig] | None = None,
        include_bias: bool = False,
        normalizers: Mapping[str, Normalizer] | None = None,
        closure: Closure | None = None,
        defer: bool = False,
        leaf_outputs: bool = True,
        stack_layers: bool | None = None,
    ) -> None:
        if projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0 = exact), got {projection_dim}")
        self.model = model
        self.projection_dim = projection_dim
        self.include = None if include is None else tuple(include)
        self.exclude = tuple(exclude)
        self.include_bias = include_bias
        self.modules = select_modules(model, self.include, self.exclude)
        self.plans = {
            name: _Plan(
                name,
                mod,
                parent=model.get_submodule(name.rpartition(".")[0]),
                head_cfg=_head_cfg_for(name, head_cfgs or {}),
                include_bias=include_bias,
                projection_dim=projection_dim,
            )
            for name, mod in self.modules.items()
        }
        _check_head_keys(head_cfgs or {}, self.modules)
        self.projections = ProjectionCache(projection_dim, seed=seed)
        self.normalizers: dict[str, Normalizer] = {}
        self.set_normalizers(normalizers or {})
        self.closure = closure
        self.defer = defer
        self.leaf_outputs = leaf_outputs
        self.stack_layers = stack_layers
        self.enabled = True
        # Per module, the matrices of the plain path (see ``_plain``), keyed by dtype/device.
        self._plain_cache: dict[tuple, tuple[Tensor, Tensor | None, Tensor]] = {}
        self.gradients: dict[str, Tensor] = {}
        self._pending: list[tuple[str, Tensor, Tensor]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def blocks(self) -> list[Block]:
        """Stored blocks in row order: module order of ``named_modules()``, then heads."""
        return [b for plan in self.plans.values() for b in plan.blocks]

    def set_normalizers(self, normalizers: Mapping[str, Normalizer]) -> None:
        """Replace the normalizers (e.g. after each optimizer step); shapes are checked."""
        for name, norm in normalizers.items():
            plan = self.plans.get(name)
            if plan is None:
                raise KeyError(f"normalizer given for {name!r}, which is not a tracked module")
            if tuple(norm.shape) != (plan.out_f, plan.in_f):
                raise ValueError(
                    f"normalizer for {name!r} has shape {tuple(norm.shape)} but the module's "
                    f"gradient is {(plan.out_f, plan.in_f)} "
                    f"(out, in{' + bias' if plan.bias else ''})"
                )
        self.normalizers = dict(normalizers)
        # Which modules take the plain path depends on the normalizers.
        self._plain_names = {
            name for name, plan in self.plans.items() if plan.simple and name not in normalizers
        }

    def __enter__(self) -> GradientCollector:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(partial(self._forward_hook, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove all hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def _forward_hook(
        self, name: str, module: nn.Module, inputs: tuple, output: Tensor
    ) -> Tensor | None:
        if not (self.enabled and torch.is_grad_enabled()):
            return None
        replaced = None
        if not output.requires_grad:
            if not self.leaf_outputs:
                return None
            # A clone of a grad-requiring leaf: backward stops here, and later in-place
            # operations on the output stay legal (they would not be on the leaf itself).
            output = replaced = output.detach().requires_grad_().clone()
        a = inputs[0].detach()
        low = _autocast_dtype(a)
        if low is None:
            return self._hook_input(name, output, a, replaced)
        # Under autocast the layer multiplies ``a`` rounded to the low dtype, so that is the
        # input of its true weight gradient; the projection itself runs in float32.
        with torch.autocast(a.device.type, enabled=False):
            return self._hook_input(name, output, a.to(low), replaced)

    def _hook_input(
        self, name: str, output: Tensor, a: Tensor, replaced: Tensor | None
    ) -> Tensor | None:
        """Register the backward half of module ``name``'s capture on ``output``."""
        if name in self._plain_names and self.projection_dim and not self.defer:
            # The common case in fewer Python steps (same operations as the general path
            # below, so the same rows bit for bit): one head, no normalizer, no convolution.
            dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
            right, bias, _ = self._plain(name, dtype, a.device)
            a = a.reshape(a.shape[0], -1, a.shape[-1])
            ar = (a if a.dtype == dtype else a.to(dtype)) @ right  # (B, S, p)
            ar = ar if bias is None else ar + bias
            output.register_hook(partial(self._plain_grad_hook, name, ar))
            return replaced
        if self._early(name):
            # Project the input now, while it is hot in cache: the backward needs only
            # ``a R^T`` [B, S, p] per head, and it is kept instead of ``a`` [B, S, I].
            a = _Projected(self._project_inputs(self.plans[name], a))
        output.register_hook(partial(self._grad_hook, name, a))
        return replaced

    def _early(self, name: str) -> bool:
        """Whether module ``name``'s input can be projected in the forward hook.

        Needs a projection, a plain (non-conv, ungrouped) layer and a normalizer known
        now that acts per feature (Adafactor) or not at all: Adam's needs the full
        gradient and deferred normalizers arrive after the step.
        """
        plan = self.plans[name]
        norm = self.normalizers.get(name)
        return (
            self.projection_dim > 0
            and not self.defer
            and plan.conv is None
            and plan.groups == 1
            and (norm is None or isinstance(norm, AdafactorNormalizer))
        )

    def _plain(self, name: str, dtype: torch.dtype, device: torch.device) -> tuple:
        """``(R^T [I, p], bias column of R [p] or None, L^T [O, p])`` of a plain module."""
        key = (name, dtype, device)
        mats = self._plain_cache.get(key)
        if mats is None:
            plan, like = self.plans[name], torch.empty(0, dtype=dtype, device=device)
            right = self._matrices(plan, "right", plan.head_in, like)[0]  # (p, I[+1])
            bias = right[:, -1] if plan.bias else None
            right = right[:, :-1] if plan.bias else right
            left = self._matrices(plan, "left", plan.head_out, like)[0]  # (p, O)
            mats = self._plain_cache[key] = (right.T, bias, left.T)
        return mats

    def _plain_grad_hook(self, name: str, ar: Tensor, g: Tensor) -> None:
        """The backward half of the plain path: ``vec((g L^T)^T (a R^T))``."""
        if _autocast_on(g.device.type):  # a backward run inside autocast
            with torch.autocast(g.device.type, enabled=False):
                return self._plain_grad_hook(name, ar, g)
        dtype = ar.dtype if g.dtype != torch.float64 else torch.float64
        g = g.detach().reshape(g.shape[0], -1, g.shape[-1])  # (B, S, O)
        if g.dtype != dtype:
            g = g.to(dtype)
        if ar.dtype != dtype:
            ar = ar.to(dtype)
        left = self._plain(name, dtype, g.device)[2]
        out = (g @ left).transpose(1, 2) @ ar  # (B, p, p)
        self._deliver(name, [out.reshape(out.shape[0], -1)])

    def _grad_hook(self, name: str, a: Tensor, g: Tensor) -> None:
        if self.defer:
            self._pending.append((name, a, g.detach()))
        else:
            self._emit(name, a, g.detach())

    def take_pending(self) -> list[tuple[str, Tensor, Tensor]]:
        """Hand over the deferred ``(module, a, g)`` triples and forget them."""
        pending, self._pending = self._pending, []
        return pending

    def process_pending(self, pending: list[tuple[str, Tensor, Tensor]] | None = None) -> None:
        """Process deferred triples (default: the ones held) with the current normalizers."""
        pending = self.take_pending() if pending is None else pending
        for group in self._stacks(pending):
            if len(group) == 1:
                self._emit(*group[0])
                continue
            rows = self._stacked_rows(group)  # (L, B, p * p)
            for (name, _, _), row in zip(group, rows, strict=True):
                self._deliver(name, [row])

    def _stacks(self, pending: list[tuple[str, Tensor, Tensor]]) -> list[list]:
        """``pending`` split into groups that :meth:`_stacked_rows` can take together."""
        groups: dict[tuple, list] = {}
        sizes: dict[tuple, int] = {}
        for item in pending:
            key = self._stack_key(*item)
            if key is not None:  # cap a stack's float32 copies at 512 MiB
                numel = item[1].numel() + item[2].numel()
                sizes[key] = sizes.get(key, 0) + numel
                key = (*key, sizes[key] // _STACK_NUMEL)
            groups.setdefault(key if key is not None else (id(item),), []).append(item)
        return list(groups.values())

    def _stack_key(self, name: str, a: Tensor, g: Tensor) -> tuple | None:
        """What must be equal for layers to be stacked; ``None``: process this one alone."""
        plan, norm = self.plans[name], self.normalizers.get(name)
        stack = self.stack_layers if self.stack_layers is not None else g.device.type != "cpu"
        plain = plan.conv is None and plan.num_heads == 1 and plan.perm is None
        if not (stack and plain and self.projection_dim and not isinstance(a, _Projected)):
            return None
        if norm is not None and not isinstance(norm, AdafactorNormalizer):
            return None
        shapes = (tuple(a.shape), tuple(g.shape), a.dtype, g.dtype, g.device)
        return (plan.out_f, plan.in_f, plan.bias, norm is None, *shapes)

    def _stacked_rows(self, group: list[tuple[str, Tensor, Tensor]]) -> Tensor:
        """Rows ``[L, B, p * p]`` of a group from :meth:`_stacks`."""
        names = [name for name, _, _ in group]
        plan, (_, a, g) = self.plans[names[0]], group[0]
        dtype = torch.float64 if torch.float64 in (a.dtype, g.dtype) else torch.float32
        lefts = self.projections.get(names, "left", plan.out_f, dtype, g.device)  # (L, p, O)
        rights = self.projections.get(names, "right", plan.in_f, dtype, g.device)  # (L, p, I)
        scales = None
        if names[0] in self.normalizers:
            norms = [self.normalizers[n] for n in names]
            scales = stacked_scales(norms, dtype, g.device)  # type: ignore[arg-type]
        a_all, g_all = [x for _, x, _ in group], [x for _, _, x in group]
        return stacked_rows(a_all, g_all, lefts, rights, bias=plan.bias, scales=scales)

    def _emit(self, name: str, a: Tensor, g: Tensor) -> None:
        if _autocast_on(g.device.type):  # rows in float32, not autocast's dtype
            with torch.autocast(g.device.type, enabled=False):
                return self._deliver(name, self.compute_rows(name, a, g))
        self._deliver(name, self.compute_rows(name, a, g))

    def _deliver(self, name: str, rows: list[Tensor]) -> None:
        """Hand each block's rows to the closure, or add them to :attr:`gradients`."""
        for block, row in zip(self.plans[name].blocks, rows, strict=True):
            if self.closure is not None:
                self.closure(block.name, row)
            elif block.name in self.gradients:
                self.gradients[block.name] = self.gradients[block.name] + row
            else:
                self.gradients[block.name] = row

    def compute_rows(self, name: str, a: Tensor, g: Tensor) -> list[Tensor]:
        """Rows ``[B, D_block]`` of each block of module ``name`` from ``a`` and ``g``.

        ``a`` is the module's input and ``g`` its output gradient as the hooks saw them
        (for a convolution ``[B, C, *spatial]`` and ``[B, O, *positions]``).
        """
        plan = self.plans[name]
        if isinstance(a, _Projected):
            ar = a.inputs  # float32, or float64 for a float64 input
            dtype = torch.float64 if torch.float64 in (ar.dtype, g.dtype) else torch.float32
            g = g.reshape(g.shape[0], -1, g.shape[-1]).to(dtype)  # (B, S, O)
            return self._project_outputs(plan, g, ar.to(dtype))
        dtype = torch.float64 if torch.float64 in (a.dtype, g.dtype) else torch.float32
        if plan.conv is not None:
            a = patches(plan.conv, a.to(dtype))  # (B, P, C * prod(k))
            g = output_gradient(plan.conv, g.to(dtype))  # (B, P, O)
        batch = g.shape[0]
        a = a.reshape(batch, -1, a.shape[-1]).to(dtype)  # (B, S, I)
        g = g.reshape(batch, -1, g.shape[-1]).to(dtype)  # (B, S, O)
        norm = self.normalizers.get(name)
        if self.projection_dim and plan.groups == 1 and not isinstance(norm, AdamNormalizer):
            return self._project_outputs(plan, g, self._project_inputs(plan, a))
        if plan.groups > 1:
            a = a.view(batch, a.shape[1], plan.groups, -1)  # (B, S, G, I / G)
        if plan.bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)  # (B, S, [G,] I+1)
        if isinstance(norm, AdafactorNormalizer):
            row, col = norm.scales(dtype, g.device)  # V^-1/2 = outer product of r [O], c [I]
            g, a = g * row, a * col
        if isinstance(norm, AdamNormalizer) or not self.projection_dim:
            grouped = plan.groups > 1
            full = (
                grouped_gradient(a, g) if grouped else torch.bmm(g.transpose(1, 2), a)
            )  # (B, O, I)
            if isinstance(norm, AdamNormalizer):
                full = norm.normalize(full)
            return self._split_full(plan, full)
        lefts = self._matrices(plan, "left", plan.head_out, g)  # (1, p, O)
        rights = self._matrices(plan, "right", plan.head_in, g)  # (1, p, I)
        return [grouped_projection(a, g, lefts[0], rights[0])]

    def _split_full(self, plan: _Plan, full: Tensor) -> list[Tensor]:
        """Per-head rows of full per-example gradients ``[B, O, I]``, projected if asked."""
        batch, heads = full.shape[0], plan.num_heads
        if plan.perm is not None:  # gather each head's slices of every section
            full = full.index_select(1 if plan.split_output else 2, plan.permutation(full.device))
        if plan.split_output:
            parts = full.view(batch, heads, plan.head_out, plan.head_in)  # (B, H, o, I)
        else:
            parts = full.view(batch, plan.head_out, heads, plan.head_in).transpose(1, 2)
        if self.projection_dim:
            lefts = self._matrices(plan, "left", plan.head_out, full)  # (H, p, o)
            rights = self._matrices(plan, "right", plan.head_in, full)  # (H, p, i)
            parts = lefts @ parts @ rights.transpose(1, 2)  # (B, H, p, p)
        return [parts[:, h].reshape(batch, -1) for h in range(heads)]

    def _project_inputs(self, plan: _Plan, a: Tensor) -> Tensor:
        """``a R^T`` of every head: ``[B, S, p]`` for one head, else ``[B, H, S, p]``.

        ``a`` is the layer input (``[B, ..., I]``). Projected rows are
        ``vec((g L^T)^T (a R^T))``, never forming ``[B, O, I]``; the bias column and the
        Adafactor column scales ``c`` are folded into ``R``
        (``(a diag(c)) R^T = a (R diag(c))^T``), so the activations are never rescaled.
        """
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        batch, heads, p = a.shape[0], plan.num_heads, self.projection_dim
        a = a.reshape(batch, -1, a.shape[-1]).to(dtype)  # (B, S, I)
        seq, col_scale = a.shape[1], None
        if isinstance(norm := self.normalizers.get(plan.name), AdafactorNormalizer):
            col_scale = norm.scales(dtype, a.device)[1]
        if plan.perm is not None and not plan.split_output:  # gather each head's slices
            perm = plan.permutation(a.device)
            a = a.index_select(-1, perm)
            col_scale = None if col_scale is None else col_scale[perm]
        rights = self._matrices(plan, "right", plan.head_in, a)  # (H, p, i)
        if col_scale is not None:
            rights = rights * (col_scale if plan.split_output else col_scale.view(heads, 1, -1))
        bias = None
        if plan.bias:  # [a, 1] R^T = a R[:, :I]^T + R[:, I]
            rights, bias = rights[..., :-1], rights[..., -1]  # (H, p, I), (H, p)
        if heads == 1:
            ar = a @ rights[0].T  # (B, S, p)
            return ar if bias is None else ar + bias[0]
        if plan.split_output:  # every head sees the whole input
            ar = (a @ rights.reshape(heads * p, -1).T).view(batch, seq, heads, p)
            ar = ar if bias is None else ar + bias
            return ar.transpose(1, 2)  # (B, H, S, p)
        ar = torch.einsum("bshk,hpk->bhsp", a.view(batch, seq, heads, plan.head_in), rights)
        return ar  # (B, H, S, p); no bias with an input-axis split

    def _project_outputs(self, plan: _Plan, g: Tensor, ar: Tensor) -> list[Tensor]:
        """Rows ``vec((g L^T)^T (a R^T))`` of every head from ``g`` [B, S, O] and ``ar``.

        The Adafactor row scales are folded into ``L`` like the column scales into ``R``.
        """
        batch, seq, heads, p = g.shape[0], g.shape[1], plan.num_heads, self.projection_dim
        row_scale = None
        if isinstance(norm := self.normalizers.get(plan.name), AdafactorNormalizer):
            row_scale = norm.scales(g.dtype, g.device)[0]
        if plan.perm is not None and plan.split_output:  # gather each head's slices
            perm = plan.permutation(g.device)
            g = g.index_select(-1, perm)  # (B, S, O)
            row_scale = None if row_scale is None else row_scale[perm]
        lefts = self._matrices(plan, "left", plan.head_out, g)  # (H, p, o)
        if row_scale is not None:  # per output feature, split like the heads split O
            lefts = lefts * (row_scale.view(heads, 1, -1) if plan.split_output else row_scale)
        if heads == 1:  # plain matmuls: (B, S, O) @ (O, p), then (B, p, S) @ (B, S, p)
            out = (g @ lefts[0].T).transpose(1, 2) @ ar  # (B, p, p)
            return [out.reshape(batch, p * p)]
        if plan.split_output:
            gl = torch.einsum("bshk,hpk->bhsp", g.view(batch, seq, heads, plan.head_out), lefts)
        else:
            gl = (g @ lefts.reshape(heads * p, -1).T).view(batch, seq, heads, p).transpose(1, 2)
        out = gl.transpose(-1, -2) @ ar  # (B, H, p, p)
        return [out[:, h].reshape(batch, p * p) for h in range(heads)]

    def _matrices(self, plan: _Plan, side: str, features: int, like: Tensor) -> Tensor:
        """The ``side`` projection of every block of ``plan``, stacked ``[H, p, features]``."""
        names = [b.name for b in plan.blocks]
        return self.projections.get(names, side, features, like.dtype, like.device)  # type: ignore[arg-type]


class _Projected:
    """A layer input already projected in the forward hook (``a R^T``, see ``_early``)."""

    __slots__ = ("inputs",)

    def __init__(self, inputs: Tensor) -> None:
        self.inputs = inputs


def _autocast_dtype(a: Tensor) -> torch.dtype | None:
    """The dtype autocast gives a tracked layer's input ``a`` here, if it casts it at all.

    Every layer type the collector tracks (linear, HF ``Conv1D``'s ``addmm``, convolutions)
    is on autocast's lower-precision list on CPU and CUDA; like autocast, float64 inputs are
    left alone.
    """
    if not a.is_floating_point() or a.dtype == torch.float64:
        return None
    kind = a.device.type
    return torch.get_autocast_dtype(kind) if _autocast_on(kind) else None


def _autocast_on(kind: str) -> bool:
    """Whether autocast is on for device type ``kind`` (never for one it does not know)."""
    try:
        return torch.is_autocast_enabled(kind)
    except RuntimeError:  # e.g. "meta": no autocast there
        return False


def _head_cfg_for(name: str, head_cfgs: Mapping[str, HeadConfig]) -> HeadConfig | None:
    if name in head_cfgs:
        return head_cfgs[name]
    matches = [cfg for pattern, cfg in head_cfgs.items() if fnmatch.fnmatchcase(name, pattern)]
    return matches[0] if matches else None


def _check_head_keys(head_cfgs: Mapping[str, HeadConfig], modules: Mapping[str, nn.Module]) -> None:
    for pattern in head_cfgs:
        if pattern not in modules and not fnmatch.filter(modules, pattern):
            raise ValueError(
                f"head_cfgs key {pattern!r} matches no tracked module; tracked modules include: "
                + ", ".join(list(modules)[:8])
            )
