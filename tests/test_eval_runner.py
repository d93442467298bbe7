"""dmd-dar eval on tiny folders: metrics.json fields, CIs, pairing, backbones missing, bad input."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dmd_dar.config import build_config
from dmd_dar.data.manifest import save_png_folder
from dmd_dar.data.procedural import ProceduralImages
from dmd_dar.errors import UserError
from dmd_dar.evaluation import EvalConfig, Evaluation, evaluate, run
from dmd_dar.evaluation.results import Available, Paired, Unavailable
from dmd_dar.metrics.availability import MetricUnavailable
from dmd_dar.metrics.bootstrap import Interval
from dmd_dar.metrics.distribution import cmmd, cmmd_interval, mmd2_from_counts, rbf_kernel
from dmd_dar.metrics.spectral import gap_interval

TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                             "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
FAST = ["bootstrap=200", "bootstrap_fd=10", "lpips.random_backbone=true", "report=false"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """teacher: procedural images; student: the same images blurred (same records, so they pair); ref: others."""
    root = tmp_path_factory.mktemp("eval")
    ds = ProceduralImages("heldout", 16, size=32, classes=["stripes_high", "smooth_blobs"])
    x, cids, caps = ds.render(range(8))
    recs = [{"seed": i, "class_id": int(c), "class_name": ds.class_names[int(c)]} for i, c in enumerate(cids)]
    save_png_folder(x, root / "teacher", recs)
    save_png_folder(torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False), root / "student", recs)
    y, cy, cap_y = ds.render(range(8, 16))
    save_png_folder(y, root / "ref", [{"class_id": int(c), "class_name": ds.class_names[int(c)], "caption": t}
                                      for c, t in zip(cy, cap_y)])
    (root / "tiny_clip.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    return root


def cfg_for(root, *extra):
    return build_config(EvalConfig, [], [f"samples=[{root / 'teacher'},{root / 'student'}]",
                                         f"reference={root / 'ref'}", *FAST, *extra])


@pytest.fixture(scope="module")
def full(folders):
    cfg = cfg_for(folders, "clip.random_init=true", f"clip.model_config={folders / 'tiny_clip.json'}",
                  "clip.pre_resize=null", f"out_dir={folders / 'out'}")
    run(cfg)
    return Evaluation.load(folders / "out" / "metrics.json")


def _cis(obj, path=""):
    """Every interval of a typed result, with its path."""
    if isinstance(obj, Interval):
        yield path, obj
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _cis(getattr(obj, f.name), f"{path}/{f.name}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _cis(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _cis(v, f"{path}/{i}")


def test_metrics_json_protocol_and_fields(full):
    p = full.protocol
    assert p["resolution"] == [32, 32] and p["n"] == {"teacher": 8, "student": 8, "reference": 8}
    assert p["baseline"] == "teacher" and p["reference"] == "reference"
    assert p["models"]["lpips"]["backbone"]["note"].startswith("random")
    assert p["models"]["clip"]["model_config"]["sha256"] and p["models"]["clip"]["weights"]["random_init"]
    assert p["package_versions"]["torch"] and p["spectral"]["window"].startswith("symmetric Hann")
    assert p["seeds"]["teacher"] == {"unique": 8, "min": 0, "max": 7} and p["seeds"]["reference"] is None
    assert p["bootstrap"]["n_boot"] == 200
    assert all(isinstance(r, Available) for r in full.availability.values())
    assert [c.name for c in full.comparisons] == ["teacher vs reference", "student vs reference",
                                                  "student vs teacher"]
    t = full.sets["teacher"]
    assert set(t.spectral.scalars) == {"hf_ratio@0.25", "hf_ratio@0.5", "hf_ratio@0.75", "band_ratio", "slope"}
    assert set(t.spectral.per_group["hf_ratio@0.5"]) == {"stripes_high", "smooth_blobs"}
    assert set(t.clip_score.per_group) == {"stripes_high", "smooth_blobs"}
    top1 = t.clip_score.top1  # class prompts here: 2 distinct texts
    assert (top1.candidates, top1.chance) == (2, 0.5) and 0 <= top1.accuracy.estimate <= 1
    assert set(top1.per_group) == {"stripes_high", "smooth_blobs"}
    assert t.lpips_diversity.n_groups == 2 and t.lpips_diversity.k_per_group == [4]
    assert full.sets["reference"].lpips_diversity is None
    cmp_ = full.comparisons[2]
    assert cmp_.pairing == Paired(n=8, unpaired=[0, 0])
    assert cmp_.lpips_fidelity.n == 8 and cmp_.clip_score_diff is not None
    assert set(cmp_.spectral.per_group_hf_gap_db) == {"stripes_high", "smooth_blobs"}
    assert isinstance(full.comparisons[0].pairing, Unavailable)  # data reference: different keys
    assert isinstance(full.comparisons[0].lpips_fidelity, Unavailable)


def test_every_ci_brackets_its_estimate(full):
    found = list(_cis(full))
    assert len(found) > 60
    for path, ci in found:
        if not np.isfinite(ci.estimate):
            continue
        assert ci.low <= ci.estimate + 1e-12 and ci.estimate <= ci.high + 1e-12, path


def test_blurred_student_loses_high_frequencies(full):
    s = full.comparisons[2].spectral
    gap = s.hf_gap_db
    assert gap.estimate < -3 and gap.high < 0 and "paired" in gap.method
    per = s.per_group_hf_gap_db
    assert per["stripes_high"].gap.estimate < per["smooth_blobs"].gap.estimate
    assert s.paired_diff["hf_ratio@0.25"].estimate < 0
    v = full.verdicts[2]
    assert v.startswith("student loses ") and "vs teacher; significant" in v
    # the HF gap is a function of the two mean spectra only
    rho = np.asarray(full.sets["student"].spectral.rho)
    g = np.asarray(full.sets["student"].spectral.mean_rapsd, dtype=float)
    r = np.asarray(full.sets["teacher"].spectral.mean_rapsd, dtype=float)
    d = 10 * np.log10(g / r)
    assert gap.estimate == pytest.approx(np.nanmean(d[(rho >= 0.5) & np.isfinite(d)]), rel=1e-9)


def test_missing_backbones_are_recorded_and_strict_fails(folders, tmp_path):
    cfg = cfg_for(folders, "metrics=[spectral,lpips_fidelity,fd]", "lpips.random_backbone=false",
                  f"lpips.backbone_weights={tmp_path / 'alexnet.pth'}", "features.space=inception",
                  f"features.inception_weights={tmp_path / 'inception.pth'}")
    m = evaluate(cfg)
    assert m.availability["lpips_fidelity"].needs == str(tmp_path / "alexnet.pth")
    assert m.availability["fd"].needs == str(tmp_path / "inception.pth")
    assert isinstance(m.comparisons[2].fd, Unavailable) and m.comparisons[2].spectral.hf_gap_db
    with pytest.raises(MetricUnavailable, match="alexnet.pth"):
        evaluate(build_config(EvalConfig, [], [*_args(cfg), "strict=true"]))


def _args(cfg):
    return [f"samples=[{','.join(cfg.samples)}]", f"reference={cfg.reference}", "metrics=[lpips_fidelity]",
            f"lpips.backbone_weights={cfg.lpips.backbone_weights}", "bootstrap=10"]


def test_clip_missing_names_the_file_and_command(folders, tmp_path):
    cfg = cfg_for(folders, "metrics=[clip_score,cmmd]", f"clip.model_config={tmp_path / 'open_clip_config.json'}",
                  f"clip.weights_file={tmp_path / 'model.safetensors'}", "clip.hint=dmd-dar train-clip")
    m = evaluate(cfg)
    rec = m.sets["teacher"].clip_score
    assert isinstance(rec, Unavailable) and rec.needs == str(tmp_path / "open_clip_config.json")
    assert "dmd-dar train-clip" in rec.reason and isinstance(m.availability["cmmd"], Unavailable)


def test_paired_metrics_need_a_manifest(folders, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in sorted((folders / "student").glob("0*.png")):
        shutil.copy(p, bare / p.name)
    cfg = build_config(EvalConfig, [], [f"samples=[{folders / 'teacher'},{bare}]", "metrics=[spectral,lpips_fidelity]",
                                        *FAST])
    m = evaluate(cfg)
    c = m.comparisons[0]
    assert c.name == "bare vs teacher" and isinstance(c.pairing, Unavailable)
    assert "manifest.jsonl" in c.lpips_fidelity.needs and "manifest.jsonl" in c.spectral.paired_log_hf_ratio.needs
    assert c.spectral.hf_gap_db.estimate < 0  # unpaired metrics still work
    assert m.sets["bare"].manifest is False


def test_mixed_sizes_and_unreadable_images_name_the_file(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    Image.new("RGB", (32, 32)).save(d / "a.png")
    Image.new("RGB", (16, 16)).save(d / "b.png")
    with pytest.raises(UserError, match=r"b\.png is 16x16 but a\.png is 32x32"):
        evaluate(build_config(EvalConfig, [], [f"samples=[{d}]", "metrics=[spectral]"]))
    (d / "b.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"cannot read image .*b\.png"):
        evaluate(build_config(EvalConfig, [], [f"samples=[{d}]", "metrics=[spectral]"]))


def test_reference_at_another_resolution(folders, tmp_path):
    big = tmp_path / "big"
    save_png_folder(torch.rand(4, 3, 64, 48) * 2 - 1, big)
    base = [f"samples=[{folders / 'teacher'}]", f"reference={big}", "metrics=[spectral]", "bootstrap=20"]
    with pytest.raises(UserError, match=r"reference .*big is 48x64 but the samples are 32x32.*resize_reference=true"):
        evaluate(build_config(EvalConfig, [], base))
    m = evaluate(build_config(EvalConfig, [], [*base, "resize_reference=true", "resize_filter=box"]))
    r = m.protocol["preprocessing"]["reference_resize"]
    assert r["from"] == [64, 48] and r["to"] == [32, 32] and r["filter"] == "PIL BOX" and r["crop"]
    assert m.sets["reference"].native_resolution == [64, 48] and m.sets["reference"].resolution == [32, 32]


def test_curve_gap_bootstrap_closed_form():
    ref = torch.rand(6, 8, dtype=torch.float64) + 0.5
    ci = gap_interval(ref * 0.5, ref, "hf_gap_db", 0.5, 100, 0.95, 0, paired=True)
    assert ci.estimate == pytest.approx(-10 * np.log10(2)) and ci.low == pytest.approx(ci.high)
    lsd = gap_interval(ref * 2.0, ref, "lsd_db", 0.5, 50, 0.95, 0, paired=True)
    assert lsd.estimate == pytest.approx(10 * np.log10(2))


def test_cmmd_bootstrap_matches_the_estimator():
    g = np.random.default_rng(0)
    x, y = g.normal(size=(12, 4)), g.normal(size=(10, 4)) + 0.5
    for est in ("unbiased", "biased"):
        ci = cmmd_interval(x, y, 10.0, 1000.0, est, 1, 0.95, 0)
        assert np.isfinite(ci.low) and ci.estimate == pytest.approx(cmmd(x, y, 10.0, 1000.0, est), rel=1e-12)
    # with every count equal to one (no resampling) the replicate formula is the estimator itself
    k = (rbf_kernel(x, x, 10.0), rbf_kernel(y, y, 10.0), rbf_kernel(x, y, 10.0))
    for est in ("unbiased", "biased"):
        rep = mmd2_from_counts(*k, np.ones((1, 12)), np.ones((1, 10)), est)
        assert 1000 * rep[0] == pytest.approx(cmmd(x, y, 10.0, 1000.0, est))


def test_clip_texts_from_captions_or_class_prompts(folders):
    from dmd_dar.evaluation import ImageSet

    ref = ImageSet("r", folders / "ref", "a photo of {phrase}")
    assert ref.captions[0].endswith(("high-frequency stripes", "smooth blobs")) and " and " in ref.captions[0]
    by_class = ImageSet("r", folders / "ref", "a photo of {phrase}", text_source="class")
    assert set(by_class.captions) == {"a photo of high-frequency stripes", "a photo of smooth blobs"}
    assert ImageSet("t", folders / "teacher", "{class_name}").captions[0] in {"stripes_high", "smooth_blobs"}


def test_clip_top1_recognises_classes_with_the_shipped_clip(tmp_path):
    """With class prompts, top-1 is zero-shot class accuracy: the in-domain CLIP recognises held-out procedural
    images of all 8 classes, and the same images filed under the wrong classes score near zero."""
    ds = ProceduralImages("heldout", 32, size=32)
    x, cids, _ = ds.render(range(32))
    for name, shift in (("right", 0), ("wrong", 3)):
        recs = [{"seed": i, "class_name": ds.class_names[(int(c) + shift) % 8]} for i, c in enumerate(cids)]
        save_png_folder(x, tmp_path / name, recs)
    cfg = build_config(EvalConfig, [], [f"samples=[{tmp_path / 'right'},{tmp_path / 'wrong'}]", "metrics=[clip_score]",
                                        "clip.model_config=assets/clip/open_clip_config.json",
                                        "clip.weights_file=assets/clip/model.safetensors", "clip.pretrained=null",
                                        "clip.class_template=a photo of {phrase}", "clip.text_source=class",
                                        "clip.prefix=''", "bootstrap=200", "report=false", f"out_dir={tmp_path / 'out'}"])
    run(cfg)
    sets = Evaluation.load(tmp_path / "out" / "metrics.json").sets
    right, wrong = (sets[n].clip_score.top1 for n in ("right", "wrong"))
    assert right.candidates == 8 and right.accuracy.estimate >= 0.9
    assert wrong.accuracy.estimate <= 0.2 and len(right.per_group) == 8
