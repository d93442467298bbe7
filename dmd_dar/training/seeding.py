"""Per-step seeding: every random draw of step s on rank r derives from (seed, s, r).

This makes resume exact without saving RNG streams: the step after a resume draws exactly what the
uninterrupted run drew.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts: int | str) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_step(seed: int, step: int, rank: int = 0, stream: str = "train") -> torch.Generator:
    """Seed the global RNGs for this step and return a dedicated CPU generator for explicit draws."""
    s = derive_seed(seed, stream, step, rank)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % (2**32))
    return torch.Generator().manual_seed(s)
