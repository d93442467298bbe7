"""The pretraining part of a study: teacher pretraining per routing variant and seed, FD against iterations.

Each run trains in stages up to every ``eval_at`` point (``run.steps`` is a resumable setting of
``dmd_dar.training.teacher``, so stage k resumes stage k-1's final checkpoint). After each stage the exported
EMA model is sampled (``fd_num_per_class`` images per class, ``fd_sample_steps`` Euler steps) and its FD against
the held-out reference is computed in the in-domain CLIP feature space; points already in ``fd.json`` are skipped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from dmd_dar import sampling
from dmd_dar.artifact import load_artifact
from dmd_dar.config import build_config
from dmd_dar.errors import UserError
from dmd_dar.evaluation import EvalConfig, evaluate
from dmd_dar.evaluation.results import DistributionDistance, to_json
from dmd_dar.evaluation.suite import prepare_suite
from dmd_dar.study.config import StudySuite, Variant, resolve_path
from dmd_dar.study.detail import check_saved_config, trainer_output_to
from dmd_dar.training import teacher as teacher_training
from dmd_dar.training.seeding import derive_seed
from dmd_dar.training.teacher import RESUMABLE_CHANGES, TeacherConfig
from dmd_dar.utils.device import resolve_device
from dmd_dar.utils.io import atomic_write_json, atomic_write_text

FD_FILE = "fd.json"
FAILED = "failed.json"


@dataclass
class PretrainRun:
    variant: Variant
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return f"pretrain-{self.variant.name}-seed{self.seed}"


def plan_pretraining(suite: StudySuite, study_dir: Path) -> list[PretrainRun]:
    p = suite.pretraining
    return [PretrainRun(v, s, study_dir / "pretraining" / v.name / f"seed{s}") for s in p.seeds for v in p.variants]


def stages(suite: StudySuite) -> list[int]:
    p = suite.pretraining
    return sorted({*p.eval_at, p.steps})


def teacher_config(suite: StudySuite, suite_file: Path, run: PretrainRun, steps: int, device: str, progress: bool):

    p = suite.pretraining
    layers = [resolve_path(x, suite_file) for x in p.config]
    # Every stage trains on the schedule of the whole run (a cosine decay would otherwise end at each stage).
    plumbing = [f"run.out_dir={run.run_dir}", f"run.seed={run.seed}", f"run.steps={steps}",
                f"optim.decay_steps={p.steps}", "run.log_with=none",
                f"run.log_every={p.log_every}", "run.sample_every=0", f"run.ckpt_every={p.ckpt_every}",
                f"run.progress={str(progress).lower()}", "run.resume=true"]
    if device == "cpu":
        plumbing.append("run.cpu=true")
    try:
        return build_config(TeacherConfig, layers, [*p.overrides, *run.variant.overrides, *plumbing])
    except UserError as exc:
        raise UserError(f"study pretraining variant '{run.variant.name}': {exc}") from None


def read_points(run: PretrainRun) -> dict[int, Any]:
    try:
        return {int(k): v for k, v in json.loads((run.run_dir / FD_FILE).read_text())["points"].items()}
    except (OSError, json.JSONDecodeError, KeyError):
        return {}


def pending(suite: StudySuite, suite_file: Path, run: PretrainRun, device: str) -> list[int]:
    """The stages of this run without an FD point; a finished run made with another config is an error."""

    done = read_points(run)
    if (run.run_dir / FAILED).is_file():
        return []  # diverged: recorded in failed.json, shown as such in the report
    if done:
        cfg = teacher_config(suite, suite_file, run, suite.pretraining.steps, device, False)
        check_saved_config(TeacherConfig, cfg, run.run_dir, RESUMABLE_CHANGES)
    return [s for s in stages(suite) if s not in done]


def run_stage(suite: StudySuite, suite_file: Path, study_dir: Path, run: PretrainRun, step: int, device: str,
              progress: bool) -> dict[str, Any]:
    """Train (resume) to ``step``, sample the export, compute its FD vs the reference; record the point."""

    p = suite.pretraining
    cfg = teacher_config(suite, suite_file, run, step, device, progress)
    # The teacher trainer draws its initial weights from the global RNG: seed it so seeds differ and repeat.
    torch.manual_seed(derive_seed("study-pretrain-init", run.seed) % (2**63))

    try:
        with trainer_output_to(run.run_dir):
            export = teacher_training.run(cfg)
    except (FloatingPointError, RuntimeError) as exc:
        if not isinstance(exc, FloatingPointError) and "non-finite" not in str(exc):
            raise
        # A diverged pretraining run is a result, not a crash: record it; its later stages are skipped.
        atomic_write_json({"error": str(exc), "step": step}, run.run_dir / FAILED)
        print(f"study: {run.name} diverged before step {step}: {exc}")
        return {"step": step, "fd": None, "failed": str(exc)}
    model, meta = load_artifact(export, device=str(resolve_device(device)))
    folder = run.run_dir / "fd_samples" / f"step_{step:07d}"
    sample_cfg = sampling.SampleConfig(checkpoint=str(export), num_per_class=p.fd_num_per_class, seed=0,
                                       steps=p.fd_sample_steps, batch_size=64, device=device)
    records = sampling.sample_folder(model, meta, folder, sample_cfg)
    eval_cfg = _fd_eval_config(suite, suite_file, study_dir, run, folder, device)
    result = evaluate(eval_cfg)
    comp = next(c for c in result.comparisons if c.kind == "reference")
    fd = comp.fd.value if isinstance(comp.fd, DistributionDistance) else None  # None: FD unavailable here
    point = {"step": step, "fd": to_json(fd), "n": len(records)}
    points = read_points(run)
    points[step] = point
    atomic_write_json({"variant": run.variant.name, "seed": run.seed, "points": {str(k): points[k] for k in
                                                                                  sorted(points)}},
                      run.run_dir / FD_FILE)
    return point


def _fd_eval_config(suite: StudySuite, suite_file: Path, study_dir: Path, run: PretrainRun, folder: Path,
                    device: str):
    """FD of one sample folder vs the study's held-out reference, through the evaluation-suite machinery."""
    base_file = resolve_path(suite.eval.suite, suite_file)
    conf = OmegaConf.merge(OmegaConf.load(base_file), OmegaConf.create(dict(suite.eval.overrides)))
    conf.name = suite.name  # same name as the detail part: the reference folder is shared, not re-rendered
    conf.out_dir = str((study_dir / "eval").resolve())
    conf.device = device
    conf.models = [{"name": run.name, "samples": str(folder.resolve())}]
    conf.metrics = ["fd"]
    OmegaConf.update(conf, "eval.baseline", None, merge=False)
    OmegaConf.update(conf, "eval.bootstrap_fd", suite.pretraining.bootstrap_fd, merge=False)
    path = study_dir / "eval" / "suites" / f"{run.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OmegaConf.to_yaml(conf), path)
    cfg, _ = prepare_suite(EvalConfig(suite=str(path), device=device, report=False))
    return dataclasses.replace(cfg, report=False)


def ensure_teacher_variant_ok(suite: StudySuite, suite_file: Path) -> None:
    """Fail early on a bad pretraining variant (before hours of distillation)."""
    for v in suite.pretraining.variants:
        teacher_config(suite, suite_file, PretrainRun(v, suite.pretraining.seeds[0], Path("unused")),
                       suite.pretraining.steps, "auto", False)
