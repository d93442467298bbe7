"""The detail part of a study: distill every (variant, student steps, seed), sample it, evaluate it.

Each unit is resumable on its own:

- a distill run is *done* when ``summary.json`` and ``export/`` exist for the configured step count (or when it
  stopped on non-finite losses: ``failed.json``); otherwise ``dmd_dar.distill.trainer.run`` resumes it from its
  latest checkpoint. A finished run whose saved config differs from the one the suite now resolves to (e.g. the
  base config's learning rates were retuned) is an error, so one table never mixes two recipes;
- sample folders are made by the evaluation suite machinery (``prepare_suite``), which skips complete folders;
- a run's evaluation is skipped when its ``eval_stamp.json`` (sample stamps + eval settings) is unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dmd_dar.artifact import resolve_checkpoint
from dmd_dar.config import build_config, diff_configs, load_saved_config, to_dict
from dmd_dar.distill import trainer
from dmd_dar.distill.config import DistillConfig
from dmd_dar.distill.task import native_teacher_digest
from dmd_dar.errors import UserError
from dmd_dar.evaluation import EvalConfig, evaluate
from dmd_dar.evaluation.suite import prepare_suite
from dmd_dar.study.config import StudySuite, Variant, resolve_path
from dmd_dar.utils.io import atomic_write_json, atomic_write_text

EVAL_STAMP = "eval_stamp.json"
FAILED = "failed.json"
STDOUT = "stdout.log"


@contextlib.contextmanager
def trainer_output_to(run_dir: Path) -> Iterator[None]:
    """Send a trainer's printout (its resolved config, resume notes) to ``run_dir/stdout.log``: the study's console
    keeps one progress bar."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / STDOUT, "a", encoding="utf-8") as fh, contextlib.redirect_stdout(fh):
        yield


@dataclass
class DistillRun:
    variant: Variant
    student_steps: int
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        """Sample-set name of this run (unique within a study)."""
        return f"{self.variant.name}-{self.student_steps}step-seed{self.seed}"


def plan_runs(suite: StudySuite, study_dir: Path) -> list[DistillRun]:
    """Every distill run of the suite, ordered so that a partial study already covers every variant."""
    d = suite.distill
    return [DistillRun(v, k, s, study_dir / "distill" / v.name / f"{k}step" / f"seed{s}")
            for k in d.student_steps for s in d.seeds for v in d.variants]


def distill_config(suite: StudySuite, suite_file: Path, run: DistillRun, device: str, progress: bool):
    """The resolved DistillConfig of one run: base layers <- study overrides <- variant <- run plumbing.

    Variant overrides may interpolate the base config (e.g. ``networks.fake_routing.chunk_size=
    ${networks.student_routing.chunk_size}``), so a variant follows the main job's routing settings.
    """

    d = suite.distill
    layers = [resolve_path(p, suite_file) for p in d.config]
    plumbing = [f"method.student_steps={run.student_steps}", f"run.seed={run.seed}", f"run.out_dir={run.run_dir}",
                "run.log_with=none", f"run.log_every={d.log_every}", "run.sample_every=0",
                f"run.ckpt_every={d.ckpt_every}", f"run.progress={str(progress).lower()}", "run.resume=true",
                "debug_grid_every=0",
                # every run of the study distills one teacher: compute its DMD1 regression pairs once, not per run
                f"method.regression_cache={run.run_dir.parents[2] / 'regression_cache'}"]
    if d.steps is not None:
        plumbing.append(f"run.steps={d.steps}")
    if device == "cpu":
        plumbing.append("run.cpu=true")
    try:
        return build_config(DistillConfig, layers, [*d.overrides, *run.variant.overrides, *plumbing])
    except UserError as exc:
        raise UserError(f"study variant '{run.variant.name}': {exc}") from None


def check_saved_config(schema, cfg, run_dir: Path, ignore: tuple[str, ...]) -> None:
    """A finished run must have been made with the config the suite resolves to now."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    changed = diff_configs(load_saved_config(schema, saved), cfg, ignore=ignore)
    if changed:
        raise UserError(f"{run_dir}: finished with another config ({', '.join(changed[:6])}"
                        f"{', ...' if len(changed) > 6 else ''}); a study compares one recipe, so use a new "
                        "out_dir (or delete that run) to rerun it with the current config")


def check_saved_teacher(cfg, run_dir: Path, summary: dict) -> None:
    """A finished run must have been distilled from the teacher weights the config points at now (same config, new
    teacher file: its results would silently describe the old teacher). Native teachers only (a file digest)."""
    if cfg.networks.teacher_kind != "native":
        return

    now = native_teacher_digest(cfg.networks.teacher)
    if summary.get("teacher") != now:
        was = f"other teacher weights (sha256 {summary['teacher'][:12]}...)" if summary.get("teacher") else \
            "a teacher it did not record (an older dmd-dar)"
        raise UserError(f"{run_dir}: finished against {was}, not the current {cfg.networks.teacher} (sha256 "
                        f"{now[:12]}...); a study compares one teacher, so use a new out_dir (or delete that run)")


def distill_state(run: DistillRun, cfg) -> str:
    """'done', 'failed' (stopped on non-finite losses) or 'todo' (missing or resumable)."""

    summary, export, failed = run.run_dir / "summary.json", run.run_dir / "export" / "dmd_dar.json", run.run_dir / FAILED
    if failed.is_file():
        check_saved_config(DistillConfig, cfg, run.run_dir, trainer.RESUMABLE_CHANGES)
        return "failed"
    if summary.is_file() and export.is_file():
        check_saved_config(DistillConfig, cfg, run.run_dir, trainer.RESUMABLE_CHANGES)
        try:
            record = json.loads(summary.read_text())
            steps = record["steps"]
        except (json.JSONDecodeError, KeyError):
            return "todo"
        check_saved_teacher(cfg, run.run_dir, record)
        return "done" if steps == cfg.run.steps else "todo"
    return "todo"


def distill(run: DistillRun, cfg) -> str:
    """Train (or resume) one run; non-finite losses that stop the trainer are recorded, not raised."""

    try:
        with trainer_output_to(run.run_dir):
            trainer.run(cfg)
    except FloatingPointError as exc:
        atomic_write_json({"error": str(exc), "kind": "non-finite losses"}, run.run_dir / FAILED)
        print(f"study: {run.name} stopped: {exc}")
        return "failed"
    return "done"


def teacher_folder(cfg) -> Path:
    return resolve_checkpoint(str(cfg.networks.teacher)).resolve()


def write_eval_suite(suite: StudySuite, suite_file: Path, study_dir: Path, teacher: Path,
                     models: list[tuple[str, Path]], device: str, name: str) -> Path:
    """An evaluation-suite YAML (``dmd_dar.evaluation.suite``): the base suite + study overrides + these models."""
    base_file = resolve_path(suite.eval.suite, suite_file)
    if not base_file.is_file():
        raise UserError(f"{suite_file}: eval.suite={suite.eval.suite} not found; point it at an evaluation suite "
                        "such as eval/suites/embedded.yaml")
    conf = OmegaConf.merge(OmegaConf.load(base_file), OmegaConf.create(dict(suite.eval.overrides)))
    t = suite.eval.teacher
    conf.name = suite.name
    conf.out_dir = str((study_dir / "eval").resolve())
    conf.device = device
    conf.models = [{"name": t.name, "checkpoint": str(teacher), "steps": t.steps, "sampler": t.sampler,
                    "cfg_scale": t.cfg_scale, "cfg_interval": t.cfg_interval},
                   *({"name": n, "checkpoint": str(p.resolve())} for n, p in models)]
    path = study_dir / "eval" / "suites" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OmegaConf.to_yaml(conf), path)
    return path


def _stamp_of(proto: dict[str, Any], cfg) -> dict[str, Any]:
    models = [{k: v for k, v in m.items() if k != "generated"} for m in proto["suite"]["models"]]
    ref = proto["suite"].get("reference") or {}
    settings = to_dict(cfg)
    for key in ("out_dir", "suite", "report", "device", "batch_size"):
        settings.pop(key, None)
    return {"models": models, "reference": {k: v for k, v in ref.items() if k != "generated"}, "eval": settings}


def sample_and_evaluate(suite: StudySuite, suite_file: Path, study_dir: Path, teacher: Path, run: DistillRun,
                        device: str) -> Path:
    """Sample the run's student (and, once, the teacher and the reference), then evaluate it against both."""

    file = write_eval_suite(suite, suite_file, study_dir, teacher, [(run.name, run.run_dir / "export")], device,
                            run.name)
    cfg, proto = prepare_suite(EvalConfig(suite=str(file), device=device, report=False))
    out = study_dir / "eval" / "runs" / run.name
    cfg = dataclasses.replace(cfg, baseline=suite.eval.teacher.name, out_dir=str(out), report=False)
    stamp = json.loads(json.dumps(_stamp_of(proto, cfg)))
    metrics_file = out / "metrics.json"
    try:
        if metrics_file.is_file() and json.loads((out / EVAL_STAMP).read_text()) == stamp:
            return metrics_file
    except (OSError, json.JSONDecodeError):
        pass
    atomic_write_json(evaluate(cfg, proto).to_json(), metrics_file)
    atomic_write_json(stamp, out / EVAL_STAMP)
    return metrics_file


def recipe(cfg) -> dict[str, Any]:
    """What a reader of the results needs to know about a run's DMD2 recipe (all of it is in its config.yaml)."""
    m = cfg.method
    return {"student_routing": to_dict(cfg.networks.student_routing), "fake_routing": to_dict(cfg.networks.fake_routing),
            "steps": cfg.run.steps, "batch_size": cfg.run.batch_size, "ttur": m.ttur,
            "generator_lr": cfg.generator_optim.lr, "fake_lr": cfg.fake_optim.lr, "guidance_scale": m.guidance_scale,
            "regression_weight": m.regression_weight, "gan_weight": m.gan_weight}
