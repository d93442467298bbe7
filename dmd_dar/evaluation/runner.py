"""``dmd-dar eval``: metrics of sample folders vs a reference and vs a baseline (teacher), with bootstrap CIs.

Flow: read every folder (:class:`ImageSet`: one-line errors for unreadable or mixed-size images), check the
resolutions (a reference at another resolution is an error unless ``resize_reference=true``), compute per-set
metrics (spectral scalars, CLIP score, LPIPS diversity) and per-comparison metrics (HF gap / LSD / per-class gap,
paired log HF ratio and paired differences where the manifests pair up, LPIPS fidelity, FD, CMMD), then write
``metrics.json`` (:class:`~dmd_dar.evaluation.results.Evaluation`) and, by default, ``report.html``.

Every number is computed by ``dmd_dar.metrics`` (pure functions, accumulators and their bootstraps); this module
only decides what to compare and records the results. A metric whose backbone weights are not on this machine is
recorded as :class:`~dmd_dar.evaluation.results.Unavailable` and the rest still runs (``strict=true`` makes that
an error). Paired metrics need manifests whose (condition, seed, index) keys match.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from dmd_dar.config import to_dict
from dmd_dar.errors import UserError
from dmd_dar.evaluation.backbones import Backbones
from dmd_dar.evaluation.config import EvalConfig
from dmd_dar.evaluation.images import ImageSet
from dmd_dar.evaluation.report import write_report
from dmd_dar.evaluation.results import (
    Available,
    ClipScoreResult,
    Comparison,
    DistributionDistance,
    Diversity,
    Evaluation,
    Fidelity,
    GroupGap,
    Paired,
    PerceptualModel,
    SetResult,
    SpectralComparison,
    SpectralSet,
    Top1,
    Unavailable,
)
from dmd_dar.evaluation.suite import prepare_suite
from dmd_dar.metrics.availability import MetricUnavailable
from dmd_dar.metrics.bootstrap import Interval, bootstrap_ci, paired_bootstrap_ci, sub_seed
from dmd_dar.metrics.clip_score import clip_cosines
from dmd_dar.metrics.distribution import CMMD_SCALE, cmmd_interval, fd_interval
from dmd_dar.metrics.lpips_metric import lpips_distance, pairwise_lpips
from dmd_dar.metrics.pairing import pair_by_key
from dmd_dar.metrics.protocol import package_versions
from dmd_dar.metrics.spectral import SpectralAccumulator, gap_interval, paired_log_hf_ratio, spectral_gap_db
from dmd_dar.utils.io import atomic_write_json

_LPIPS_MIN_SIDE = {"alex": 32, "alexnet": 32, "vgg": 16, "vgg16": 16, "stlpips_alex": 21}  # below this the trunk's pooling fails
T = TypeVar("T")


class Evaluator:
    """One evaluation run (see the module docstring). ``compute()`` returns the typed :class:`Evaluation`."""

    def __init__(self, cfg: EvalConfig, extra_protocol: dict[str, Any] | None = None) -> None:
        if not cfg.samples:
            raise UserError("eval needs at least one sample folder: samples=[dir1,dir2] (or suite=<protocol.yaml>)")
        self.cfg = cfg
        self.extra_protocol = extra_protocol or {}
        names = cfg.names or [Path(s).resolve().name for s in cfg.samples]
        if len(set(names)) != len(names) or cfg.reference_name in names:
            raise UserError(f"sample set names {names} (and reference_name '{cfg.reference_name}') must be unique; "
                            "pass names=[...]")
        tmpl, src = cfg.clip.class_template, cfg.clip.text_source
        self.sets = [ImageSet(n, p, tmpl, src) for n, p in zip(names, cfg.samples)]
        self.ref = ImageSet(cfg.reference_name, cfg.reference, tmpl, src) if cfg.reference else None
        first = self.sets[0]
        for s in self.sets[1:]:
            if s.size != first.size:
                raise UserError(f"sample set '{s.name}' ({s.path}) is {s.size[1]}x{s.size[0]} but '{first.name}' is "
                                f"{first.size[1]}x{first.size[0]}: sample sets must share one resolution")
        if self.ref is not None and self.ref.size != first.size:
            h, w = self.ref.size
            if not cfg.resize_reference:
                raise UserError(f"reference {self.ref.path} is {w}x{h} but the samples are {first.size[1]}x"
                                f"{first.size[0]}: spectra are only comparable at one resolution; render the "
                                "reference at the samples' resolution, or pass resize_reference=true "
                                f"(resize_filter={cfg.resize_filter})")
            self.ref.resize_to(first.size, cfg.resize_filter)
            print(f"eval: resizing reference {w}x{h} -> {first.size[1]}x{first.size[0]} ({cfg.resize_filter})")
        self.backbones = Backbones(cfg)
        self.availability: dict[str, Available | Unavailable] = {m: Available() for m in cfg.metrics}
        names_all = [s.name for s in self.all_sets]
        self.baseline = cfg.baseline if cfg.baseline is not None else (names[0] if len(names) >= 2 else None)
        if self.baseline is not None and self.baseline not in names:
            raise UserError(f"baseline={self.baseline!r} is not one of the sample sets {names_all}")
        self._spectral_cutoffs = sorted({0.25, 0.5, 0.75, float(cfg.hf_cutoff)})
        self._spec: dict[str, dict[str, torch.Tensor]] = {}  # set -> per-image spectral values
        self._img_emb: dict[str, torch.Tensor] = {}
        self._cos: dict[str, torch.Tensor] = {}
        self._feat: dict[str, np.ndarray] = {}

    @property
    def all_sets(self) -> list[ImageSet]:
        return self.sets + ([self.ref] if self.ref is not None else [])

    # ------------------------------------------------------------------------------------------- helpers

    def _want(self, metric: str) -> bool:
        return metric in self.cfg.metrics

    def _try(self, metric: str, fn: Callable[..., T], *args: Any) -> T | Unavailable:
        """Run ``fn``; a missing backbone becomes an availability record (or an error with strict=true)."""
        try:
            return fn(*args)
        except MetricUnavailable as err:
            if self.cfg.strict:
                raise
            rec = Unavailable(metric=metric, needs=err.needs, reason=err.reason)
            self.availability[metric] = rec
            return rec

    def _mean_ci(self, values: Any, name: str) -> Interval:
        """Bootstrap CI of the mean of per-sample values (non-finite values dropped), seeded by its name."""
        v = torch.as_tensor(values, dtype=torch.float64).cpu().numpy().reshape(-1)
        cfg = self.cfg
        return bootstrap_ci(v[np.isfinite(v)], np.mean, cfg.bootstrap, cfg.confidence, sub_seed(cfg.seed, name))

    def _paired_diff_ci(self, a: Any, b: Any, name: str) -> Interval:
        """CI of ``mean(a_i - b_i)`` over the pairs where both are finite."""
        a, b = (torch.as_tensor(v, dtype=torch.float64).cpu().numpy() for v in (a, b))
        ok = np.isfinite(a) & np.isfinite(b)
        cfg = self.cfg
        return paired_bootstrap_ci(a[ok], b[ok], np.mean, cfg.bootstrap, cfg.confidence, sub_seed(cfg.seed, name))

    def _gap_ci(self, a: torch.Tensor, b: torch.Tensor, statistic: str, name: str, paired: bool) -> Interval:
        cfg = self.cfg
        return gap_interval(a, b, statistic, cfg.hf_cutoff, cfg.bootstrap, cfg.confidence, sub_seed(cfg.seed, name),
                            paired)

    def _groups_ci(self, s: ImageSet, values: torch.Tensor, name: str) -> dict[str, Interval]:
        return {g: self._mean_ci(values[idx], f"{name}/{g}") for g, idx in s.group_indices().items()}

    # ------------------------------------------------------------------------------------------- per set

    def _spectral_accumulator(self) -> SpectralAccumulator:
        return SpectralAccumulator(bins=self.cfg.spectral_bins, cutoffs=self._spectral_cutoffs)

    def _spectral(self, s: ImageSet) -> SpectralSet:
        acc = self._spectral_accumulator()
        for idx, x in s.batches(self.cfg.batch_size):
            acc.update(x, groups=[s.groups[i] for i in idx])
        self._spec[s.name] = {n: acc.values(n) for n in ["rapsd", *acc.scalar_names]}
        res = acc.compute()
        scalars = {n: self._mean_ci(acc.values(n), f"{s.name}/spectral/{n}") for n in acc.scalar_names}
        per_group = ({n: self._groups_ci(s, acc.values(n), f"{s.name}/spectral/{n}") for n in acc.scalar_names}
                     if s.has_groups else None)
        return SpectralSet(n=res["n"], rho=res["rho"], mean_rapsd=res["mean_rapsd"],
                           slope_of_mean_rapsd=res["slope_of_mean_rapsd"], scalars=scalars, per_group=per_group)

    def _clip_set(self, s: ImageSet) -> ClipScoreResult | Unavailable:
        model = self._try("clip_score", self.backbones.clip)
        if isinstance(model, Unavailable):
            return model
        if any(c is None for c in s.captions):
            return Unavailable(metric="clip_score", needs=f"a 'caption' or 'class_name' in every record of "
                               f"{s.path}/manifest.jsonl", reason="CLIP score needs the prompt of each image")
        emb = self._image_embeddings(s, model)  # [N, D]
        uniq = list(dict.fromkeys(s.captions))
        temb = model.encode_texts(uniq, self.cfg.clip.prefix)  # [U, D]
        row = {c: i for i, c in enumerate(uniq)}
        own = torch.tensor([row[c] for c in s.captions], device=emb.device)  # [N]: each image's text in temb
        cos = clip_cosines(emb, temb[own])  # [N]
        self._cos[s.name] = cos
        mean = self._mean_ci(cos, f"{s.name}/clip_score")
        return ClipScoreResult(
            mean_cos=mean, x100=mean.scaled(100.0),
            hessel=self._mean_ci(cos.clamp_min(0), f"{s.name}/clip_score/hessel").scaled(2.5),
            convention="mean_cos: raw mean cosine (DMD2); x100: 100 * mean; hessel: 2.5 * mean(max(cos, 0))",
            per_group=self._groups_ci(s, cos, f"{s.name}/clip_score") if s.has_groups else None,
            top1=self._caption_top1(s, emb, temb, own) if len(uniq) >= 2 else None)

    def _caption_top1(self, s: ImageSet, emb: torch.Tensor, temb: torch.Tensor, own: torch.Tensor,
                      rows_per_chunk: int = 1024) -> Top1:
        """How often an image's own text is the closest of the set's distinct texts: with class prompts
        (clip.text_source=class) the zero-shot class accuracy, "is each sample recognisably its class"; with one
        prompt per image, prompt retrieval (R-precision style). Chance is 1 / (number of distinct texts)."""
        # In row chunks: with one prompt per image the full [N, U] similarity matrix is N^2 (3.6 GB at 30k prompts).
        hit = torch.cat([(emb[i:i + rows_per_chunk] @ temb.T).argmax(1) == own[i:i + rows_per_chunk]
                         for i in range(0, len(emb), rows_per_chunk)]).float()  # [N]
        return Top1(accuracy=self._mean_ci(hit, f"{s.name}/clip_score/top1"), candidates=int(temb.shape[0]),
                    chance=1.0 / temb.shape[0],
                    per_group=self._groups_ci(s, hit, f"{s.name}/clip_score/top1") if s.has_groups else None)

    def _image_embeddings(self, s: ImageSet, model) -> torch.Tensor:
        if s.name not in self._img_emb:
            parts = [model.encode_images(x) for _, x in s.batches(self.cfg.batch_size)]
            self._img_emb[s.name] = torch.cat(parts)  # [N, D] L2-normalised
        return self._img_emb[s.name]

    def _features(self, s: ImageSet) -> np.ndarray:
        if s.name not in self._feat:
            ext = self.backbones.features()
            if self.cfg.features.space == "clip":
                f = self._image_embeddings(s, ext.model)
            else:
                f = torch.cat([ext(x) for _, x in s.batches(self.cfg.batch_size)])
            self._feat[s.name] = f.double().cpu().numpy()
        return self._feat[s.name]

    def _lpips_too_small(self, metric: str, s: ImageSet) -> Unavailable | None:
        need = _LPIPS_MIN_SIDE.get(self.cfg.lpips.net, 32)  # auto: 32, the stricter of alex / ST-LPIPS
        if min(s.size) < need:
            return Unavailable(metric=metric, needs=f"images of at least {need}x{need} px",
                               reason=f"the LPIPS {self.cfg.lpips.net} trunk cannot run on {s.size[1]}x{s.size[0]} "
                                      "images")
        return None

    def _lpips_model(self, metric: str, s: ImageSet):
        """The LPIPS-family model ``metric`` runs on set ``s``, or why it cannot: images too small for its trunk,
        or its weights missing (recorded in the availability map)."""
        return self._lpips_too_small(metric, s) or self._try(metric, self.backbones.lpips)

    @staticmethod
    def _perceptual_model(model) -> PerceptualModel:
        """Which perceptual model produced a value (ST-LPIPS values are not comparable with LPIPS values)."""
        return PerceptualModel(label=model.label, model=model.display_name,
                               comparable_with_lpips=model.label == "LPIPS")

    def _diversity(self, s: ImageSet) -> Diversity | Unavailable:
        model = self._lpips_model("lpips_diversity", s)
        if isinstance(model, Unavailable):
            return model
        groups = {g: idx[: self.cfg.diversity_max_per_group] for g, idx in s.group_indices().items() if len(idx) > 1}
        if not groups:
            return Unavailable(metric="lpips_diversity", needs=f"groups (class_id/class_name or caption) with >= 2 "
                               f"images in {s.path}/manifest.jsonl",
                               reason="diversity is measured over seeds within a group")
        per = {g: float(pairwise_lpips(model, s.load(idx)).mean()) for g, idx in groups.items()}
        vals = torch.tensor(list(per.values()), dtype=torch.float64)
        return Diversity(mean=self._mean_ci(vals, f"{s.name}/lpips_diversity"), n_groups=len(per),
                         k_per_group=sorted({len(i) for i in groups.values()}), per_group=per,
                         model=self._perceptual_model(model),
                         definition=f"per group: mean {model.label} over all pairs of its first K images; then mean "
                                    "over groups (CI over groups)")

    # ------------------------------------------------------------------------------------------- comparisons

    def _pairing(self, a: ImageSet, b: ImageSet) -> tuple[list[int], list[int], Paired | Unavailable]:
        why = "paired metrics match images by (condition, seed, index) from manifests"
        if a.keys is None or b.keys is None:
            needs = a.key_problem if a.keys is None else b.key_problem
            return [], [], Unavailable(metric="pairing", needs=needs, reason=why)
        try:
            ia, ib = pair_by_key(a.keys, b.keys, require_all=False)
        except UserError as e:
            return [], [], Unavailable(metric="pairing", needs="unique (condition, seed, index) keys", reason=str(e))
        if not ia:
            return [], [], Unavailable(metric="pairing", needs=f"'{a.name}' and '{b.name}' sampled with the same "
                                       "seeds and classes/prompts", reason="no manifest keys in common")
        return ia, ib, Paired(n=len(ia), unpaired=[len(a) - len(ia), len(b) - len(ib)])

    def _compare(self, a: ImageSet, b: ImageSet, kind: str) -> Comparison:
        tag = f"{a.name}~{b.name}"
        ia, ib, pairing = self._pairing(a, b)
        paired = isinstance(pairing, Paired)
        fields: dict[str, Any] = {}
        if self._want("spectral"):
            fields["spectral"] = self._compare_spectral(a, b, ia, ib, pairing, tag)
        if self._want("lpips_fidelity"):
            fields["lpips_fidelity"] = self._fidelity_or_why(a, b, ia, ib, pairing, tag)
        if self._want("clip_score") and a.name in self._cos and b.name in self._cos and paired:
            fields["clip_score_diff"] = self._paired_diff_ci(self._cos[a.name][ia], self._cos[b.name][ib],
                                                             f"{tag}/clip_diff")
        for metric in ("fd", "cmmd"):
            if self._want(metric):
                fields[metric] = self._distribution(metric, a, b, tag)
        draft = Comparison(name=f"{a.name} vs {b.name}", samples=a.name, reference=b.name, kind=kind,
                           pairing=pairing, verdict="", **fields)
        return dataclasses.replace(draft, verdict=verdict(draft))

    def _compare_spectral(self, a: ImageSet, b: ImageSet, ia: list[int], ib: list[int],
                          pairing: Paired | Unavailable, tag: str) -> SpectralComparison:
        cfg = self.cfg
        sa, sb = self._spec[a.name], self._spec[b.name]
        full_pair = isinstance(pairing, Paired) and len(ia) == len(a) == len(b)
        ra, rb = sa["rapsd"], sb["rapsd"]
        if full_pair:  # same images, same order of noise: resample pairs together
            ra, rb = ra[ia], rb[ib]
        per_group = None
        if a.has_groups:
            ref_groups = b.group_indices()
            per_group = {}
            for g, idx in a.group_indices().items():
                ridx = ref_groups.get(g)
                gap = self._gap_ci(sa["rapsd"][idx], sb["rapsd"][ridx] if ridx else sb["rapsd"], "hf_gap_db",
                                   f"{tag}/hf_gap_db/{g}", paired=False)
                per_group[g] = GroupGap(gap=gap, reference_group=g if ridx else "all")
        name = f"hf_ratio@{cfg.hf_cutoff:g}"
        if isinstance(pairing, Paired):
            log_ratio = paired_log_hf_ratio(sa[name][ia], sb[name][ib], cfg.hf_cutoff)
            paired_log: Interval | Unavailable = self._mean_ci(log_ratio, f"{tag}/paired_log_hf_ratio")
            paired_diff = {n: self._paired_diff_ci(sa[n][ia], sb[n][ib], f"{tag}/paired_diff/{n}")
                           for n in sa if n != "rapsd"}
        else:
            paired_log = Unavailable(metric="paired_log_hf_ratio", needs=pairing.needs, reason=pairing.reason)
            paired_diff = None
        return SpectralComparison(
            c=cfg.hf_cutoff,
            hf_gap_db=self._gap_ci(ra, rb, "hf_gap_db", f"{tag}/hf_gap_db", full_pair),
            lsd_db=self._gap_ci(ra, rb, "lsd_db", f"{tag}/lsd_db", full_pair),
            gap_db_curve=spectral_gap_db(ra, rb).tolist(),
            paired_log_hf_ratio=paired_log, per_group_hf_gap_db=per_group, paired_diff=paired_diff)

    def _fidelity_or_why(self, a: ImageSet, b: ImageSet, ia: list[int], ib: list[int],
                         pairing: Paired | Unavailable, tag: str) -> Fidelity | Unavailable:
        if isinstance(pairing, Unavailable):
            return Unavailable(metric="lpips_fidelity", needs=pairing.needs, reason=pairing.reason)
        model = self._lpips_model("lpips_fidelity", a)
        if isinstance(model, Unavailable):
            return model
        bs = self.cfg.batch_size
        v = torch.cat([lpips_distance(model, a.load(ia[i:i + bs]), b.load(ib[i:i + bs]))
                       for i in range(0, len(ia), bs)])  # [n pairs]
        buckets: dict[str, list[int]] = {}
        for k, g in enumerate(a.groups[i] for i in ia):
            if g is not None:
                buckets.setdefault(g, []).append(k)
        per_group = {g: self._mean_ci(v[k], f"{tag}/lpips_fidelity/{g}") for g, k in buckets.items()} or None
        return Fidelity(mean=self._mean_ci(v, f"{tag}/lpips_fidelity"), n=len(v),
                        model=self._perceptual_model(model), per_group=per_group)

    def _distribution(self, metric: str, a: ImageSet, b: ImageSet, tag: str) -> DistributionDistance | Unavailable:
        cfg = self.cfg
        fa = self._try(metric, self._features, a)
        if isinstance(fa, Unavailable):
            return fa
        fb = self._try(metric, self._features, b)
        if isinstance(fb, Unavailable):
            return fb
        if len(fa) < 2 or len(fb) < 2:
            return Unavailable(metric=metric, needs="at least 2 images per set", reason="too few images")
        seed = sub_seed(cfg.seed, f"{tag}/{metric}")
        if metric == "fd":
            value = fd_interval(fa, fb, cfg.bootstrap_fd, cfg.confidence, seed)
        else:
            f = cfg.features
            value = cmmd_interval(fa, fb, f.cmmd_sigma, CMMD_SCALE, f.cmmd_estimator, cfg.bootstrap, cfg.confidence,
                                  seed)
        return DistributionDistance(value=value, feature_space=cfg.features.space, feature_dim=int(fa.shape[1]))

    # ------------------------------------------------------------------------------------------- run

    def _set_result(self, s: ImageSet) -> SetResult:
        fields: dict[str, Any] = {}
        if self._want("spectral"):
            fields["spectral"] = self._spectral(s)
        if self._want("clip_score"):
            fields["clip_score"] = self._clip_set(s)
        if self._want("lpips_diversity") and s is not self.ref:
            fields["lpips_diversity"] = self._diversity(s)
        print(f"eval: {s.name}: {len(s)} images at {s.size[1]}x{s.size[0]}")
        return SetResult(role="reference" if s is self.ref else "samples", **s.describe(),
                         seeds=_seed_summary(s.records), **fields)

    def compute(self) -> Evaluation:
        sets = {s.name: self._set_result(s) for s in self.all_sets}
        comparisons = []
        if self.ref is not None:
            comparisons += [self._compare(s, self.ref, "reference") for s in self.sets]
        if self.baseline is not None:
            base = next(s for s in self.sets if s.name == self.baseline)
            comparisons += [self._compare(s, base, "baseline") for s in self.sets if s is not base]
        return Evaluation(protocol=self.protocol(), availability=self.availability, sets=sets,
                          comparisons=comparisons, bench=load_bench(self.cfg.bench_json) if self.cfg.bench_json else None)

    def protocol(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "dmd-dar eval", "config": to_dict(cfg), "resolution": list(self.sets[0].size),
            "n": {s.name: len(s) for s in self.all_sets}, "sets": {s.name: s.describe() for s in self.all_sets},
            "baseline": self.baseline, "reference": self.ref.name if self.ref else None,
            "models": self.backbones.protocols(),
            "spectral": self._spectral_accumulator().protocol() if self._want("spectral") else None,
            "preprocessing": {
                "decode": "PNG/JPEG -> RGB uint8 -> float [-1, 1] (x / 127.5 - 1), native resolution",
                "reference_resize": self.ref.resize if self.ref else None,
                "clip": {"prefix": cfg.clip.prefix, "class_template": cfg.clip.class_template,
                         "text_source": cfg.clip.text_source, "pre_resize": cfg.clip.pre_resize},
                "lpips": "[-1, 1], native resolution", "features": cfg.features.space},
            "bootstrap": {"n_boot": cfg.bootstrap, "n_boot_fd": cfg.bootstrap_fd, "confidence": cfg.confidence,
                          "seed": cfg.seed, "method": "percentile; per-quantity seeds derived from `seed` and the "
                          "quantity's name; paired sets resample pairs together, others each set independently; "
                          "set-level statistics (HF gap, LSD, FD, CMMD) through per-image resample counts, the "
                          "estimate being the same function at counts of one"},
            "seeds": {"eval": cfg.seed, **{s.name: _seed_summary(s.records) for s in self.all_sets}},
            "package_versions": package_versions(("torch", "torchvision", "numpy", "scipy", "open_clip_torch",
                                                  "lpips", "stlpips-pytorch", "safetensors", "pillow",
                                                  "matplotlib")),
            **self.extra_protocol,
        }


def _seed_summary(records: list[dict[str, Any]]) -> dict[str, int] | None:
    seeds = [r["seed"] for r in records if isinstance(r.get("seed"), int)]
    if not seeds:
        return None
    return {"unique": len(set(seeds)), "min": min(seeds), "max": max(seeds)}


def load_bench(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"bench_json {p} not found; write it with `python eval/bench_metrics.py --json {p}`") from None
    except json.JSONDecodeError as e:
        raise UserError(f"bench_json {p} is not valid JSON ({e.msg}); rerun eval/bench_metrics.py") from None


def _fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else "nan"


def verdict(comp: Comparison) -> str:
    """One line per comparison, e.g. ``student loses 3.1 dB [2.5, 3.8] of high-frequency energy vs reference``."""
    a, b = comp.samples, comp.reference
    parts = []
    sp = comp.spectral
    if sp is not None:
        g = sp.hf_gap_db
        if g.estimate < 0:
            head = f"{a} loses {_fmt(-g.estimate)} dB [{_fmt(-g.high)}, {_fmt(-g.low)}]"
        else:
            head = f"{a} gains {_fmt(g.estimate)} dB [{_fmt(g.low)}, {_fmt(g.high)}]"
        sig = "significant" if g.excludes(0.0) else "not significant (the CI includes 0)"
        parts.append(f"{head} of high-frequency energy (rho >= {sp.c:g}) vs {b}; {sig}")
        pl = sp.paired_log_hf_ratio
        if isinstance(pl, Interval):
            parts.append(f"paired log HF ratio {_fmt(pl.estimate)} [{_fmt(pl.low)}, {_fmt(pl.high)}]")
    else:
        parts.append(f"{a} vs {b}")
    lf = comp.lpips_fidelity
    if isinstance(lf, Fidelity):
        m = lf.mean
        parts.append(f"{lf.model.label} fidelity {_fmt(m.estimate)} [{_fmt(m.low)}, {_fmt(m.high)}]")
    for d, label in ((comp.fd, "FD"), (comp.cmmd, "CMMD")):
        if isinstance(d, DistributionDistance):
            v = d.value
            parts.append(f"{label} {_fmt(v.estimate)} [{_fmt(v.low)}, {_fmt(v.high)}]")
    return "; ".join(parts)


def evaluate(cfg: EvalConfig, extra_protocol: dict[str, Any] | None = None) -> Evaluation:
    """Compute every metric of ``cfg`` and return the typed result (nothing written)."""
    return Evaluator(cfg, extra_protocol).compute()


def run(cfg: EvalConfig) -> Path:
    """``dmd-dar eval``: evaluate (generating a suite's missing folders first), write metrics.json + report."""
    extra: dict[str, Any] = {}
    if cfg.suite:
        cfg, extra = prepare_suite(cfg)
    out_dir = Path(cfg.out_dir or "runs/eval")
    result = evaluate(cfg, extra)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = atomic_write_json(result.to_json(), out_dir / "metrics.json")
    spectra = {n: e.spectral for n, e in result.sets.items() if e.spectral is not None}
    np.savez(out_dir / "rapsd.npz", **{f"{n}_mean_rapsd": np.asarray(sp.mean_rapsd) for n, sp in spectra.items()},
             rho=np.asarray(next(iter(spectra.values())).rho if spectra else []))
    for v in result.verdicts:
        print(f"eval: {v}")
    for m, rec in result.availability.items():
        if isinstance(rec, Unavailable):
            print(f"eval: {m} unavailable: needs {rec.needs}")
    print(f"eval: wrote {path}")
    if cfg.report:
        print(f"eval: wrote {write_report(result, out_dir)}")
    return path
