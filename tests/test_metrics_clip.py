"""CLIP score on a tiny random open_clip architecture: conventions, prefix, file loading, tag handling."""

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from dmd_dar.metrics.availability import MetricUnavailable
from dmd_dar.metrics.clip_score import (
    ClipImageFeatures,
    ClipScore,
    OpenClipModel,
    clip_cosines,
    summarize_cosines,
)
from dmd_dar.metrics.distribution import FeatureAccumulator, FeatureExtractor, distribution_metrics

TINY = "dmd-dar-tiny-clip"
TINY_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("clipcfg") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(str(path))
    torch.manual_seed(0)
    return OpenClipModel(TINY, pretrained=None, random_init=True, pre_resize=None)


def imgs(n, seed, size=40):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


CAPTIONS = ["a red square", "two cats on a sofa", "a blurry photo of a mountain"]


def test_cosines_range_determinism_and_accumulator(tiny):
    x = imgs(3, 1)
    acc = ClipScore(tiny)
    acc.update(x, CAPTIONS, groups=["a", "b", "a"])
    cos = acc.values("cos")
    assert cos.shape == (3,) and bool((cos.abs() <= 1).all())
    res = acc.compute()
    assert res["mean_cos"] == pytest.approx(float(cos.mean()))
    assert res["x100"] == pytest.approx(100 * float(cos.mean()))
    assert res["protocol"]["prefix"] == "A photo depicts " and res["protocol"]["weights"]["random_init"]
    assert set(res["per_group"]) == {"a", "b"}
    again = ClipScore(tiny)
    again.update(x[:1], CAPTIONS[:1])
    half = ClipScore(tiny)
    half.update(x[1:], CAPTIONS[1:])
    torch.testing.assert_close(again.merge_state(half.state_dict()).values("cos"), cos, rtol=1e-6, atol=1e-7)
    e = tiny.encode_images(x)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3, dtype=torch.float64))


def test_conventions_from_fixed_cosines():
    cos = torch.tensor([0.3, -0.5, 0.1], dtype=torch.float64)
    s = summarize_cosines(cos)
    assert s["mean_cos"] == pytest.approx(-0.1 / 3)
    assert s["x100"] == pytest.approx(-10 / 3)
    assert s["torchmetrics_x100"] == 0.0  # clamp of the mean
    assert s["hessel"] == pytest.approx(2.5 * 0.4 / 3)  # per-sample clamp: differs from the above
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(clip_cosines(a, b), torch.nn.functional.cosine_similarity(a, b).double())


def test_prefix_tokens_and_truncation(tiny):
    tok = tiny.tokenize(["a dog"])[0]
    plain = open_clip.get_tokenizer(TINY)(["a photo depicts a dog"])[0]
    torch.testing.assert_close(tok, plain)
    sot, eot = tok[0].item(), 49407
    prefix_ids = open_clip.get_tokenizer(TINY)(["a photo depicts"])[0]
    assert tok[:4].tolist() == prefix_ids[:4].tolist() and tok[0] == sot
    long = tiny.tokenize(["word " * 200])[0]
    assert long.shape == (77,) and long[-1].item() == eot


def test_weights_file_round_trip_safetensors_and_pt(tiny, tmp_path):
    sd = {k: v.contiguous().clone() for k, v in tiny.model.state_dict().items()}
    st = tmp_path / "tiny.safetensors"
    save_file(sd, str(st))
    pt = tmp_path / "tiny.pt"
    torch.save(sd, pt)
    x = imgs(2, 2)
    ref = ClipScore(tiny)
    ref.update(x, CAPTIONS[:2])
    for path in (st, pt):
        m = OpenClipModel(TINY, pretrained=None, weights_file=path, pre_resize=None)
        acc = ClipScore(m)
        acc.update(x, CAPTIONS[:2])
        torch.testing.assert_close(acc.values("cos"), ref.values("cos"), rtol=0, atol=1e-12)
        assert m.protocol()["weights"]["file"] == str(path) and len(m.protocol()["weights"]["sha256"]) == 16


def test_tag_preprocessing_and_quickgelu_applied_to_file_weights(tiny, tmp_path, monkeypatch):
    fake = {"hf_hub": "fake-org/tiny-clip/", "quick_gelu": True, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
            "interpolation": "bilinear", "resize_mode": "squash"}
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda m, t: fake if t == "fake_openai" else real(m, t))
    # No file and nothing cached: unavailable, naming the cache file and repo; no network is touched.
    with pytest.raises(MetricUnavailable) as err:
        OpenClipModel(TINY, pretrained="fake_openai", cache_dir=str(tmp_path / "hf"))
    assert "open_clip_model.safetensors" in err.value.needs and "fake-org/tiny-clip" in err.value.needs
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous().clone() for k, v in tiny.model.state_dict().items()}, str(path))
    m = OpenClipModel(TINY, pretrained="fake_openai", weights_file=path, pre_resize=None)
    proto = m.protocol()
    assert proto["activation"] == "QuickGELU"
    assert isinstance(m.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    pp = proto["preprocess"]["open_clip"]
    assert pp["mean"] == [0.5, 0.5, 0.5] and pp["std"] == [0.25, 0.25, 0.25]
    assert pp["interpolation"] == "bilinear" and pp["resize_mode"] == "squash"
    # Same weights, different activation: the scores must differ (the silent error this guards against).
    x = imgs(1, 3)
    plain = OpenClipModel(TINY, pretrained=None, weights_file=path, pre_resize=None, quick_gelu=False)
    assert not torch.allclose(m.encode_images(x), plain.encode_images(x))


def test_missing_weights_file_is_unavailable(tmp_path):
    missing = tmp_path / "open_clip_model.safetensors"
    with pytest.raises(MetricUnavailable) as err:
        OpenClipModel("ViT-g-14", weights_file=missing)
    assert err.value.needs == str(missing)


def test_image_features_extractor_for_fd_and_cmmd(tiny):
    ext = ClipImageFeatures(tiny)
    assert isinstance(ext, FeatureExtractor)
    a, b = FeatureAccumulator(ext), FeatureAccumulator(ext)
    a.update(imgs(4, 4))
    b.update(imgs(4, 5))
    res = distribution_metrics(a, b)
    assert res["fd"] >= 0 and "cmmd" in res
    assert res["protocol"]["samples"]["feature_extractor"]["model"] == TINY
