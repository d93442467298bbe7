"""Suites: generate sample folders from a tiny exported model + a procedural reference, skip complete ones."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmd_dar.artifact import ArtifactMeta, DiffusionConfig, generate, load_artifact, save_artifact
from dmd_dar.config import build_config
from dmd_dar.errors import UserError
from dmd_dar.evaluation import EvalConfig, Evaluation, run
from dmd_dar.evaluation.suite import apply_suite_settings, load_suite
from dmd_dar.models import build_model, preset_config

REPO = Path(__file__).resolve().parents[1]
SUITE = """
name: tiny
out_dir: {out}
models:
  - {{name: teacher, checkpoint: {ckpt}, steps: 2, cfg_scale: 1.5}}
  - {{name: teacher_1step, checkpoint: {ckpt}, steps: 1}}
num_per_class: 2
seed: 3
batch_size: 8
device: cpu
reference: {{kind: procedural, split: heldout, num_per_class: 2}}
metrics: [spectral, lpips_fidelity]
eval: {{bootstrap: 50, report: false, lpips: {{random_backbone: true}}}}
"""


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    model = build_model(preset_config("tiny", num_classes=2))
    meta = ArtifactMeta(role="teacher", diffusion=DiffusionConfig(sample_steps=2),
                        class_names=["stripes_high", "smooth_blobs"])
    save_artifact(root / "tiny_teacher", model, meta)
    path = root / "tiny.yaml"
    path.write_text(SUITE.format(out=root / "out", ckpt=root / "tiny_teacher"))
    return path


def test_suite_generates_evaluates_and_skips_complete_folders(suite_file, capsys):
    out = suite_file.parent / "out"
    run(build_config(EvalConfig, [], [f"suite={suite_file}"]))
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"]["n"] == {"teacher": 4, "teacher_1step": 4, "reference": 4}
    assert m["protocol"]["resolution"] == [16, 16] and m["protocol"]["config"]["bootstrap"] == 50
    assert [i["generated"] for i in m["protocol"]["suite"]["models"]] == [True, True]
    assert m["protocol"]["suite"]["reference"]["split"] == "heldout"
    recs = [json.loads(x) for x in (out / "samples" / "teacher" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["class_name"], r["seed"]) for r in recs] == [("stripes_high", 3), ("stripes_high", 4),
                                                          ("smooth_blobs", 3), ("smooth_blobs", 4)]
    ref = [json.loads(x) for x in (out / "reference" / "manifest.jsonl").read_text().splitlines()]
    assert {r["class_name"] for r in ref} == {"stripes_high", "smooth_blobs"} and ref[0]["caption"]
    c = Evaluation.load(out).comparisons[2]
    assert c.name == "teacher_1step vs teacher" and c.pairing.n == 4
    assert "at least 32x32" in c.lpips_fidelity.needs  # 16x16 images: recorded, not a crash
    assert set(c.spectral.per_group_hf_gap_db) == {"stripes_high", "smooth_blobs"}
    stamp = (out / "samples" / "teacher" / "00000.png").stat().st_mtime_ns
    capsys.readouterr()
    run(build_config(EvalConfig, [], [f"suite={suite_file}", "bootstrap=20"]))  # the command line wins
    log = capsys.readouterr().out
    assert log.count("is complete") == 3 and "sampling" not in log
    assert (out / "samples" / "teacher" / "00000.png").stat().st_mtime_ns == stamp
    assert json.loads((out / "metrics.json").read_text())["protocol"]["config"]["bootstrap"] == 20


def test_suite_settings_fill_only_defaults():
    cfg = build_config(EvalConfig, [], ["bootstrap=7"])
    new = apply_suite_settings(cfg, {"bootstrap": 99, "clip": {"prefix": "", "hint": "dmd-dar train-clip"}})
    assert new.bootstrap == 7 and new.clip.prefix == "" and new.clip.hint == "dmd-dar train-clip"
    with pytest.raises(UserError, match="not an eval config key"):
        apply_suite_settings(cfg, {"clip": {"nope": 1}})


def test_shipped_suites_parse_and_t2i_writes_a_generation_plan(tmp_path):
    emb = load_suite(REPO / "eval/suites/embedded.yaml")
    assert emb.eval["clip"]["hint"] == "dmd-dar train-clip" and emb.reference.split == "heldout"
    t2i = load_suite(REPO / "eval/suites/t2i_detail.yaml")
    assert all(m.samples for m in t2i.models)
    prompts = [p for p in open(REPO / "eval/prompts/detail_prompts.txt", encoding="utf-8").read().splitlines() if p.strip()]
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    with pytest.raises(UserError, match="generation_plan.jsonl"):
        run(build_config(EvalConfig, [], [f"suite={REPO / 'eval/suites/t2i_detail.yaml'}", f"out_dir={tmp_path}"]))
    plan = [json.loads(x) for x in (tmp_path / "generation_plan.jsonl").read_text().splitlines()]
    assert len(plan) == 4 * len(prompts) and plan[1] == {"file": "00001.png", "index": 1, "seed": 1,
                                                         "caption": prompts[0]}


def test_class_subset_by_name_samples_and_references_only_those_classes(suite_file, tmp_path):
    text = suite_file.read_text().replace(f"out_dir: {suite_file.parent / 'out'}", f"out_dir: {tmp_path / 'out'}")
    subset = tmp_path / "subset.yaml"
    subset.write_text(text + "classes: [smooth_blobs]\n")
    run(build_config(EvalConfig, [], [f"suite={subset}"]))
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["protocol"]["n"] == {"teacher": 2, "teacher_1step": 2, "reference": 2}
    for folder in ("samples/teacher", "reference"):
        recs = [json.loads(x) for x in (tmp_path / "out" / folder / "manifest.jsonl").read_text().splitlines()]
        assert {r["class_name"] for r in recs} == {"smooth_blobs"}, folder
    subset.write_text(text + "classes: [checkers]\n")
    with pytest.raises(UserError, match=r"'checkers'.*names: stripes_high, smooth_blobs"):
        run(build_config(EvalConfig, [], [f"suite={subset}"]))


def test_guidance_interval_comes_from_the_model_or_the_caller_and_reaches_the_suite(tmp_path):
    """A teacher's ``diffusion.cfg_interval`` is its sampling default (and survives export); ``cfg_interval=``
    overrides it; a suite model's interval changes its samples and is recorded in the folder's stamp."""
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", num_classes=2))
    with torch.no_grad():  # adaLN-Zero starts label-blind; random weights make guidance visible
        for p in model.parameters():
            p.normal_(0, 0.2)
    folder = save_artifact(tmp_path / "interval_teacher", model.eval(), ArtifactMeta(
        role="teacher", diffusion=DiffusionConfig(sample_steps=4, cfg_scale=3.0, cfg_interval=[0.5, 1.0]),
        class_names=["stripes_high", "smooth_blobs"]))
    loaded, meta = load_artifact(folder)
    assert meta.diffusion.cfg_interval == [0.5, 1.0]
    labels, seeds = torch.tensor([0, 1]), [5, 6]
    default = generate(loaded, meta, labels, seeds)
    assert torch.equal(default, generate(loaded, meta, labels, seeds, cfg_interval=[0.5, 1.0]))
    everywhere = generate(loaded, meta, labels, seeds, cfg_interval=[0.0, 1.0])
    assert not torch.allclose(default, everywhere)
    old = json.loads((folder / "dmd_dar.json").read_text())
    del old["diffusion"]["cfg_interval"]  # an export from before the option: every step is guided
    (folder / "dmd_dar.json").write_text(json.dumps(old))
    assert torch.equal(generate(*load_artifact(folder), labels, seeds), everywhere)
    old["diffusion"]["cfg_interval"] = [0.8, 0.2]
    (folder / "dmd_dar.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match=r"dmd_dar.json: unreadable model description \(diffusion.cfg_interval"):
        load_artifact(folder)
    del old["diffusion"]["cfg_interval"]
    (folder / "dmd_dar.json").write_text(json.dumps(old))

    out = tmp_path / "out"
    suite = tmp_path / "interval.yaml"
    suite.write_text(SUITE.format(out=out, ckpt=folder).replace(
        "steps: 1}", "steps: 2, cfg_scale: 1.5, cfg_interval: [0.6, 1.0]}"))
    run(build_config(EvalConfig, [], [f"suite={suite}"]))
    models = json.loads((out / "metrics.json").read_text())["protocol"]["suite"]["models"]
    assert "cfg_interval" not in models[0] and models[1]["cfg_interval"] == [0.6, 1.0]
    a, b = (json.loads((out / "samples" / n / "suite_stamp.json").read_text()) for n in ("teacher", "teacher_1step"))
    assert b["cfg_interval"] == [0.6, 1.0]
    assert a["steps"] == b["steps"] == 2 and a["cfg_scale"] == b["cfg_scale"] == 1.5
    px = [np.asarray(Image.open(out / "samples" / n / "00000.png")) for n in ("teacher", "teacher_1step")]
    assert not np.array_equal(*px)

    suite.write_text(SUITE.format(out=out, ckpt=folder).replace("steps: 1}", "steps: 1, cfg_interval: [0.9, 0.2]}"))
    with pytest.raises(UserError, match="teacher_1step.*cfg_interval"):
        load_suite(suite)
