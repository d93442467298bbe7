"""``dmd-dar eval``: metrics of sample folders vs a reference and vs a baseline (teacher), with bootstrap CIs.

Flow: read every folder (:class:`ImageSet`: one-line errors for unreadable or mixed-size images), check the
resolutions (a reference at another resolution is an error unless ``resize_reference=true``), compute per-set
metrics (spectral scalars, CLIP score, LPIPS diversity) and per-comparison metrics (HF gap / LSD / per-class gap,
paired log HF ratio and paired differences where the manifests pair up, LPIPS fidelity, FD, CMMD), then write
``metrics.json`` with the full protocol and, by default, ``report.html``. A metric whose backbone weights are not
on this machine is recorded as ``{"available": false, "needs": ...}`` and the rest still runs (``strict=true``
makes that an error). Paired metrics need manifests whose (condition, seed, index) keys match.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmd_dar.errors import UserError
from dmd_dar.evaluation import stats as S
from dmd_dar.evaluation.config import EvalConfig
from dmd_dar.evaluation.images import ImageSet
from dmd_dar.metrics.availability import MetricUnavailable
from dmd_dar.metrics.pairing import pair_by_key
from dmd_dar.metrics.protocol import package_versions
from dmd_dar.metrics.spectral import SpectralAccumulator
from dmd_dar.utils.io import atomic_write_json

PACKAGE_DIR = Path(__file__).resolve().parents[1]
FORMAT = "dmd_dar.eval/1"
_LPIPS_MIN_SIDE = {"alex": 32, "alexnet": 32, "vgg": 16, "vgg16": 16, "stlpips_alex": 21}  # below this the trunk's pooling fails


def resolve_asset(path: str | None) -> str | None:
    """A path as given, or under the installed package when it is a relative ``assets/...`` path not found here."""
    if path is None:
        return None
    p = Path(path)
    if p.exists() or p.is_absolute() or (p.parts and p.parts[0] != "assets"):
        return str(p)
    return str(PACKAGE_DIR / p)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Backbones:
    """Metric networks, built once on first use; a missing weights file raises :class:`MetricUnavailable`."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        self.device = _device(cfg.device)
        self._built: dict[str, Any] = {}
        self.lpips_selection: dict[str, Any] | None = None

    def _get(self, key: str, build):
        if key not in self._built:
            try:
                self._built[key] = build()
            except MetricUnavailable as err:
                self._built[key] = err
        got = self._built[key]
        if isinstance(got, MetricUnavailable):
            raise got
        return got

    def lpips(self):
        """The LPIPS-family model of ``cfg.lpips.net`` (``auto``: standard alex if its trunk file is here, else
        ST-LPIPS); the choice is recorded in ``protocol.models.lpips.selection``."""
        from dmd_dar.metrics.lpips_metric import LpipsModel
        from dmd_dar.metrics.stlpips_metric import StLpipsModel

        c = self.cfg.lpips

        def build():
            if c.net == "stlpips_alex":
                self.lpips_selection = {"requested": c.net, "ran": "stlpips_alex"}
                return StLpipsModel(device=self.device)
            net = "alex" if c.net == "auto" else c.net
            try:
                model = LpipsModel(net, resolve_asset(c.backbone_weights), device=self.device,
                                   random_backbone=c.random_backbone, seed=self.cfg.seed)
            except MetricUnavailable as err:
                if c.net != "auto" or c.backbone_weights is not None:
                    raise
                try:
                    model = StLpipsModel(device=self.device)
                except MetricUnavailable as st_err:
                    raise MetricUnavailable(err.metric, err.needs, f"{err.reason}; ST-LPIPS fallback: "
                                            f"{st_err.reason} ({st_err.needs})") from None
                self.lpips_selection = {"requested": "auto", "ran": "stlpips_alex",
                                        "why": f"standard LPIPS unavailable: {err}"}
                return model
            self.lpips_selection = {"requested": c.net, "ran": net}
            return model

        return self._get("lpips", build)

    def clip(self):
        from dmd_dar.metrics.clip_score import OpenClipModel

        c = self.cfg.clip

        def build():
            cfg_file = resolve_asset(c.model_config)
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.cfg.seed)  # random_init (tests, benchmarks) is then reproducible
                    return OpenClipModel(c.model, None if cfg_file else c.pretrained,
                                         weights_file=resolve_asset(c.weights_file), cache_dir=c.cache_dir,
                                         pre_resize=c.pre_resize, device=self.device, random_init=c.random_init,
                                         model_config=cfg_file)
            except MetricUnavailable as err:
                if c.hint:
                    raise MetricUnavailable(err.metric, err.needs, f"{err.reason}; create it with `{c.hint}`") \
                        from None
                raise

        return self._get("clip", build)

    def features(self):
        if self.cfg.features.space == "clip":
            from dmd_dar.metrics.clip_score import ClipImageFeatures

            return self._get("features", lambda: ClipImageFeatures(self.clip()))
        from dmd_dar.metrics.distribution import InceptionFeatures

        return self._get("features", lambda: InceptionFeatures(resolve_asset(self.cfg.features.inception_weights),
                                                               self.device))

    def protocols(self) -> dict[str, Any]:
        out = {}
        for key, obj in self._built.items():
            out[key] = obj.record() if isinstance(obj, MetricUnavailable) else obj.protocol()
        if "lpips" in out and self.lpips_selection is not None:
            out["lpips"]["selection"] = self.lpips_selection
        return out


def _unavailable(metric: str, needs: str, reason: str) -> dict[str, Any]:
    return {"available": False, "metric": metric, "needs": needs, "reason": reason}


class Evaluation:
    """One evaluation run (see the module docstring). ``compute()`` returns the metrics dict."""

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
        self.availability: dict[str, dict[str, Any]] = {m: {"available": True} for m in cfg.metrics}
        names_all = [s.name for s in self.all_sets]
        self.baseline = cfg.baseline if cfg.baseline is not None else (names[0] if len(names) >= 2 else None)
        if self.baseline is not None and self.baseline not in names:
            raise UserError(f"baseline={self.baseline!r} is not one of the sample sets {names_all}")
        self._spec: dict[str, dict[str, torch.Tensor]] = {}
        self._img_emb: dict[str, torch.Tensor] = {}
        self._cos: dict[str, torch.Tensor] = {}
        self._feat: dict[str, np.ndarray] = {}

    @property
    def all_sets(self) -> list[ImageSet]:
        return self.sets + ([self.ref] if self.ref is not None else [])

    # ------------------------------------------------------------------------------------------- helpers

    def _want(self, metric: str) -> bool:
        return metric in self.cfg.metrics

    def _try(self, metric: str, fn, *args):
        """Run ``fn``; a missing backbone becomes an availability record (or an error with strict=true)."""
        try:
            return fn(*args), None
        except MetricUnavailable as err:
            if self.cfg.strict:
                raise
            rec = err.record()
            rec["metric"] = metric
            self.availability[metric] = rec
            return None, rec

    def _ci(self, values, name: str) -> dict[str, Any]:
        return S.mean_ci(values, self.cfg.bootstrap, self.cfg.confidence, self.cfg.seed, name)

    def _groups_ci(self, s: ImageSet, values: torch.Tensor, name: str) -> dict[str, Any]:
        out = {}
        for g, idx in s.group_indices().items():
            out[g] = self._ci(values[idx], f"{name}/{g}")
        return out

    # ------------------------------------------------------------------------------------------- per set

    def _spectral(self, s: ImageSet) -> dict[str, Any]:
        acc = SpectralAccumulator(bins=self.cfg.spectral_bins,
                                  cutoffs=sorted({0.25, 0.5, 0.75, float(self.cfg.hf_cutoff)}))
        self._spec_protocol = acc.protocol()
        for idx, x in s.batches(self.cfg.batch_size):
            acc.update(x, groups=[s.groups[i] for i in idx])
        self._spec[s.name] = {n: acc.values(n) for n in ["rapsd", *acc.scalar_names]}
        res = acc.compute()
        out: dict[str, Any] = {"n": res["n"], "rho": res["rho"], "mean_rapsd": res["mean_rapsd"],
                               "slope_of_mean_rapsd": res["slope_of_mean_rapsd"], "scalars": {}}
        for n in acc.scalar_names:
            out["scalars"][n] = self._ci(acc.values(n), f"{s.name}/spectral/{n}")
        if s.has_groups:
            out["per_group"] = {n: self._groups_ci(s, acc.values(n), f"{s.name}/spectral/{n}")
                                for n in acc.scalar_names}
        return out

    def _clip_set(self, s: ImageSet) -> dict[str, Any]:
        model, rec = self._try("clip_score", self.backbones.clip)
        if model is None:
            return rec
        if any(c is None for c in s.captions):
            return _unavailable("clip_score", f"a 'caption' or 'class_name' in every record of {s.path}/"
                                "manifest.jsonl", "CLIP score needs the prompt of each image")
        emb = self._image_embeddings(s, model)
        uniq = list(dict.fromkeys(s.captions))
        temb = model.encode_texts(uniq, self.cfg.clip.prefix)  # [U, D]
        row = {c: i for i, c in enumerate(uniq)}
        own = torch.tensor([row[c] for c in s.captions], device=emb.device)  # [N]: each image's text in temb
        cos = (emb * temb[own]).sum(-1)  # [N], both L2-normalised
        self._cos[s.name] = cos
        mean = self._ci(cos, f"{s.name}/clip_score")
        out = {"mean_cos": mean, "x100": S.scale_ci(mean, 100.0),
               "hessel": S.scale_ci(self._ci(cos.clamp_min(0), f"{s.name}/clip_score/hessel"), 2.5),
               "convention": "mean_cos: raw mean cosine (DMD2); x100: 100 * mean; hessel: 2.5 * mean(max(cos, 0))"}
        if s.has_groups:
            out["per_group"] = self._groups_ci(s, cos, f"{s.name}/clip_score")
        if len(uniq) >= 2:
            out["top1"] = self._caption_top1(s, emb, temb, own)
        return out

    def _caption_top1(self, s: ImageSet, emb: torch.Tensor, temb: torch.Tensor, own: torch.Tensor,
                      rows_per_chunk: int = 1024) -> dict[str, Any]:
        """How often an image's own text is the closest of the set's distinct texts: with class prompts
        (clip.text_source=class) the zero-shot class accuracy, "is each sample recognisably its class"; with one
        prompt per image, prompt retrieval (R-precision style). Chance is 1 / (number of distinct texts)."""
        # In row chunks: with one prompt per image the full [N, U] similarity matrix is N^2 (3.6 GB at 30k prompts).
        hit = torch.cat([(emb[i:i + rows_per_chunk] @ temb.T).argmax(1) == own[i:i + rows_per_chunk]
                         for i in range(0, len(emb), rows_per_chunk)]).float()  # [N]
        out = {"accuracy": self._ci(hit, f"{s.name}/clip_score/top1"), "candidates": int(temb.shape[0]),
               "chance": 1.0 / temb.shape[0]}
        if s.has_groups:
            out["per_group"] = self._groups_ci(s, hit, f"{s.name}/clip_score/top1")
        return out

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

    def _lpips_too_small(self, metric: str, s: ImageSet) -> dict[str, Any] | None:
        need = _LPIPS_MIN_SIDE.get(self.cfg.lpips.net, 32)  # auto: 32, the stricter of alex / ST-LPIPS
        if min(s.size) < need:
            return _unavailable(metric, f"images of at least {need}x{need} px",
                                f"the LPIPS {self.cfg.lpips.net} trunk cannot run on {s.size[1]}x{s.size[0]} images")
        return None

    @staticmethod
    def _lpips_model_record(model) -> dict[str, Any]:
        """Which perceptual model produced a value (ST-LPIPS values are not comparable with LPIPS values)."""
        return {"label": model.label, "model": model.display_name,
                "comparable_with_lpips": model.label == "LPIPS"}

    def _diversity(self, s: ImageSet) -> dict[str, Any]:
        from dmd_dar.metrics.lpips_metric import pairwise_lpips

        small = self._lpips_too_small("lpips_diversity", s)
        if small:
            return small
        model, rec = self._try("lpips_diversity", self.backbones.lpips)
        if model is None:
            return rec
        groups = {g: idx[: self.cfg.diversity_max_per_group] for g, idx in s.group_indices().items() if len(idx) > 1}
        if not groups:
            return _unavailable("lpips_diversity", f"groups (class_id/class_name or caption) with >= 2 images in "
                                f"{s.path}/manifest.jsonl", "diversity is measured over seeds within a group")
        per = {g: float(pairwise_lpips(model, s.load(idx)).mean()) for g, idx in groups.items()}
        vals = torch.tensor(list(per.values()), dtype=torch.float64)
        out = {"mean": self._ci(vals, f"{s.name}/lpips_diversity"), "n_groups": len(per),
               "k_per_group": sorted({len(i) for i in groups.values()}), "per_group": per,
               **self._lpips_model_record(model),
               "definition": f"per group: mean {model.label} over all pairs of its first K images; then mean over "
                             "groups (CI over groups)"}
        return out

    # ------------------------------------------------------------------------------------------- comparisons

    def _pairing(self, a: ImageSet, b: ImageSet) -> tuple[list[int], list[int], dict[str, Any]]:
        if a.keys is None or b.keys is None:
            needs = a.key_problem if a.keys is None else b.key_problem
            return [], [], {"available": False, "needs": needs,
                            "reason": "paired metrics match images by (condition, seed, index) from manifests"}
        try:
            ia, ib = pair_by_key(a.keys, b.keys, require_all=False)
        except UserError as e:
            return [], [], {"available": False, "needs": "unique (condition, seed, index) keys", "reason": str(e)}
        if not ia:
            return [], [], {"available": False, "needs": f"'{a.name}' and '{b.name}' sampled with the same seeds and "
                            "classes/prompts", "reason": "no manifest keys in common"}
        return ia, ib, {"available": True, "n": len(ia), "unpaired": [len(a) - len(ia), len(b) - len(ib)]}

    def _compare(self, a: ImageSet, b: ImageSet, kind: str) -> dict[str, Any]:
        cfg = self.cfg
        tag = f"{a.name}~{b.name}"
        ia, ib, pairing = self._pairing(a, b)
        full_pair = pairing["available"] and len(ia) == len(a) == len(b)
        comp: dict[str, Any] = {"name": f"{a.name} vs {b.name}", "samples": a.name, "reference": b.name,
                                "kind": kind, "pairing": pairing}
        if self._want("spectral"):
            comp["spectral"] = self._compare_spectral(a, b, ia, ib, pairing, full_pair, tag)
        if self._want("lpips_fidelity"):
            if not pairing["available"]:
                comp["lpips_fidelity"] = {**pairing, "metric": "lpips_fidelity"}
            elif small := self._lpips_too_small("lpips_fidelity", a):
                comp["lpips_fidelity"] = small
            else:
                model, rec = self._try("lpips_fidelity", self.backbones.lpips)
                comp["lpips_fidelity"] = rec if model is None else self._fidelity(model, a, b, ia, ib, tag)
        if self._want("clip_score") and a.name in self._cos and b.name in self._cos and pairing["available"]:
            comp["clip_score_diff"] = S.paired_diff_ci(self._cos[a.name][ia], self._cos[b.name][ib], cfg.bootstrap,
                                                       cfg.confidence, cfg.seed, f"{tag}/clip_diff")
        for metric in ("fd", "cmmd"):
            if self._want(metric):
                comp[metric] = self._distribution(metric, a, b, tag)
        comp["verdict"] = verdict(comp, cfg.hf_cutoff)
        return comp

    def _compare_spectral(self, a, b, ia, ib, pairing, full_pair, tag) -> dict[str, Any]:
        cfg = self.cfg
        sa, sb = self._spec[a.name], self._spec[b.name]
        fns = S.gap_stats(cfg.spectral_bins, cfg.hf_cutoff)
        ra, rb = sa["rapsd"], sb["rapsd"]
        if full_pair:  # same images, same order of noise: resample pairs together
            ra, rb = ra[ia], rb[ib]
        out: dict[str, Any] = {"c": cfg.hf_cutoff}
        for key, fn in fns.items():
            out[key] = S.curve_gap_ci(ra, rb, fn, cfg.bootstrap, cfg.confidence, cfg.seed, f"{tag}/{key}",
                                      paired=full_pair)
        ga, gb = ra.mean(0), rb.mean(0)
        out["gap_db_curve"] = (10 * torch.log10(ga / gb)).tolist()
        if a.has_groups:
            ref_groups = b.group_indices()
            per = {}
            for g, idx in a.group_indices().items():
                ridx = ref_groups.get(g)
                per[g] = S.curve_gap_ci(sa["rapsd"][idx], sb["rapsd"][ridx] if ridx else sb["rapsd"], fns["hf_gap_db"],
                                        cfg.bootstrap, cfg.confidence, cfg.seed, f"{tag}/hf_gap_db/{g}")
                per[g]["reference_group"] = g if ridx else "all"
            out["per_group_hf_gap_db"] = per
        name = f"hf_ratio@{cfg.hf_cutoff:g}"
        if pairing["available"]:
            lr = torch.log(sa[name][ia] / sb[name][ib])
            out["paired_log_hf_ratio"] = self._ci(lr, f"{tag}/paired_log_hf_ratio")
            out["paired_diff"] = {n: S.paired_diff_ci(sa[n][ia], sb[n][ib], cfg.bootstrap, cfg.confidence, cfg.seed,
                                                      f"{tag}/paired_diff/{n}")
                                  for n in sa if n != "rapsd"}
        else:
            out["paired_log_hf_ratio"] = {**pairing, "metric": "paired_log_hf_ratio"}
        return out

    def _fidelity(self, model, a, b, ia, ib, tag) -> dict[str, Any]:
        vals = []
        for s in range(0, len(ia), self.cfg.batch_size):
            vals.append(model(a.load(ia[s:s + self.cfg.batch_size]), b.load(ib[s:s + self.cfg.batch_size])))
        v = torch.cat(vals)
        out = {"mean": self._ci(v, f"{tag}/lpips_fidelity"), "n": len(v), **self._lpips_model_record(model)}
        groups = [a.groups[i] for i in ia]
        if any(g is not None for g in groups):
            buckets: dict[str, list[int]] = {}
            for k, g in enumerate(groups):
                if g is not None:
                    buckets.setdefault(g, []).append(k)
            out["per_group"] = {g: self._ci(v[k], f"{tag}/lpips_fidelity/{g}") for g, k in buckets.items()}
        return out

    def _distribution(self, metric: str, a: ImageSet, b: ImageSet, tag: str) -> dict[str, Any]:
        from dmd_dar.metrics.distribution import CMMD_SCALE, cmmd, frechet_distance, gaussian_stats

        cfg = self.cfg
        fa, rec = self._try(metric, self._features, a)
        if fa is None:
            return rec
        fb, rec = self._try(metric, self._features, b)
        if fb is None:
            return rec
        if len(fa) < 2 or len(fb) < 2:
            return _unavailable(metric, "at least 2 images per set", "too few images")
        if metric == "fd":
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                est = frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))
            out = S.fd_ci(fa, fb, est, cfg.bootstrap_fd, cfg.confidence, cfg.seed, f"{tag}/fd")
        else:
            f = cfg.features
            est = cmmd(fa, fb, f.cmmd_sigma, CMMD_SCALE, f.cmmd_estimator)
            out = S.cmmd_ci(fa, fb, est, f.cmmd_sigma, CMMD_SCALE, f.cmmd_estimator, cfg.bootstrap, cfg.confidence,
                            cfg.seed, f"{tag}/cmmd")
        out["feature_space"] = cfg.features.space
        out["feature_dim"] = int(fa.shape[1])
        return out

    # ------------------------------------------------------------------------------------------- run

    def compute(self) -> dict[str, Any]:
        cfg = self.cfg
        sets_out: dict[str, Any] = {}
        for s in self.all_sets:
            entry: dict[str, Any] = {"role": "reference" if s is self.ref else "samples", **s.describe(),
                                     "seeds": _seed_summary(s.records)}
            if self._want("spectral"):
                entry["spectral"] = self._spectral(s)
            if self._want("clip_score"):
                entry["clip_score"] = self._clip_set(s)
            if self._want("lpips_diversity") and s is not self.ref:
                entry["lpips_diversity"] = self._diversity(s)
            sets_out[s.name] = entry
            print(f"eval: {s.name}: {len(s)} images at {s.size[1]}x{s.size[0]}")
        comparisons = []
        if self.ref is not None:
            comparisons += [self._compare(s, self.ref, "reference") for s in self.sets]
        if self.baseline is not None:
            base = next(s for s in self.sets if s.name == self.baseline)
            comparisons += [self._compare(s, base, "baseline") for s in self.sets if s is not base]
        out = {"format": FORMAT, "protocol": self.protocol(), "availability": self.availability,
               "sets": sets_out, "comparisons": comparisons, "verdicts": [c["verdict"] for c in comparisons]}
        if cfg.bench_json:
            out["bench"] = load_bench(cfg.bench_json)
        return out

    def protocol(self) -> dict[str, Any]:
        from dmd_dar.config import to_dict

        cfg = self.cfg
        return {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "dmd-dar eval", "config": to_dict(cfg), "resolution": list(self.sets[0].size),
            "n": {s.name: len(s) for s in self.all_sets}, "sets": {s.name: s.describe() for s in self.all_sets},
            "baseline": self.baseline, "reference": self.ref.name if self.ref else None,
            "models": self.backbones.protocols(),
            "spectral": getattr(self, "_spec_protocol", None) if self._want("spectral") else None,
            "preprocessing": {
                "decode": "PNG/JPEG -> RGB uint8 -> float [-1, 1] (x / 127.5 - 1), native resolution",
                "reference_resize": self.ref.resize if self.ref else None,
                "clip": {"prefix": cfg.clip.prefix, "class_template": cfg.clip.class_template,
                         "text_source": cfg.clip.text_source, "pre_resize": cfg.clip.pre_resize},
                "lpips": "[-1, 1], native resolution", "features": cfg.features.space},
            "bootstrap": {"n_boot": cfg.bootstrap, "n_boot_fd": cfg.bootstrap_fd, "confidence": cfg.confidence,
                          "seed": cfg.seed, "method": "percentile; per-quantity seeds derived from `seed` and the "
                          "quantity's name; paired sets resample pairs together, others each set independently"},
            "seeds": {"eval": cfg.seed, **{s.name: _seed_summary(s.records) for s in self.all_sets}},
            "package_versions": package_versions(("torch", "torchvision", "numpy", "scipy", "open_clip_torch",
                                                  "lpips", "stlpips-pytorch", "safetensors", "pillow",
                                                  "matplotlib")),
            **self.extra_protocol,
        }


def json_clean(obj: Any) -> Any:
    """NaN / inf -> None (strict JSON), tuples -> lists, numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _seed_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
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


def verdict(comp: dict[str, Any], c: float) -> str:
    """One line per comparison, e.g. ``student loses 3.1 dB [2.5, 3.8] of high-frequency energy vs reference``."""
    a, b = comp["samples"], comp["reference"]
    parts = []
    sp = comp.get("spectral")
    if sp and "hf_gap_db" in sp:
        g = sp["hf_gap_db"]
        if g["estimate"] < 0:
            head = f"{a} loses {_fmt(-g['estimate'])} dB [{_fmt(-g['high'])}, {_fmt(-g['low'])}]"
        else:
            head = f"{a} gains {_fmt(g['estimate'])} dB [{_fmt(g['low'])}, {_fmt(g['high'])}]"
        sig = "significant" if S.significant(g) else "not significant (the CI includes 0)"
        parts.append(f"{head} of high-frequency energy (rho >= {c:g}) vs {b}; {sig}")
        pl = sp.get("paired_log_hf_ratio", {})
        if "estimate" in pl:
            parts.append(f"paired log HF ratio {_fmt(pl['estimate'])} [{_fmt(pl['low'])}, {_fmt(pl['high'])}]")
    else:
        parts.append(f"{a} vs {b}")
    lf = comp.get("lpips_fidelity", {})
    if "mean" in lf:
        m = lf["mean"]
        parts.append(f"{lf.get('label', 'LPIPS')} fidelity {_fmt(m['estimate'])} [{_fmt(m['low'])}, "
                     f"{_fmt(m['high'])}]")
    for k, label in (("fd", "FD"), ("cmmd", "CMMD")):
        d = comp.get(k, {})
        if "estimate" in d:
            parts.append(f"{label} {_fmt(d['estimate'])} [{_fmt(d['low'])}, {_fmt(d['high'])}]")
    return "; ".join(parts)


def evaluate(cfg: EvalConfig, extra_protocol: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute every metric of ``cfg`` and return the metrics dict (nothing written)."""
    return json_clean(Evaluation(cfg, extra_protocol).compute())


def run(cfg: EvalConfig) -> Path:
    """``dmd-dar eval``: evaluate (generating a suite's missing folders first), write metrics.json + report."""
    extra: dict[str, Any] = {}
    if cfg.suite:
        from dmd_dar.evaluation.suite import prepare_suite

        cfg, extra = prepare_suite(cfg)
    out_dir = Path(cfg.out_dir or "runs/eval")
    metrics = evaluate(cfg, extra)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = atomic_write_json(metrics, out_dir / "metrics.json")
    np.savez(out_dir / "rapsd.npz", **{f"{n}_mean_rapsd": np.asarray(e["spectral"]["mean_rapsd"])
                                       for n, e in metrics["sets"].items() if "spectral" in e},
             rho=np.asarray(next(iter(metrics["sets"].values())).get("spectral", {}).get("rho", [])))
    for v in metrics["verdicts"]:
        print(f"eval: {v}")
    for m, rec in metrics["availability"].items():
        if not rec.get("available", True):
            print(f"eval: {m} unavailable: needs {rec['needs']}")
    print(f"eval: wrote {path}")
    if cfg.report:
        from dmd_dar.report import write_report

        print(f"eval: wrote {write_report(metrics, out_dir)}")
    return path
