"""Per-sample storage shared by the metric accumulators: update, merge across processes, state dicts.

Every accumulator keeps its per-sample values (float64) with their sample keys and groups. Concatenation is the
exact reduction across processes (and what bootstrap CIs and student/teacher pairing need); means, curves and
per-group breakdowns are computed from it in ``compute()``.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from dmd_dar.errors import UserError


def _key_to_state(k: Any) -> Any:
    return list(k) if isinstance(k, tuple) else k


def _key_from_state(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


class SampleAccumulator:
    """Base class: named per-sample float64 tensors (first dim = sample) plus optional keys and groups."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self._values: dict[str, list[torch.Tensor]] = {}
        self.keys: list[Hashable | None] = []
        self.groups: list[Hashable | None] = []

    def __len__(self) -> int:
        return len(self.keys)

    def _append(self, values: dict[str, torch.Tensor], keys: Sequence[Hashable] | None,
                groups: Sequence[Hashable] | None) -> None:
        n = next(iter(values.values())).shape[0]
        for name, v in values.items():
            if v.shape[0] != n:
                raise ValueError(f"per-sample value '{name}' has {v.shape[0]} rows, expected {n}")
            self._values.setdefault(name, []).append(v.detach().to("cpu", torch.float64))
        for label, seq in (("keys", keys), ("groups", groups)):
            if seq is not None and len(seq) != n:
                raise UserError(f"update() got {n} samples but {len(seq)} {label}; pass one per sample")
        self.keys.extend(list(keys) if keys is not None else [None] * n)
        self.groups.extend(list(groups) if groups is not None else [None] * n)

    def values(self, name: str) -> torch.Tensor:
        """All per-sample values of ``name``, concatenated in update order (float64)."""
        parts = self._values.get(name)
        if not parts:
            return torch.zeros(0, dtype=torch.float64)
        if len(parts) > 1:  # compact so repeated calls are cheap
            self._values[name] = parts = [torch.cat(parts)]
        return parts[0]

    def merge(self, other: SampleAccumulator) -> SampleAccumulator:
        """Append ``other``'s samples to this accumulator (in place) and return ``self``."""
        if type(other) is not type(self) or other.config != self.config:
            raise UserError(f"cannot merge {type(other).__name__}({other.config}) into "
                            f"{type(self).__name__}({self.config}): the settings differ")
        names = set(self._values) | set(other._values)
        if len(self) and len(other):
            if set(self._values) != set(other._values):
                raise UserError(f"cannot merge accumulators with different value sets {sorted(names)}")
        for name in sorted(other._values):
            self._values.setdefault(name, []).append(other.values(name))
        self.keys.extend(other.keys)
        self.groups.extend(other.groups)
        return self

    def state_dict(self) -> dict[str, Any]:
        """A picklable state (e.g. for ``torch.distributed.all_gather_object``); see :meth:`load_state_dict`."""
        return {"type": type(self).__name__, "config": dict(self.config),
                "values": {n: self.values(n).clone() for n in self._values},
                "keys": [_key_to_state(k) for k in self.keys], "groups": list(self.groups)}

    def load_state_dict(self, state: dict[str, Any]) -> SampleAccumulator:
        if state.get("type") != type(self).__name__ or state.get("config") != self.config:
            raise UserError(f"state of {state.get('type')}({state.get('config')}) does not match "
                            f"{type(self).__name__}({self.config})")
        self._values = {n: [torch.as_tensor(v, dtype=torch.float64)] for n, v in state["values"].items()}
        self.keys = [_key_from_state(k) for k in state["keys"]]
        self.groups = list(state["groups"])
        return self

    def merge_state(self, state: dict[str, Any]) -> SampleAccumulator:
        """Merge a state dict produced by another process's accumulator with the same settings."""
        other = copy.copy(self)  # shares models/settings, gets its own sample storage below
        other._values, other.keys, other.groups = {}, [], []
        other.load_state_dict(state)
        return self.merge(other)
