"""Test-wide settings: no network, quiet Lightning, a private tokenizer cache."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
