"""The typed results of ``dmd-dar eval``: what ``metrics.json`` holds, written and read through the same classes.

:class:`Evaluation` is the whole file: per-set results (:class:`SetResult`), comparisons of a sample set with the
reference or the baseline (:class:`Comparison`), availability records and the protocol. Every interval is an
:class:`dmd_dar.metrics.bootstrap.Interval`. A metric that could not run is an :class:`Unavailable` in its place.

``to_json()`` gives strict JSON (NaN and inf as ``null``); ``Evaluation.from_json`` rebuilds the objects and fails
with :class:`ResultsFormatError`, naming the path of the field, on a missing, unknown or ill-typed field, or on
another schema version: a renamed key can never silently show as "n/a" in a report or a study.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np

from dmd_dar.errors import UserError
from dmd_dar.metrics.bootstrap import Interval

SCHEMA = "dmd_dar.eval/2"  # /1: untyped dicts (before the typed results); /2: these classes
T = TypeVar("T")


class ResultsFormatError(UserError):
    """A metrics file that does not match the result classes (another version, or edited by hand)."""


# ----------------------------------------------------------------------------------------------- records


@dataclass(frozen=True, kw_only=True)
class Unavailable:
    """A metric (or a pairing) that could not be computed, and what it needs."""

    metric: str
    needs: str
    reason: str = ""
    available: bool = False

    def __post_init__(self) -> None:
        if self.available:
            raise ResultsFormatError(f"an Unavailable record of '{self.metric}' must have available=false")


@dataclass(frozen=True, kw_only=True)
class Available:
    """The availability record of a metric that ran."""

    available: bool = True

    def __post_init__(self) -> None:
        if not self.available:
            raise ResultsFormatError("an Available record must have available=true")


@dataclass(frozen=True, kw_only=True)
class Paired:
    """Two sets whose manifests pair up: ``n`` pairs, ``unpaired`` images left over in each set."""

    n: int
    unpaired: list[int]
    available: bool = True


@dataclass(frozen=True, kw_only=True)
class PerceptualModel:
    """Which perceptual model produced an LPIPS-family value (ST-LPIPS is not comparable with LPIPS)."""

    label: str
    model: str
    comparable_with_lpips: bool


# ----------------------------------------------------------------------------------------------- per set


@dataclass(frozen=True, kw_only=True)
class SpectralSet:
    """A set's spectra: the mean RAPSD over ``rho`` bin centres and per-image scalars (``hf_ratio@c``, ...)."""

    n: int
    rho: list[float]
    mean_rapsd: list[float]
    slope_of_mean_rapsd: float
    scalars: dict[str, Interval]
    per_group: dict[str, dict[str, Interval]] | None = None  # scalar -> group -> interval


@dataclass(frozen=True, kw_only=True)
class Top1:
    """How often an image's own text is the closest of the set's distinct texts (zero-shot class accuracy)."""

    accuracy: Interval
    candidates: int
    chance: float
    per_group: dict[str, Interval] | None = None


@dataclass(frozen=True, kw_only=True)
class ClipScoreResult:
    """Per-image cosines of image and caption embeddings: raw mean (DMD2), x100 and Hessel's clamped CLIP-S."""

    mean_cos: Interval
    x100: Interval
    hessel: Interval
    convention: str
    per_group: dict[str, Interval] | None = None
    top1: Top1 | None = None


@dataclass(frozen=True, kw_only=True)
class Diversity:
    """Mean pairwise perceptual distance over seeds within a group, then over groups (CI over groups)."""

    mean: Interval
    n_groups: int
    k_per_group: list[int]
    per_group: dict[str, float]
    model: PerceptualModel
    definition: str


@dataclass(frozen=True, kw_only=True)
class SetResult:
    """One image folder: where it is, what it holds, and its per-set metrics."""

    role: str  # samples | reference
    path: str
    n: int
    resolution: list[int]
    native_resolution: list[int]
    manifest: bool
    pairable: bool
    groups: int
    resize: dict[str, Any] | None
    file_format: list[str]
    seeds: dict[str, int] | None
    spectral: SpectralSet | None = None
    clip_score: ClipScoreResult | Unavailable | None = None
    lpips_diversity: Diversity | Unavailable | None = None


# ----------------------------------------------------------------------------------------------- comparisons


@dataclass(frozen=True, kw_only=True)
class GroupGap:
    """The HF gap of one group, against the same group of the reference (or all of it, ``reference_group="all"``)."""

    gap: Interval
    reference_group: str


@dataclass(frozen=True, kw_only=True)
class SpectralComparison:
    """Spectral gaps of a sample set vs a reference at cutoff ``c``; paired statistics where the sets pair up."""

    c: float
    hf_gap_db: Interval
    lsd_db: Interval
    gap_db_curve: list[float]
    paired_log_hf_ratio: Interval | Unavailable
    per_group_hf_gap_db: dict[str, GroupGap] | None = None
    paired_diff: dict[str, Interval] | None = None


@dataclass(frozen=True, kw_only=True)
class Fidelity:
    """Perceptual distance between paired images (same noise and condition)."""

    mean: Interval
    n: int
    model: PerceptualModel
    per_group: dict[str, Interval] | None = None


@dataclass(frozen=True, kw_only=True)
class DistributionDistance:
    """FD or CMMD between two sets' features, with its bootstrap interval."""

    value: Interval
    feature_space: str
    feature_dim: int


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """``samples`` vs ``reference`` (kind ``reference``: the reference folder; ``baseline``: the teacher set)."""

    name: str
    samples: str
    reference: str
    kind: str
    pairing: Paired | Unavailable
    verdict: str
    spectral: SpectralComparison | None = None
    lpips_fidelity: Fidelity | Unavailable | None = None
    clip_score_diff: Interval | None = None
    fd: DistributionDistance | Unavailable | None = None
    cmmd: DistributionDistance | Unavailable | None = None


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """Everything ``dmd-dar eval`` measured, as written to ``metrics.json``."""

    protocol: dict[str, Any]  # a record of how it was computed (config, models, versions): read by people
    availability: dict[str, Available | Unavailable]
    sets: dict[str, SetResult]
    comparisons: list[Comparison]
    bench: dict[str, Any] | None = None
    format: str = SCHEMA

    def __post_init__(self) -> None:
        if self.format != SCHEMA:
            raise ResultsFormatError(f"metrics file format {self.format!r} is not {SCHEMA!r}: rerun `dmd-dar eval` "
                                     "with this version to rewrite it")

    @property
    def verdicts(self) -> list[str]:
        return [c.verdict for c in self.comparisons]

    @property
    def hf_cutoff(self) -> float:
        """The rho cutoff of the HF gap and of the paired log HF ratio."""
        return float(self.protocol["config"]["hf_cutoff"])

    def comparison(self, samples: str, kind: str) -> Comparison | None:
        """The comparison of set ``samples`` of ``kind`` (``reference`` or ``baseline``), if it was made."""
        return next((c for c in self.comparisons if c.samples == samples and c.kind == kind), None)

    def to_json(self) -> dict[str, Any]:
        return to_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Evaluation:
        fmt = data.get("format") if isinstance(data, dict) else None
        if fmt != SCHEMA:  # before any field: another version differs in many, and its version is the news
            raise ResultsFormatError(f"metrics file format {fmt!r} is not {SCHEMA!r}: rerun `dmd-dar eval` with "
                                     "this version to rewrite it")
        return from_json(cls, data)

    @classmethod
    def load(cls, path: str | Path) -> Evaluation:
        """Read ``metrics.json`` (a file, or a folder holding one)."""
        p = Path(path)
        p = p / "metrics.json" if p.is_dir() else p
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise UserError(f"{p} not found: run `dmd-dar eval` first") from None
        except json.JSONDecodeError as err:
            raise ResultsFormatError(f"{p} is not valid JSON ({err.msg}): rerun `dmd-dar eval`") from None
        try:
            return cls.from_json(data)
        except ResultsFormatError as err:
            raise ResultsFormatError(f"{p}: {err}") from None


def headline(result: Any) -> Interval | Unavailable | None:
    """The one interval a table shows for a result: the interval itself, a perceptual distance's or CLIP score's
    mean, a distribution distance's value; an :class:`Unavailable` record as it is; None for anything else."""
    if isinstance(result, Fidelity | Diversity):
        return result.mean
    if isinstance(result, ClipScoreResult):
        return result.mean_cos
    if isinstance(result, DistributionDistance):
        return result.value
    if isinstance(result, Interval | Unavailable):
        return result
    return None


# ----------------------------------------------------------------------------------------------- (de)serialising


def to_json(obj: Any) -> Any:
    """Dataclasses -> dicts (every field, in declaration order), NaN / inf -> None, numpy scalars -> numbers."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def from_json(cls: type[T], data: Any, where: str = "") -> T:
    """Rebuild ``cls`` from :func:`to_json`'s output; any mismatch is a :class:`ResultsFormatError` naming where."""
    return _parse(cls, data, where or cls.__name__)


def _fail(where: str, msg: str) -> ResultsFormatError:
    return ResultsFormatError(f"{where}: {msg}")


def _parse(tp: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _parse(option, data, where)
            except ResultsFormatError as err:
                errors.append(str(err))
        raise _fail(where, "matches none of " + " | ".join(getattr(o, "__name__", str(o)) for o in options)
                    + f" ({'; '.join(errors)})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise _fail(where, f"expected an object for {tp.__name__}, got {type(data).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise _fail(where, f"unknown field(s) {unknown} for {tp.__name__}")
        kwargs = {}
        for name, f in fields.items():
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise _fail(f"{where}.{name}", f"missing (a required field of {tp.__name__})")
                continue
            kwargs[name] = _parse(hints[name], data[name], f"{where}.{name}")
        try:
            return tp(**kwargs)
        except ResultsFormatError as err:
            raise _fail(where, str(err)) from None
    if origin is dict:
        key_t, val_t = typing.get_args(tp)
        if not isinstance(data, dict):
            raise _fail(where, f"expected an object, got {type(data).__name__}")
        return {k: _parse(val_t, v, f"{where}[{k!r}]") for k, v in data.items()}
    if origin is list:
        (item_t,) = typing.get_args(tp)
        if not isinstance(data, list):
            raise _fail(where, f"expected a list, got {type(data).__name__}")
        return [_parse(item_t, v, f"{where}[{i}]") for i, v in enumerate(data)]
    if tp is Any:
        return data
    if tp is float:
        if data is None:  # to_json writes NaN / inf as null
            return math.nan
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise _fail(where, f"expected a number, got {data!r}")
        return float(data)
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise _fail(where, f"expected an integer, got {data!r}")
        return data
    if tp in (str, bool):
        if not isinstance(data, tp):
            raise _fail(where, f"expected {tp.__name__}, got {data!r}")
        return data
    if tp is type(None):
        if data is not None:
            raise _fail(where, f"expected null, got {data!r}")
        return None
    raise _fail(where, f"cannot read type {tp!r}")  # a field type this reader does not know: a bug here
