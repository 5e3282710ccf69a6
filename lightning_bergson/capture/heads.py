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

    Example:
        >>> cfg = HeadConfig(num_heads=4, head_size=24)   # GPT-NeoX qkv, hidden 32
        >>> cfg.check("layers.0.attention.query_key_value", out_features=96, in_features=32)
        >>> [cfg.block_name("qkv", h) for h in range(2)]
        ['qkv.head_0', 'qkv.head_1']
    """

    num_heads: int
    head_size: int
    head_dim: int = 2
    axis: Literal["output", "input"] = "output"

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

    def block_name(self, module_name: str, head: int) -> str:
        """Store key of head ``head`` of ``module_name``."""
        return f"{module_name}.head_{head}"
