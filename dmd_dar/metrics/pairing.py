"""Sample identity from manifest records: pairing student/teacher samples and grouping by class or prompt.

A sample is identified by its condition (class id or caption), its seed and its index, as written in
``manifest.jsonl`` by ``dmd-dar sample``. Two folders sampled with the same noise and conditions therefore pair
up key by key, whatever order their files are in.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch

from dmd_dar.errors import UserError

SampleKey = tuple


def sample_group(record: Mapping[str, Any]) -> Hashable:
    """The group of a manifest record: ``class_id`` when present, else ``caption``, else ``None``."""
    if record.get("class_id") is not None:
        return int(record["class_id"])
    if record.get("caption") is not None:
        return str(record["caption"])
    return None


def sample_key(record: Mapping[str, Any]) -> SampleKey:
    """``(condition kind, condition, seed, index)`` of a manifest record, the key used to pair two folders."""
    if record.get("class_id") is not None:
        cond: tuple = ("class", int(record["class_id"]))
    elif record.get("caption") is not None:
        cond = ("caption", str(record["caption"]))
    else:
        cond = ("none", None)
    seed = record.get("seed")
    index = record.get("index")
    if seed is None and index is None:
        raise UserError(f"manifest record {dict(record)!r} has neither 'seed' nor 'index': cannot pair it; "
                        "write manifests with dmd-dar sample")
    return (*cond, None if seed is None else int(seed), None if index is None else int(index))


def pair_by_key(keys_a: Sequence[Hashable], keys_b: Sequence[Hashable],
                require_all: bool = True) -> tuple[list[int], list[int]]:
    """Indices ``(ia, ib)`` such that ``keys_a[ia[k]] == keys_b[ib[k]]``, in the order of ``keys_a``.

    Duplicate keys on either side are an error (the pairing would be ambiguous). With ``require_all`` every key
    of ``a`` must have a partner in ``b`` and vice versa; otherwise unmatched keys are dropped.
    """
    def index(keys: Sequence[Hashable], side: str) -> dict[Hashable, int]:
        out: dict[Hashable, int] = {}
        for i, k in enumerate(keys):
            if k in out:
                raise UserError(f"duplicate sample key {k!r} in set {side}: pairing needs unique "
                                "(condition, seed, index) per image; fix the manifest")
            out[k] = i
        return out

    ia_map, ib_map = index(keys_a, "a"), index(keys_b, "b")
    common = [k for k in keys_a if k in ib_map]
    if require_all and (len(common) != len(ia_map) or len(common) != len(ib_map)):
        missing_b = [k for k in keys_a if k not in ib_map][:3]
        missing_a = [k for k in keys_b if k not in ia_map][:3]
        raise UserError(f"sample keys do not pair up: {len(ia_map)} vs {len(ib_map)} keys, {len(common)} common "
                        f"(e.g. only in a: {missing_b}, only in b: {missing_a}); sample both folders with the "
                        "same seeds and conditions, or pass require_all=False")
    return [ia_map[k] for k in common], [ib_map[k] for k in common]


def group_summary(values: torch.Tensor | Sequence[float], groups: Iterable[Hashable]) -> dict[str, dict[str, float]]:
    """Per-group ``{"n", "mean", "std"}`` (std with n-1, NaN for n=1) of per-sample values; keys are ``str(group)``."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    groups = list(groups)
    if len(groups) != v.numel():
        raise UserError(f"group_summary got {v.numel()} values but {len(groups)} groups; pass one group per sample")
    buckets: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        buckets.setdefault(g, []).append(i)
    out: dict[str, dict[str, float]] = {}
    for g, idx in buckets.items():
        x = v[idx]
        out[str(g)] = {"n": len(idx), "mean": float(x.mean()),
                       "std": float(x.std()) if len(idx) > 1 else math.nan}
    return out
