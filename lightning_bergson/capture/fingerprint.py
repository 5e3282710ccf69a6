"""A JSON description of a model, so a store can refuse a query from another model."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

__all__ = ["model_fingerprint"]


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Class, HF config (when there is one) and a hash of parameter names and shapes.

    Weights are not hashed: a store describes a training run, whose weights change.

    Example:
        >>> fp = model_fingerprint(nn.Linear(3, 2))
        >>> fp["class"], fp["num_parameters"]
        ('torch.nn.modules.linear.Linear', 8)
    """
    shapes = [f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters()]
    cls = type(model)
    fingerprint: dict[str, Any] = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "parameter_shapes_sha256": hashlib.sha256("\n".join(shapes).encode()).hexdigest(),
    }
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        fingerprint["config"] = json.loads(config.to_json_string(use_diff=False))
    return fingerprint
