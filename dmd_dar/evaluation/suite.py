"""Evaluation suites: YAML protocols (eval/suites/*.yaml) that say what to sample, then what to measure.

A suite names the models (exported dmd-dar folders to sample, or sample folders made elsewhere), how many samples
per class or prompt, seeds, steps and CFG, the reference set, the metrics and any ``EvalConfig`` settings::

    name: embedded
    out_dir: runs/eval/embedded
    models:
      - {name: teacher_50, checkpoint: assets/teacher, steps: 50, cfg_scale: 2.0}
      - {name: student, checkpoint: runs/distill}
    num_per_class: 32
    seed: 0
    reference: {kind: procedural, split: heldout, num_per_class: 32}
    metrics: [spectral, lpips_fidelity, lpips_diversity, clip_score, fd, cmmd]
    eval: {clip: {model_config: assets/clip/open_clip_config.json, weights_file: assets/clip/model.safetensors}}

``dmd-dar eval suite=<file>`` writes each model's samples to ``<out_dir>/samples/<name>`` and the reference to
``<out_dir>/reference``, skipping folders that are already complete (same settings, every image present; the
settings are stamped in ``suite_stamp.json``), then evaluates them. Models sampled by another pipeline (real T2I
teachers) give ``samples: <folder>``; for them the suite writes ``<out_dir>/generation_plan.jsonl``, the exact
manifest (file, index, seed, caption) their folder must have.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dmd_dar.artifact import load_artifact, resolve_checkpoint
from dmd_dar.config import build_config, to_dict
from dmd_dar.data.manifest import MANIFEST_NAME, read_manifest, save_png_folder
from dmd_dar.data.procedural import CLASS_NAMES, ProceduralImages
from dmd_dar.diffusion.samplers import check_guidance_interval
from dmd_dar.errors import UserError
from dmd_dar.evaluation.config import EvalConfig
from dmd_dar.evaluation.images import _read_size
from dmd_dar.metrics.protocol import file_fingerprint
from dmd_dar.models import read_config
from dmd_dar.sampling import SampleConfig, resolve_classes, sample_folder
from dmd_dar.utils.device import resolve_device
from dmd_dar.utils.io import atomic_write_json

STAMP = "suite_stamp.json"


@dataclass
class SuiteModel:
    name: str = "???"
    checkpoint: str | None = None  # an exported dmd-dar model (sampled here)
    samples: str | None = None  # or a sample folder generated elsewhere (PNG + manifest.jsonl)
    steps: int | None = None  # teacher: ODE steps; student: student steps (default: the model's own schedule)
    cfg_scale: float | None = None  # teacher guidance (default: the model's)
    cfg_interval: list[float] | None = None  # [lo, hi]: guide only where lo <= t <= hi (default: the model's)
    sampler: str | None = None  # euler | heun | ddim (default: the model's)

    def __post_init__(self) -> None:
        check_guidance_interval(self.cfg_interval, f"suite model '{self.name}': cfg_interval")


@dataclass
class SuiteReference:
    kind: str = "none"  # procedural (render the embedded dataset) | folder | none
    path: str | None = None  # kind=folder
    split: str = "heldout"  # kind=procedural: never the training split
    num_per_class: int = 32
    size: int | None = None  # default: the samples' resolution
    seed: int = 0  # dataset seed (the teacher's training data uses the same seed, another split)


@dataclass
class SuiteConfig:
    name: str = "suite"
    description: str = ""
    out_dir: str = "runs/eval/suite"
    models: list[SuiteModel] = field(default_factory=list)
    num_per_class: int = 16  # class-conditional models
    classes: list[Any] | None = None  # class ids or names (e.g. [checkers, rings]); default: every class
    prompts: str | None = None  # T2I: a prompt file, one prompt per line ('#' lines are comments)
    num_prompts: int | None = None  # default: every prompt
    num_per_prompt: int = 4  # seeds per prompt (LPIPS diversity needs >= 2)
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    reference: SuiteReference = field(default_factory=SuiteReference)
    metrics: list[str] | None = None  # default: EvalConfig's
    eval: dict[str, Any] = field(default_factory=dict)  # EvalConfig settings (nested mapping)


def _resolve(path: str, suite_file: Path) -> Path:
    """``path`` as given (cwd), else relative to the suite file, else to the repository root above eval/suites/."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    for base in (suite_file.parent, suite_file.parent.parent.parent):
        if (base / p).exists():
            return base / p
    return p


def load_suite(path: str | Path) -> SuiteConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"suite {path} not found; pass a protocol YAML such as eval/suites/embedded.yaml")
    suite = build_config(SuiteConfig, [path])
    if not suite.models:
        raise UserError(f"{path}: a suite needs at least one entry under 'models'")
    names = [m.name for m in suite.models]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: model names {names} must be unique")
    for m in suite.models:
        if (m.checkpoint is None) == (m.samples is None):
            raise UserError(f"{path}: model '{m.name}' needs exactly one of 'checkpoint' (sampled here) or "
                            "'samples' (a folder generated elsewhere)")
    if suite.reference.kind not in ("procedural", "folder", "none"):
        raise UserError(f"{path}: reference.kind={suite.reference.kind!r} must be procedural, folder or none")
    return suite


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"prompt file {path} not found; write one prompt per line")
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts")
    return prompts


def _complete(folder: Path, stamp: dict[str, Any], expected: int) -> bool:
    try:
        if json.loads((folder / STAMP).read_text()) != json.loads(json.dumps(stamp)):
            return False
        return (folder / MANIFEST_NAME).is_file() and len(read_manifest(folder)) == expected
    except (OSError, json.JSONDecodeError, UserError):
        return False


def _sample_model(m: SuiteModel, suite: SuiteConfig, suite_file: Path, folder: Path) -> dict[str, Any]:
    if suite.prompts:
        raise UserError(f"model '{m.name}': dmd-dar exports are class-conditional and cannot be sampled from prompts; "
                        "give this model 'samples: <folder>' generated by its own pipeline")
    try:
        ckpt = resolve_checkpoint(str(_resolve(m.checkpoint, suite_file)))
    except UserError as e:
        raise UserError(f"suite model '{m.name}': {e}") from None
    meta = json.loads((ckpt / "dmd_dar.json").read_text())
    names = list(meta.get("class_names", []))
    try:
        classes = resolve_classes(suite.classes, names, read_config(ckpt / "model.safetensors").num_classes)
    except UserError as e:
        raise UserError(f"suite model '{m.name}': {e}") from None
    stamp = {"suite": suite.name, "model": m.name, "checkpoint": str(ckpt.resolve()),
             "weights": file_fingerprint(ckpt / "model.safetensors")["sha256"], "steps": m.steps,
             "cfg_scale": m.cfg_scale, "sampler": m.sampler, "num_per_class": suite.num_per_class,
             "classes": None if suite.classes is None else classes, "seed": suite.seed}
    if m.cfg_interval is not None:  # only when set, so that folders sampled before the option existed stay complete
        stamp["cfg_interval"] = [float(v) for v in m.cfg_interval]
    # The classes this folder holds, by name: the procedural reference is rendered for exactly these.
    sampled_names = [names[c] for c in classes if c < len(names)]
    expected = len(classes) * suite.num_per_class
    if _complete(folder, stamp, expected):
        print(f"suite: {m.name}: {folder} is complete ({expected} images), skipping")
        return {**stamp, "class_names": sampled_names, "generated": False}

    model, meta_obj = load_artifact(ckpt, device=str(resolve_device(suite.device)))
    cfg = SampleConfig(checkpoint=str(ckpt), out_dir=str(folder), num_per_class=suite.num_per_class,
                       classes=classes, seed=suite.seed, steps=m.steps, cfg_scale=m.cfg_scale,
                       cfg_interval=m.cfg_interval, sampler=m.sampler, batch_size=suite.batch_size,
                       device=suite.device)
    print(f"suite: sampling {m.name} ({meta['role']}) -> {folder}")
    sample_folder(model, meta_obj, folder, cfg)
    atomic_write_json(stamp, folder / STAMP)
    return {**stamp, "class_names": sampled_names, "generated": True}


def _external_model(m: SuiteModel, suite: SuiteConfig, suite_file: Path, out_dir: Path) -> dict[str, Any]:
    folder = _resolve(m.samples, suite_file)
    info: dict[str, Any] = {"model": m.name, "samples": str(folder), "generated": False}
    if suite.prompts:
        prompts = read_prompts(_resolve(suite.prompts, suite_file))[: suite.num_prompts]
        plan = [{"file": f"{i:05d}.png", "index": i, "seed": suite.seed + k, "caption": p}
                for i, (p, k) in enumerate((p, k) for p in prompts for k in range(suite.num_per_prompt))]
        plan_path = out_dir / "generation_plan.jsonl"
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_text("".join(json.dumps(r) + "\n" for r in plan), encoding="utf-8")
        info["plan"] = str(plan_path)
        if not (folder / "manifest.jsonl").is_file():
            raise UserError(f"model '{m.name}': sample folder {folder} has no manifest.jsonl; generate its "
                            f"{len(plan)} images with your pipeline following {plan_path} (file, index, seed, "
                            "caption per image) and copy that file there as manifest.jsonl")
    elif not folder.is_dir():
        raise UserError(f"model '{m.name}': sample folder {folder} does not exist; fill in 'samples:' in the suite")
    return info


def _render_reference(suite: SuiteConfig, out_dir: Path, size: tuple[int, int], class_names: list[str]) -> dict:
    r = suite.reference
    folder = out_dir / "reference"
    names = [c for c in class_names if c in CLASS_NAMES] or list(CLASS_NAMES)
    h, w = (r.size, r.size) if r.size else size
    stamp = {"suite": suite.name, "kind": "procedural", "split": r.split, "seed": r.seed, "size": [h, w],
             "classes": names, "num_per_class": r.num_per_class}
    n = len(names) * r.num_per_class
    if _complete(folder, stamp, n):
        print(f"suite: reference {folder} is complete ({n} images), skipping")
        return {**stamp, "path": str(folder), "generated": False}
    ds = ProceduralImages(r.split, n, size=(h, w), seed=r.seed, classes=names)
    print(f"suite: rendering {n} {r.split} procedural images at {w}x{h} -> {folder}")
    for start in range(0, n, 256):
        idx = list(range(start, min(n, start + 256)))
        x, cids, caps = ds.render(idx)
        recs = [{"dataset_index": i, "split": r.split, "class_id": int(c), "class_name": CLASS_NAMES[int(c)],
                 "caption": cap} for i, c, cap in zip(idx, cids.tolist(), caps)]
        save_png_folder(x.to(torch.float32), folder, recs, start_index=start)
    atomic_write_json(stamp, folder / STAMP)
    return {**stamp, "path": str(folder), "generated": True}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def apply_suite_settings(cfg: EvalConfig, settings: dict[str, Any]) -> EvalConfig:
    """Suite ``eval:`` settings fill every key the user left at its default (command-line values win)."""
    default = _flatten(to_dict(EvalConfig()))
    user = _flatten(to_dict(cfg))
    conf = OmegaConf.structured(cfg)
    for k, v in _flatten(settings).items():
        if k not in default:
            raise UserError(f"suite eval setting '{k}' is not an eval config key; valid: {', '.join(sorted(default))}")
        if user[k] == default[k]:
            try:
                OmegaConf.update(conf, k, v, merge=False)
            except OmegaConfBaseException as e:
                raise UserError(f"suite eval setting '{k}': bad value {v!r} ({str(e).splitlines()[0]})") from None
    return OmegaConf.to_object(conf)


def prepare_suite(cfg: EvalConfig) -> tuple[EvalConfig, dict[str, Any]]:
    """Generate a suite's missing folders; return the EvalConfig that evaluates them and the suite's protocol."""
    suite_file = Path(cfg.suite)
    suite = load_suite(suite_file)
    settings = dict(OmegaConf.to_container(OmegaConf.create(suite.eval), resolve=True))
    if suite.metrics is not None:
        settings["metrics"] = list(suite.metrics)
    cfg = apply_suite_settings(cfg, settings)
    out_dir = Path(cfg.out_dir or suite.out_dir)
    folders, infos, class_names = [], [], []
    for m in suite.models:
        if m.checkpoint is not None:
            folder = out_dir / "samples" / m.name
            infos.append(_sample_model(m, suite, suite_file, folder))
            class_names += [c for c in infos[-1]["class_names"] if c not in class_names]
        else:
            infos.append(_external_model(m, suite, suite_file, out_dir))
            folder = Path(infos[-1]["samples"])
        folders.append(str(folder))
    ref_info = None
    reference = cfg.reference
    if reference is None and suite.reference.kind == "procedural":
        first = next(p for p in sorted(Path(folders[0]).iterdir()) if p.suffix == ".png" and p.name != "grid.png")
        ref_info = _render_reference(suite, out_dir, _read_size(first), class_names)
        reference = ref_info["path"]
    elif reference is None and suite.reference.kind == "folder":
        reference = str(_resolve(suite.reference.path or "", suite_file))
        ref_info = {"kind": "folder", "path": reference}
    new = dataclasses.replace(cfg, samples=[*cfg.samples, *folders],
                              names=[*(cfg.names or [Path(s).name for s in cfg.samples]), *[m.name for m in suite.models]],
                              reference=reference, out_dir=str(out_dir), suite=cfg.suite)
    proto = {"suite": {"file": str(suite_file.resolve()), "config": OmegaConf.to_container(OmegaConf.structured(suite)),
                       "models": infos, "reference": ref_info}}
    return new, proto
