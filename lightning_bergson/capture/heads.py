"""Attention-head splits of a module's gradient.

A fused attention projection holds all heads in one weight matrix. Splitting its
per-example gradient into per-head blocks, each with its own projection, lets an
attribution ask which head an influence flows through.

* ``axis="output"`` (q/k/v projections): heads are contiguous blocks of the
  output-feature axis, i.e. of the per-token output gradient ``g`` ``[B, S, O]``
  (``head_dim=2`` in Bergson's ``AttentionConfig`` terms). GPT-NeoX's fused
  ``query_key_value`` stores ``[q_h, k_h, v_h]`` of head ``h`` next to each other,
  so ``HeadConfig(num_heads=H, head_size=3 * d_head)`` gives one block per head.
* ``axis="input"`` (output projections such as GPT-NeoX ``attention.dense``): heads
  are contiguous blocks of the input-feature axis, i.e. of the per-token activation
  ``a`` ``[B, S, I]``. Bergson cannot split this axis.
* ``sections=k`` (GPT-2's fused ``c_attn``): the split axis is ``k`` equal sections
  (``[q | k | v]``), each holding every head contiguously. Head ``h``'s block is the
  concatenation over sections of slice ``h`` of each section, gathered by a fixed
  permutation of the axis; ``HeadConfig(num_heads=H, head_size=3 * d_head, sections=3)``.

Block ``h`` of module ``m`` is stored under the key ``"m.head_<h>"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["HeadConfig"]


@dataclass(frozen=True)
class HeadConfig:
    """How to split one module's gradient into attention heads.

    Args:
        num_heads: Number of heads ``H``.
        head_size: Features per head along the split axis; ``H * head_size`` must
            equal that axis (``O`` for ``axis="output"``, ``I`` for ``"input"``).
        head_dim: Dimension of the per-token tensor ``[B, S, F]`` that holds the heads.
            Only the feature dimension (2, or -1) is meaningful; kept for Bergson
            compatibility.
        axis: ``"output"`` splits output features (q/k/v projections),
            ``"input"`` splits input features (attention output projections).
        sections: Equal sections of the split axis that each hold all heads
            (3 for GPT-2's ``c_attn`` ``[q | k | v]``); 1 means heads are contiguous.
            ``head_size`` counts a head's features over all sections, so each section
            contributes ``head_size // sections``.

    Example:
        >>> cfg = HeadConfig(num_heads=4, head_size=24)   # GPT-NeoX qkv, hidden 32
        >>> cfg.check("layers.0.attention.query_key_value", out_features=96, in_features=32)
        >>> [cfg.block_name("qkv", h) for h in range(2)]
        ['qkv.head_0', 'qkv.head_1']
        >>> HeadConfig(num_heads=2, head_size=6, sections=3).permutation(12)  # [q|k|v], d_head 2
        [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
    """

    num_heads: int
    head_size: int
    head_dim: int = 2
    axis: Literal["output", "input"] = "output"
    sections: int = 1

    def __post_init__(self) -> None:
        if self.num_heads <= 0 or self.head_size <= 0:
            raise ValueError(
                f"HeadConfig needs positive num_heads and head_size, got {self.num_heads} "
                f"and {self.head_size}"
            )
        if self.head_dim not in (2, -1):
            raise ValueError(
                f"HeadConfig.head_dim={self.head_dim} is not supported: heads live in the feature "
                "dimension (2 or -1) of the per-token tensor [B, S, F]; use axis='input' to split "
                "the input features instead of the output features"
            )
        if self.axis not in ("output", "input"):
            raise ValueError(f"HeadConfig.axis must be 'output' or 'input', got {self.axis!r}")
        if self.sections <= 0 or self.head_size % self.sections:
            raise ValueError(
                f"HeadConfig(num_heads={self.num_heads}, head_size={self.head_size}, "
                f"sections={self.sections}): head_size must be a positive multiple of sections "
                "(each head holds head_size // sections features of every section). Pick "
                "head_size = sections * d_head (GPT-2's c_attn: sections=3, "
                "head_size = 3 * hidden // num_heads)."
            )

    def check(self, module_name: str, *, out_features: int, in_features: int) -> None:
        """Raise ``ValueError`` unless the heads tile the split axis of ``module_name`` exactly."""
        size = out_features if self.axis == "output" else in_features
        if self.num_heads * self.head_size != size:
            raise ValueError(
                f"HeadConfig(num_heads={self.num_heads}, head_size={self.head_size}, "
                f"axis={self.axis!r}) does not divide module {module_name!r}: its {self.axis} "
                f"axis has {size} features but num_heads * head_size = "
                f"{self.num_heads * self.head_size}. Pick head_size = {size} // num_heads "
                f"(GPT-NeoX's fused query_key_value uses head_size = 3 * hidden // num_heads)."
            )

    def check_fused(self, module_name: str, parent: object, *, out_features: int) -> None:
        """Refuse a layout that cuts across GPT-2's fused ``[q | k | v]`` ``c_attn``.

        GPT-2 style attention (a parent with ``split_size`` and ``num_heads``, the module
        named ``c_attn``) stores all heads' q, then all k, then all v: contiguous blocks of
        its output are not heads unless ``sections`` equals the number of q/k/v parts.
        """
        split = getattr(parent, "split_size", None)
        fused = module_name.rsplit(".", 1)[-1] == "c_attn" and hasattr(parent, "num_heads")
        if not (fused and isinstance(split, int) and split > 0 and self.axis == "output"):
            return
        parts = out_features // split
        if self.sections != parts and self.num_heads > 1:
            raise ValueError(
                f"module {module_name!r} is a GPT-2 style fused attention projection whose "
                f"{out_features} outputs are {parts} sections of {split} (q, k, v for all heads), "
                f"so HeadConfig(num_heads={self.num_heads}, head_size={self.head_size}, "
                f"sections={self.sections}) would not select heads. Use HeadConfig("
                f"num_heads={self.num_heads}, head_size={out_features // self.num_heads}, "
                f"sections={parts})."
            )

    def permutation(self, size: int) -> list[int] | None:
        """Order of the split axis that makes each head contiguous (``None``: already is).

        Position ``h * head_size + s * d + j`` takes feature ``s * (size // sections) +
        h * d + j`` with ``d = head_size // sections``: head ``h``'s slice of every section.
        """
        if self.sections == 1:
            return None
        width, d = size // self.sections, self.head_size // self.sections
        return [
            s * width + h * d + j
            for h in range(self.num_heads)
            for s in range(self.sections)
            for j in range(d)
        ]

    def block_name(self, module_name: str, head: int) -> str:
        """Store key of head ``head`` of ``module_name``."""
        return f"{module_name}.head_{head}"
