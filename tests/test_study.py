"""dmd-dar study on a tiny teacher: the whole pipeline writes its table/report/results.md; a rerun skips every
finished unit; a run with a checkpoint resumes; a retuned base config is refused; the seed statistics."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dmd_dar.artifact import ArtifactMeta, DiffusionConfig, save_artifact
from dmd_dar.cli import main
from dmd_dar.data.procedural import CLASS_NAMES
from dmd_dar.models import build_model, preset_config
from dmd_dar.study import StudyConfig, estimate_seconds, load_study
from dmd_dar.study import aggregate as A

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16,
                                             "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}

DISTILL = """
networks: {{teacher: {teacher}, student_routing: {{kind: dar, query: static_t}}, fake_routing: {{kind: residual}}}}
method: {{ttur: 2, student_steps: 1, regression_weight: 0.5, regression_pairs: 4, regression_steps: 2}}
data: {{image_size: 16}}
run: {{batch_size: 2, steps: 50}}
"""
TEACHER = """
model: {image_size: 16, in_channels: 3, patch_size: 4, hidden_size: 32, depth: 2, num_heads: 2, num_classes: 8}
diffusion: {sample_steps: 2}
data: {image_size: 16}
optim: {lr: 1.0e-3, warmup_steps: 1}
run: {batch_size: 2, steps: 6000}
"""
EVAL = """
name: tiny
models: []
num_per_class: 2
seed: 0
batch_size: 16
reference: {{kind: procedural, split: heldout, num_per_class: 2}}
metrics: [spectral, lpips_fidelity, lpips_diversity, clip_score, fd, cmmd]
eval:
  bootstrap: 20
  bootstrap_fd: 3
  lpips: {{random_backbone: true}}
  clip: {{model_config: {clip}, random_init: true, pre_resize: null, prefix: "", text_source: class,
          class_template: "a photo of {{phrase}}"}}
"""
STUDY = """
name: tiny_study
description: tiny end-to-end study
out_dir: {out}
distill:
  config: [{distill}]
  steps: 2
  log_every: 1
  ckpt_every: 2
  student_steps: [1]
  seeds: [0]
  baseline: residual
  variants:
    - {{name: residual, overrides: [networks.student_routing.kind=residual]}}
    - {{name: dar_static_t, label: DAR static_t, overrides: [networks.student_routing.query=static_t,
        'networks.fake_routing.chunk_size=\\${{networks.student_routing.chunk_size}}']}}
eval:
  suite: {eval}
  overrides: {{num_per_class: 2}}
  teacher: {{name: teacher_2step, steps: 2}}
  grid_per_class: 2
pretraining:
  enabled: true
  config: [{teacher}]
  seeds: [0]
  steps: 2
  eval_at: [1, 2]
  ckpt_every: 1
  log_every: 1
  fd_num_per_class: 2
  fd_sample_steps: 2
  bootstrap_fd: 3
  baseline: residual
  variants:
    - {{name: residual, overrides: []}}
    - {{name: dar_static_t_c4, overrides: [model.routing.kind=dar, model.routing.query=static_t,
                                           model.routing.chunk_size=4]}}
quick:
  distill: {{steps: 1}}
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", num_classes=8))
    with torch.no_grad():  # non-trivial outputs (adaLN-Zero and the head start at zero)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    teacher = save_artifact(root / "teacher", model.eval(), ArtifactMeta(
        role="teacher", diffusion=DiffusionConfig(sample_steps=2), class_names=list(CLASS_NAMES)))
    (root / "clip.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    (root / "distill.yaml").write_text(DISTILL.format(teacher=teacher))
    (root / "teacher.yaml").write_text(TEACHER)
    (root / "eval.yaml").write_text(EVAL.format(clip=root / "clip.json"))
    (root / "study.yaml").write_text(STUDY.format(out=root / "out", distill=root / "distill.yaml",
                                                  eval=root / "eval.yaml", teacher=root / "teacher.yaml"))
    assert main(["study", f"suite={root / 'study.yaml'}", "progress=false"]) == 0
    return root


def test_study_writes_table_report_and_results(study):
    out = study / "out"
    res = json.loads((out / "results.json").read_text())
    rows = res["detail"]["rows"]
    assert [(r["variant"], r["student_steps"], r["evaluated"]) for r in rows] == [
        ("residual", 1, [0]), ("dar_static_t", 1, [0])]
    m = rows[1]["metrics"]
    assert m["hf_gap_db_vs_teacher"]["n"] == 1 and "bootstrap" in m["hf_gap_db_vs_teacher"]["method"]
    for key in ("hf_gap_db_vs_data", "hf_ratio", "clip_score", "fd_vs_data", "cmmd_vs_teacher"):
        assert m[key] is not None and math.isfinite(m[key]["estimate"]), key
    assert m["lpips_fidelity"] is None and m["lpips_diversity"] is None  # 16x16: recorded unavailable, no crash
    per_class = res["detail"]["per_class"][0]["classes"]
    assert set(per_class) == set(CLASS_NAMES) and per_class["stripes_high"]["hf_ratio"] is not None
    # the variants really differ in routing, and the health curves were read
    cfg = (out / "distill" / "dar_static_t" / "1step" / "seed0" / "config.yaml").read_text()
    assert "kind: dar" in cfg and "steps: 2" in cfg
    assert res["detail"]["recipes"]["dar_static_t"]["1"]["fake_routing"]["chunk_size"] == 4  # escaped interpolation
    assert res["detail"]["health"]["residual-1step-seed0"]["diverged"] is False
    assert len(list((out / "distill" / "regression_cache").glob("regression_pairs_*"))) == 1  # shared by the runs
    assert res["detail"]["recipes"]["dar_static_t"]["1"]["student_routing"]["kind"] == "dar"
    assert "1" in res["detail"]["reading"]["by_steps"]
    md = (out / "results.md").read_text()
    assert f"suite={study / 'study.yaml'}" in md and "student DAR static_t c4, fake score residual" in md and "| DAR static_t | 1 | 1/1 |" in md and "claim" in md
    html = (out / "report.html").read_text()
    assert "Training health" in html and "Per class" in html and "data:image/png;base64" in html
    assert (out / "plots" / "spectra_1step.png").is_file() and (out / "plots" / "health_1step.png").is_file()
    fd = json.loads((out / "fd_vs_iterations.json").read_text())
    assert fd["steps"] == [1, 2] and set(fd["curves"]) == {"residual", "dar_static_t_c4"}
    assert all(fd["curves"]["dar_static_t_c4"]["fd"][s] is not None for s in ("1", "2"))
    assert (out / "fd_vs_iterations.png").is_file() and "FD vs iterations" in md
    pre_cfg = (out / "pretraining" / "dar_static_t_c4" / "seed0" / "config.yaml").read_text()
    assert "chunk_size: 4" in pre_cfg


def test_rerun_skips_everything_and_a_checkpointed_run_resumes(study, monkeypatch, capsys):
    import dmd_dar.distill.trainer as trainer
    import dmd_dar.evaluation as evaluation
    import dmd_dar.sampling as sampling
    import dmd_dar.training.teacher as teacher

    out = study / "out"
    before = json.loads((out / "results.json").read_text())

    def forbidden(*a, **k):
        raise AssertionError("a finished unit was run again")

    real_distill = trainer.run
    for mod, name in ((trainer, "run"), (teacher, "run"), (evaluation, "evaluate"), (sampling, "sample_folder")):
        monkeypatch.setattr(mod, name, forbidden)
    assert main(["study", f"suite={study / 'study.yaml'}", "progress=false"]) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["detail"]["rows"] == before["detail"]["rows"]
    assert after["pretraining"]["curves"] == before["pretraining"]["curves"]

    # One more distill step: every run resumes from its step-2 checkpoint (then is re-sampled and re-evaluated).
    monkeypatch.undo()
    assert trainer.run is real_distill
    capsys.readouterr()
    assert main(["study", f"suite={study / 'study.yaml'}", "progress=false", "pretraining=false",
                 f"out_dir={out}", "set=[distill.steps=3]"]) == 0
    assert "'set=[distill.steps=3]'" in (out / "results.md").read_text()  # the exact command, shell-quoted
    run_dir = out / "distill" / "dar_static_t" / "1step" / "seed0"
    log = (run_dir / "stdout.log").read_text()  # the trainer's printout, kept off the study's console
    assert "resumed from" in log and "at step 2" in log and "resumed from" not in capsys.readouterr().out
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_retuned_base_config_is_refused(study, capsys):
    text = (study / "distill.yaml").read_text()
    changed = study / "distill_retuned.yaml"
    changed.write_text(text.replace("ttur: 2", "ttur: 3"))
    suite = (study / "study.yaml").read_text().replace(str(study / "distill.yaml"), str(changed))
    (study / "study_retuned.yaml").write_text(suite)
    assert main(["study", f"suite={study / 'study_retuned.yaml'}", "progress=false", "pretraining=false"]) == 2
    err = capsys.readouterr().err
    assert "method.ttur" in err and "another config" in err


def test_finished_runs_of_another_teacher_are_refused(study, capsys):
    """Same config, but the teacher file now holds other weights: the finished runs describe the old teacher, so
    the study must not reuse them as results."""
    from dmd_dar.artifact import load_artifact

    teacher = study / "teacher"
    weights = teacher / "model.safetensors"
    original = weights.read_bytes()
    try:
        model, meta = load_artifact(teacher)
        with torch.no_grad():
            model.final_layer.linear.bias.add_(0.1)
        save_artifact(teacher, model, meta)
        assert main(["study", f"suite={study / 'study.yaml'}", "progress=false", "pretraining=false"]) == 2
        err = capsys.readouterr().err
        assert "other teacher weights" in err and "new out_dir" in err
    finally:
        weights.write_bytes(original)


def test_seed_interval_is_student_t_and_overlap_rule():
    cis = [{"estimate": v, "low": v - 1, "high": v + 1} for v in (1.0, 2.0, 3.0)]
    agg = A.over_seeds(cis, 0.95)
    # mean 2, sd 1, n 3: half-width = t_{0.975, 2} / sqrt(3) = 4.3027 / 1.7321
    assert agg["estimate"] == 2.0 and np.isclose(agg["half_width"], 4.302653 / np.sqrt(3), atol=1e-5)
    assert A.over_seeds([None, None], 0.95) is None
    far = {"estimate": 10.0, "low": 9.0, "high": 11.0}
    c = A.compare_cells("fd_vs_data", agg, far, "DAR", "residual")
    assert c["significant"] and c["better"] and "DAR is better" in c["text"]
    near = {"estimate": 2.5, "low": 1.0, "high": 4.0}
    assert "no significant difference" in A.compare_cells("hf_gap_db_vs_teacher", agg, near, "a", "b")["text"]
    assert A.claim_verdict([A.compare_cells("hf_gap_db_vs_teacher", {"estimate": -0.5, "low": -0.7, "high": -0.3},
                                            {"estimate": -3.0, "low": -3.5, "high": -2.5}, "a", "b")]).startswith(
        "supported")


def test_paired_rule_uses_per_seed_differences():
    """Two variants whose seeds move together: unpaired intervals overlap, the per-seed differences do not."""
    base = A.over_seeds([{"estimate": v, "low": v, "high": v} for v in (1.0, 2.0, 3.0)], 0.95, [0, 1, 2])
    shifted = A.over_seeds([{"estimate": v + 0.1 + e, "low": 0, "high": 0} for v, e in
                            ((1.0, 0.01), (2.0, -0.01), (3.0, 0.0))], 0.95, [0, 1, 2])
    assert A.overlap(shifted, base)
    d = A.paired_difference(shifted, base, 0.95)
    # differences 0.11, 0.09, 0.10: mean 0.1, sd 0.01, half-width t_{0.975,2} * 0.01 / sqrt(3)
    assert np.isclose(d["estimate"], 0.1) and np.isclose(d["half_width"], 4.302653 * 0.01 / np.sqrt(3), atol=1e-6)
    c = A.compare_cells("fd_vs_data", shifted, base, "DAR", "residual")
    assert c["significant"] and c["better"] is False and "paired difference +0.1" in c["text"]
    # seeds are matched by id, not by position; one common seed is not enough to pair
    reordered = A.over_seeds([{"estimate": 3.1, "low": 0, "high": 0}, {"estimate": 1.1, "low": 0, "high": 0},
                              {"estimate": 2.1, "low": 0, "high": 0}], 0.95, [2, 0, 1])
    assert np.isclose(A.paired_difference(reordered, base, 0.95)["half_width"], 0.0)
    lone = A.over_seeds([{"estimate": 5.0, "low": 4.0, "high": 6.0}], 0.95, [1])
    assert A.paired_difference(lone, base, 0.95) is None
    assert "intervals overlap" in A.compare_cells("fd_vs_data", lone, {"estimate": 5.5, "low": 5, "high": 6},
                                                  "a", "b")["text"]


def test_paired_p_value_has_the_closed_form_and_agrees_with_the_interval():
    base = A.over_seeds([{"estimate": v, "low": v, "high": v} for v in (1.0, 2.0, 3.0)], 0.95, [0, 1, 2])

    def shifted(deltas):
        return A.over_seeds([{"estimate": v + e, "low": 0, "high": 0} for v, e in zip((1.0, 2.0, 3.0), deltas)],
                            0.95, [0, 1, 2])

    d = A.paired_difference(shifted((0.11, 0.09, 0.10)), base, 0.95)
    t = 0.1 / (0.01 / np.sqrt(3))  # with 2 degrees of freedom the t CDF is 1/2 + t / (2 sqrt(2 + t^2))
    assert np.isclose(d["p_value"], 1 - t / np.sqrt(2 + t * t), rtol=1e-6)
    for deltas in ((0.11, 0.09, 0.10), (0.3, -0.1, 0.1), (0.05, 0.04, -0.2), (1.0, 1.2, 0.9)):
        d = A.paired_difference(shifted(deltas), base, 0.95)
        assert (d["p_value"] < 0.05) == (not d["low"] <= 0 <= d["high"])
    assert A.paired_difference(shifted((0.2, 0.2, 0.2)), base, 0.95)["p_value"] < 1e-12  # sd ~ rounding only
    assert A.paired_difference(shifted((0.0, 0.0, 0.0)), base, 0.95)["p_value"] == 1.0


def test_holm_adjust_matches_the_hand_computation():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert np.allclose(A.holm_adjust([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    out = A.holm_adjust([0.5, math.nan, 0.4])  # NaN does not count towards the family size
    assert np.allclose([out[0], out[2]], [0.8, 0.8]) and math.isnan(out[1])
    assert A.holm_adjust([0.9, 0.6]) == [1.0, 1.0] and A.holm_adjust([]) == []


def test_claim_verdict_reports_what_survives_the_correction():
    cmp = A.compare_cells("hf_gap_db_vs_teacher", {"estimate": -0.5, "low": -0.7, "high": -0.3},
                          {"estimate": -3.0, "low": -3.5, "high": -2.5}, "a", "b")
    assert A.claim_verdict([cmp]).startswith("supported (")
    survives = A.claim_verdict([cmp | {"p_holm": 0.01, "family_size": 6}])
    assert survives.startswith("supported (") and "Holm-adjusted p = 0.01 over 6 claim tests" in survives
    lost = A.claim_verdict([cmp | {"p_holm": 0.2, "family_size": 6}])
    assert lost.startswith("supported by this comparison alone, not after correcting") and "0.2" in lost


def test_reading_corrects_the_claim_tests_over_every_variant_and_step_count():
    from dmd_dar.study.report import detail_reading

    suite = load_study(REPO / "eval" / "study" / "embedded.yaml")
    seeds = [0, 1, 2]
    shifts = {"residual": (0.0, 0.0, 0.0), "dar_static_t": (0.11, 0.09, 0.10), "dar_dynamic": (0.3, -0.1, 0.1),
              "dar_fake_only": (2.0, 2.2, 1.9)}
    rows = []
    for k in suite.distill.student_steps:
        for v in suite.distill.variants:
            gap = A.over_seeds([{"estimate": -5.0 + s + d, "low": 0, "high": 0} for s, d in zip(seeds, shifts[v.name])],
                               0.95, seeds)
            rows.append({"variant": v.name, "label": v.label, "student_steps": k, "seeds": seeds, "runs": [],
                         "diverged": 0, "flagged": 0, "metrics": {"hf_gap_db_vs_teacher": gap}})
    reading = detail_reading(suite, rows, {})
    claims = {(k, e["variant"]): next(c for c in e["comparisons"] if c["metric"] == "hf_gap_db_vs_teacher") | {
        "verdict": e["claim"]} for k, b in reading["by_steps"].items() for e in b["variants"]}
    assert len(claims) == 6 and all(c["family_size"] == 6 for c in claims.values())
    raw = [c["paired"]["p_value"] for c in claims.values()]
    assert np.allclose([c["p_holm"] for c in claims.values()], A.holm_adjust(raw))
    # fake_only p = 0.002 and static_t p = 0.0033 (both step counts): x6, x5, x4 keep them below 0.05; dynamic p = 0.48
    assert claims[("1", "dar_static_t")]["verdict"].startswith("supported (")
    assert claims[("1", "dar_dynamic")]["verdict"].startswith("not supported")


def test_embedded_suite_budgets_and_quick_block():
    suite_file = REPO / "eval" / "study" / "embedded.yaml"
    full, quick = load_study(suite_file), load_study(suite_file, quick=True)
    assert len(full.distill.variants) == 4 and full.distill.student_steps == [1, 4] and len(full.distill.seeds) == 3
    assert len(full.pretraining.seeds) == 3 and len(full.pretraining.variants) == 3
    assert quick.distill.student_steps == [1] and quick.distill.seeds == [0]
    assert estimate_seconds(full, True, True)["total"] <= 2 * 3600
    assert estimate_seconds(quick, True, quick.pretraining.enabled)["total"] <= 20 * 60
    assert StudyConfig().suite == "eval/study/embedded.yaml"


def test_health_divergence_is_hard_evidence_and_growth_only_a_flag(tmp_path):
    ok, nan = tmp_path / "ok", tmp_path / "nan"
    for d, last in ((ok, 1.0), (nan, float("nan"))):
        d.mkdir()
        recs = [{"step": s, "gen/dm_loss": 0.1 * s, "critic/fake_loss": 1.0, "drift/std_ratio": 1.0 + s}
                for s in range(1, 21)] + [{"step": 21, "critic/fake_loss": last}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    h = A.read_health(ok, ["gen/dm_loss", "critic/fake_loss"], blowup_factor=10.0)
    assert not h["diverged"] and len(h["flags"]) == 2  # dm loss grew 19x, output std 21x the teacher's
    assert h["curves"]["critic/fake_loss"][-1] == [21, 1.0] and h["final"]["gen/dm_loss"] == 2.0
    assert A.read_health(nan, ["critic/fake_loss"], blowup_factor=10.0)["diverged"]


def test_diverging_runs_are_recorded_not_fatal(study, monkeypatch):
    import dmd_dar.distill.trainer as trainer
    import dmd_dar.training.teacher as teacher
    from dmd_dar.distill.health import NonFiniteTrainingError

    def distill_nan(cfg):
        raise NonFiniteTrainingError("10 non-finite critic steps in a row")

    def teacher_nan(cfg):
        raise RuntimeError("non-finite teacher loss at step 0; lower optim.lr or check the data")

    monkeypatch.setattr(trainer, "run", distill_nan)
    monkeypatch.setattr(teacher, "run", teacher_nan)
    out = study / "diverged"
    assert main(["study", f"suite={study / 'study.yaml'}", "progress=false", f"out_dir={out}"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["diverged"], r["evaluated"]) for r in res["detail"]["rows"]] == [(1, []), (1, [])]
    assert "diverged (non-finite losses)" in res["detail"]["reading"]["by_steps"]["1"]["health"]
    assert res["pretraining"]["curves"]["residual"]["diverged_seeds"] == {"0": "non-finite teacher loss at step 0; "
                                                                                 "lower optim.lr or check the data"}
    assert any("diverged in 1/1 seeds" in x for x in res["pretraining"]["reading"])
    assert main(["study", f"suite={study / 'study.yaml'}", "progress=false", f"out_dir={out}"]) == 0  # skipped now
