"""The study's schemas: ``StudyConfig`` (the command line) and ``StudySuite`` (the protocol YAML, eval/study/*.yaml).

A study suite names

- ``distill``: the base DistillConfig layer(s) (read at run time, so the main job's tuning carries over), the
  variants as dotlist overrides, the student step counts, the seeds and the per-run step budget;
- ``eval``: the base evaluation suite (eval/suites/*.yaml: reference set, metrics, in-domain CLIP settings) with
  study-specific overrides (images per class, bootstrap sizes) and the teacher's sampling settings;
- ``pretraining``: teacher pretraining per routing variant and seed, FD (in-domain CLIP features) at
  ``eval_at`` iterations;
- ``quick``: a mapping merged over the file when ``quick=true``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dmd_dar.config import load_yaml
from dmd_dar.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = Path(__file__).resolve().parents[1]


@dataclass
class StudyConfig:
    """``dmd-dar study``: run (or resume) a study suite and write its report.

    suite:        the protocol YAML (eval/study/embedded.yaml).
    quick:        merge the suite's ``quick:`` block (smaller budget) and write to ``<out_dir>_quick``.
    detail:       run the distillation detail study (distill, sample, evaluate).
    pretraining:  run the teacher-pretraining FD-vs-iterations part; null = the suite's ``pretraining.enabled``.
    out_dir:      default: the suite's ``out_dir`` (``+ "_quick"`` with quick=true).
    set:          dotlist overrides of the suite itself, e.g. ``set=[distill.steps=200,"distill.seeds=[0,1]"]``
                  (quote an item whose value is a list).
    plan:         print the runs and the time estimate, then exit without running anything.
    """

    suite: str = "eval/study/embedded.yaml"
    quick: bool = False
    detail: bool = True
    pretraining: bool | None = None
    out_dir: str | None = None
    set: list[str] = field(default_factory=list)
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True  # the study's progress bar
    inner_progress: bool = False  # also the trainers' and samplers' own bars
    plan: bool = False


@dataclass
class Variant:
    name: str = "???"
    label: str = ""  # shown in tables; default: the name
    overrides: list[str] = field(default_factory=list)  # dotlist on top of the base config (DistillConfig/TeacherConfig)


@dataclass
class HealthSettings:
    blowup_factor: float = 10.0  # flag a loss / grad norm whose last-10 % mean exceeds this x its first-10 % median
    drift_factor: float = 2.0  # flag a generator whose output std ends beyond this x (or 1/this x) the teacher's
    keys: list[str] = field(default_factory=lambda: [
        "gen/dm_loss", "critic/fake_loss", "gen/grad_norm", "critic/grad_norm", "dm_grad/t0.00-0.25",
        "dm_grad/t0.75-1.00", "drift/std_ratio", "drift/mean_abs", "gen/x_std"])


@dataclass
class DistillPart:
    config: list[str] = field(default_factory=lambda: ["configs/distill_embedded.yaml"])  # base layers, in order
    overrides: list[str] = field(default_factory=list)  # applied to every run, before the variant's
    steps: int | None = None  # iterations per run; null = the base config's run.steps
    log_every: int = 10  # health-curve resolution
    ckpt_every: int = 100  # resume granularity
    student_steps: list[int] = field(default_factory=lambda: [1, 4])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[Variant] = field(default_factory=list)
    baseline: str = "residual"  # the variant every other one is compared with
    health: HealthSettings = field(default_factory=HealthSettings)


@dataclass
class TeacherSamples:
    name: str = "teacher_50step"
    steps: int | None = 50
    sampler: str | None = "euler"
    cfg_scale: float | None = None  # the teacher's own default
    cfg_interval: list[float] | None = None  # [lo, hi] guidance interval (default: the teacher's own)


@dataclass
class EvalPart:
    suite: str = "eval/suites/embedded.yaml"  # base evaluation suite: reference, metrics, CLIP settings
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into that suite (num_per_class, eval.bootstrap ...)
    teacher: TeacherSamples = field(default_factory=TeacherSamples)
    grid_per_class: int = 4  # images per class in the report's sample grids
    key_metrics: list[str] = field(default_factory=lambda: [
        "hf_gap_db_vs_teacher", "hf_gap_db_vs_data", "fd_vs_data", "clip_score", "lpips_fidelity"])


@dataclass
class PretrainPart:
    enabled: bool = True
    config: list[str] = field(default_factory=lambda: ["configs/teacher_embedded.yaml"])
    overrides: list[str] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)
    baseline: str = "residual"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 600  # the pretraining step budget (per run)
    eval_at: list[int] = field(default_factory=lambda: [150, 300, 600])  # iterations with an FD point (<= steps)
    ckpt_every: int = 100
    log_every: int = 25
    fd_num_per_class: int = 16  # samples per class for each FD point
    fd_sample_steps: int = 25  # Euler steps of those samples (CFG: the teacher config's)
    bootstrap_fd: int = 50


@dataclass
class Budget:
    """Seconds per unit on the target machine; only used for the printed time estimate (see the YAML comments).

    Iteration rates are for the batch sizes below and scale linearly with the base configs' ``run.batch_size``.
    """

    distill_iter: dict[int, float] = field(default_factory=lambda: {1: 0.25, 4: 0.29})  # per student_steps
    distill_batch: int = 16
    distill_run_overhead: float = 6.0  # model building, teacher drift reference, export + grid
    teacher_image_step: float = 0.002  # one teacher forward per image per ODE step (CFG doubles it)
    eval_run: float = 7.0  # sampling one student + its evaluation (spectral, CLIP, FD, CMMD, bootstraps)
    teacher_iter: float = 0.45  # one pretraining iteration at teacher_batch
    teacher_batch: int = 64
    fd_point_overhead: float = 8.0  # per FD point besides its samples: the export's 50-step grid + FD eval


@dataclass
class StudySuite:
    name: str = "study"
    description: str = ""
    out_dir: str = "runs/study/study"
    confidence: float = 0.95  # intervals over seeds (Student t); one seed: the run's own bootstrap interval
    distill: DistillPart = field(default_factory=DistillPart)
    eval: EvalPart = field(default_factory=EvalPart)
    pretraining: PretrainPart = field(default_factory=PretrainPart)
    budget: Budget = field(default_factory=Budget)
    quick: dict[str, Any] = field(default_factory=dict)  # merged over this file with quick=true


def resolve_path(path: str | Path, suite_file: Path | None = None) -> Path:
    """A path as given (absolute or from the working directory), else next to the suite file, else under the
    repository root, else under configs/ or the installed package (``assets/...``)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    bases = ([suite_file.parent] if suite_file is not None else []) + [REPO_ROOT, REPO_ROOT / "configs", PACKAGE_DIR]
    for base in bases:
        if (base / p).exists():
            return base / p
    return p


def _validate(suite: StudySuite, source: str) -> StudySuite:
    d, p = suite.distill, suite.pretraining
    if not d.variants:
        raise UserError(f"{source}: distill.variants is empty; list at least the baseline variant")
    for part, label in ((d, "distill"), (p, "pretraining")):
        names = [v.name for v in part.variants]
        if len(set(names)) != len(names):
            raise UserError(f"{source}: {label}.variants names {names} must be unique")
        if part.variants and part.baseline not in names:
            raise UserError(f"{source}: {label}.baseline={part.baseline!r} is not one of the variants {names}")
        if not part.seeds or len(set(part.seeds)) != len(part.seeds):
            raise UserError(f"{source}: {label}.seeds={list(part.seeds)} must be a non-empty list of distinct seeds")
    if not d.student_steps or any(k < 1 for k in d.student_steps):
        raise UserError(f"{source}: distill.student_steps={list(d.student_steps)} must list step counts >= 1")
    if d.steps is not None and d.steps < 1:
        raise UserError(f"{source}: distill.steps={d.steps} must be >= 1 (or null for the base config's run.steps)")
    if p.enabled:
        if not p.variants:
            raise UserError(f"{source}: pretraining.variants is empty; list them or set pretraining.enabled=false")
        bad = [s for s in p.eval_at if not 0 < s <= p.steps]
        if not p.eval_at or bad:
            raise UserError(f"{source}: pretraining.eval_at={list(p.eval_at)} must be non-empty and within "
                            f"1..pretraining.steps={p.steps}")
    if not 0 < suite.confidence < 1:
        raise UserError(f"{source}: confidence={suite.confidence} must lie in (0, 1)")
    return suite


def load_study(path: str | Path, quick: bool = False, overrides: list[str] = ()) -> StudySuite:
    """The validated suite, with its ``quick:`` block merged when ``quick`` and the dotlist ``overrides`` last.

    Merging happens on the YAML nodes, so escaped interpolations (``\\${...}`` in variant overrides, resolved later
    against the run's own config) stay escaped until the suite object is built.
    """

    path = resolve_path(path)
    if not path.is_file():
        raise UserError(f"study suite {path} not found; pass suite=eval/study/embedded.yaml or another protocol YAML")
    for item in overrides:
        if "=" not in item:
            raise UserError(f"set: '{item}' is not of the form key=value (e.g. distill.steps=200)")
    raw = load_yaml(path)
    where = "the file"
    try:
        conf = OmegaConf.merge(OmegaConf.structured(StudySuite), raw)
        if quick:
            where = "its 'quick:' block"
            if not raw.get("quick"):
                raise UserError(f"{path}: quick=true but the suite has no 'quick:' block")
            conf = OmegaConf.merge(conf, raw.quick)
        where = "set=[...]"
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(list(overrides)))
        suite = OmegaConf.to_object(conf)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        raise UserError(f"{path}: bad study setting '{key}' in {where}: {str(exc).splitlines()[0]}") from None
    return _validate(suite, str(path))
