"""``dmd-dar study``: run a study suite end to end, resumably, with one progress bar, then write its report.

Layout of ``<out_dir>``::

    distill/<variant>/<k>step/seed<s>/     distill runs (config.yaml, metrics.jsonl, checkpoints/, export/)
    eval/reference/, eval/samples/<set>/   held-out data and sample folders (dmd_dar.evaluation.suite)
    eval/runs/<run>/metrics.json           each student vs the teacher's 50-step samples and vs the data
    pretraining/<variant>/seed<s>/         teacher pretraining runs with fd.json (FD at eval_at iterations)
    results.json, results.md, report.html, fd_vs_iterations.{png,json}, plots/*.png
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dmd_dar.config import build_config
from dmd_dar.distill.config import DistillConfig
from dmd_dar.errors import UserError
from dmd_dar.study import detail as D
from dmd_dar.study import pretraining as P
from dmd_dar.study.config import StudyConfig, StudySuite, load_study, resolve_path
from dmd_dar.study.report import write_study_outputs
from dmd_dar.training.teacher import TeacherConfig
from dmd_dar.utils.io import atomic_write_json


def command_line(cfg: StudyConfig) -> str:
    """The command that reproduces this study (what results.md quotes)."""
    parts = ["dmd-dar", "study", f"suite={cfg.suite}"]
    if cfg.quick:
        parts.append("quick=true")
    if not cfg.detail:
        parts.append("detail=false")
    if cfg.pretraining is not None:
        parts.append(f"pretraining={str(cfg.pretraining).lower()}")
    if cfg.out_dir:
        parts.append(f"out_dir={cfg.out_dir}")
    if cfg.set:
        parts.append("set=[" + ",".join(f'"{x}"' if any(c in x for c in "[],") else x for x in cfg.set) + "]")
    return " ".join(shlex.quote(p) for p in parts)


def study_dir(cfg: StudyConfig, suite: StudySuite) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return Path(suite.out_dir + ("_quick" if cfg.quick else ""))


def estimate_seconds(suite: StudySuite, detail: bool, pretraining: bool) -> dict[str, float]:
    """The budget arithmetic of the YAML comments, from the suite's ``budget`` rates (seconds per part)."""
    b, d, p = suite.budget, suite.distill, suite.pretraining
    out: dict[str, float] = {}
    if detail:
        base = build_config(DistillConfig, [resolve_path(x) for x in d.config], list(d.overrides))
        steps = d.steps if d.steps is not None else base.run.steps
        scale = base.run.batch_size / b.distill_batch
        per = {k: b.distill_iter.get(k, max(b.distill_iter.values())) * scale * steps + b.distill_run_overhead
               for k in d.student_steps}
        out["distill"] = sum(per[k] for k in d.student_steps) * len(d.seeds) * len(d.variants)
        npc = int(suite.eval.overrides.get("num_per_class", 64))
        out["teacher_samples"] = 8 * npc * (suite.eval.teacher.steps or 50) * 2 * b.teacher_image_step
        out["eval"] = b.eval_run * len(d.student_steps) * len(d.seeds) * len(d.variants)
    if pretraining:
        base_t = build_config(TeacherConfig, [resolve_path(x) for x in p.config], list(p.overrides))
        it = b.teacher_iter * base_t.run.batch_size / b.teacher_batch
        fd = len(P.stages(suite)) * (8 * p.fd_num_per_class * p.fd_sample_steps * 2 * b.teacher_image_step
                                     + b.fd_point_overhead)
        out["pretraining"] = len(p.seeds) * len(p.variants) * (p.steps * it + fd)
    out["total"] = sum(out.values())
    return out


def _print_plan(cfg: StudyConfig, suite: StudySuite, out: Path, detail: bool, pretraining: bool) -> None:
    est = estimate_seconds(suite, detail, pretraining)
    print(f"study {suite.name}: out_dir={out}  quick={cfg.quick}")
    if detail:
        d = suite.distill
        print(f"  detail: {len(d.variants)} variants x student_steps {list(d.student_steps)} x seeds {list(d.seeds)}"
              f" = {len(D.plan_runs(suite, out))} distill runs, steps per run: "
              f"{d.steps if d.steps is not None else 'the base config run.steps'}")
    if pretraining:
        p = suite.pretraining
        print(f"  pretraining: {len(p.variants)} variants x seeds {list(p.seeds)}, {p.steps} steps, FD at "
              f"{P.stages(suite)}")
    print("  estimate: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in est.items()))


def run(cfg: StudyConfig) -> Path:
    """Run (or resume) the study; returns the path of ``report.html``."""
    suite_file = resolve_path(cfg.suite)
    suite = load_study(suite_file, cfg.quick, cfg.set)
    out = study_dir(cfg, suite)
    do_detail = cfg.detail
    do_pre = suite.pretraining.enabled if cfg.pretraining is None else cfg.pretraining
    if do_pre and not suite.pretraining.variants:
        raise UserError(f"{suite_file}: pretraining=true but pretraining.variants is empty")
    if not (do_detail or do_pre):
        raise UserError("nothing to run: detail=false and pretraining=false")
    _print_plan(cfg, suite, out, do_detail, do_pre)
    if cfg.plan:
        return out / "report.html"
    out.mkdir(parents=True, exist_ok=True)
    device = cfg.device
    inner = cfg.inner_progress

    # Resolve every config first: a bad variant fails now, not after hours of earlier runs.
    runs = D.plan_runs(suite, out) if do_detail else []
    dcfgs = [D.distill_config(suite, suite_file, r, device, inner) for r in runs]
    teachers = {D.teacher_folder(c) for c in dcfgs}
    if len(teachers) > 1:
        raise UserError(f"{suite_file}: the variants distill different teachers {sorted(map(str, teachers))}; a "
                        "study compares students of one teacher")
    teacher = next(iter(teachers)) if teachers else None
    pre_runs = P.plan_pretraining(suite, out) if do_pre else []
    if do_pre:
        P.ensure_teacher_variant_ok(suite, suite_file)

    states = [D.distill_state(r, c) for r, c in zip(runs, dcfgs)]
    pre_pending = {r.name: P.pending(suite, suite_file, r, device) for r in pre_runs}
    total = 2 * len(runs) + sum(len(P.stages(suite)) for _ in pre_runs)
    started = time.time()
    record: dict[str, Any] = {"command": command_line(cfg), "argv": sys.argv, "suite_file": str(suite_file),
                              "quick": cfg.quick, "started": started, "detail": do_detail, "pretraining": do_pre}
    atomic_write_json(record, out / "study_run.json")
    bar = tqdm(total=total, desc=f"study {suite.name}", unit="task", disable=not cfg.progress, dynamic_ncols=True)
    metric_files: dict[str, Path] = {}
    try:
        for r, c, state in zip(runs, dcfgs, states):
            bar.set_postfix_str(f"distill {r.name}")
            if state == "todo":
                state = D.distill(r, c)
            else:
                tqdm.write(f"study: {r.name}: {state}, skipping")
            bar.update(1)
            bar.set_postfix_str(f"sample + eval {r.name}")
            if state == "done":
                metric_files[r.name] = D.sample_and_evaluate(suite, suite_file, out, teacher, r, device)
            bar.update(1)
        for r in pre_runs:
            todo = pre_pending[r.name]
            bar.update(len(P.stages(suite)) - len(todo))
            for i, step in enumerate(todo):
                bar.set_postfix_str(f"{r.name} -> {step}")
                point = P.run_stage(suite, suite_file, out, r, step, device, inner)
                bar.update(1)
                if point.get("failed"):  # diverged: no later stages
                    bar.update(len(todo) - i - 1)
                    break
    finally:
        bar.close()
    record["finished"] = time.time()
    record["elapsed_s"] = record["finished"] - started
    atomic_write_json(record, out / "study_run.json")
    recipes = {}
    for r, c in zip(runs, dcfgs):
        recipes.setdefault(r.variant.name, {})[str(r.student_steps)] = D.recipe(c)
    report = write_study_outputs(suite, cfg, out, runs, metric_files, pre_runs, teacher, command_line(cfg),
                                 recipes)
    print(f"study: wrote {report}, {out / 'results.md'}")
    return report


def load_results(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / "results.json").read_text())
