"""train-clip on a tiny architecture: batches with unique captions, multi-positive loss closed form, the loss
drops, determinism, and the save/load round trip through OpenClipModel gives the same embeddings."""

import json
import math

import numpy as np
import pytest
import torch

from dmd_dar.data.procedural import CLASS_NAMES, ProceduralImages
from dmd_dar.errors import UserError
from dmd_dar.metrics.clip_config import ClipArchConfig
from dmd_dar.metrics.train_clip import (
    BatchComposer,
    TrainClipConfig,
    evaluate_clip,
    load_embedded_clip,
    make_texts,
    multi_positive_clip_loss,
    normalize_images,
    save_clip,
    train,
)

TINY = ClipArchConfig(embed_dim=32, patch_size=8, vision_width=32, vision_layers=1, vision_head_width=16,
                      text_width=32, text_heads=2, text_layers=1, context_length=16)


def _cfg(**kw):
    base = dict(steps=24, batch_size=32, lr=3e-3, warmup_steps=2, pool_size=3000, eval_size=16, log_every=4,
                clip=TINY)
    return TrainClipConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained():
    return train(_cfg(), progress=False)


def test_batches_have_unique_captions_and_every_class():
    data = ProceduralImages("train", length=3000, size=32)
    comp = BatchComposer(data, 3000)
    idx = comp.batch(np.random.default_rng(0), 4)
    texts, compat = make_texts(data, idx, np.random.default_rng(1), 0.0, 0.0)
    assert len(set(texts)) == len(texts) == 32
    assert torch.equal(compat, torch.eye(32, dtype=torch.bool))
    assert sorted(data.describe(i)["class_id"] for i in idx) == sorted(list(range(len(CLASS_NAMES))) * 4)
    texts, compat = make_texts(data, idx, np.random.default_rng(1), 0.0, 1.0)  # class prompts only
    assert all(t.startswith("a photo of ") for t in texts) and int(compat.sum()) == 8 * 4 * 4


def test_multi_positive_loss_is_clip_loss_for_identity_targets():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    scale = torch.tensor(math.log(10.0))
    logits = 10 * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).t()
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(6))
                 + torch.nn.functional.cross_entropy(logits.t(), torch.arange(6)))
    torch.testing.assert_close(multi_positive_clip_loss(img, txt, scale, torch.eye(6, dtype=torch.bool)), ref)


def test_loss_drops_and_is_deterministic(trained):
    _, losses = trained
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.3
    _, again = train(_cfg(steps=3), progress=False)
    assert again == losses[:3]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_save_load_round_trip(tmp_path, trained, dtype):
    model, _ = trained
    out = save_clip(model, TINY, tmp_path / "clip", storage_dtype=dtype, record={"note": "test"})
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["preprocess_cfg"]["size"] == 32 and cfg["model_cfg"]["text_cfg"]["context_length"] == 16
    loaded = load_embedded_clip(out)
    ref = model
    if dtype == "fp16":  # the stored weights are the fp16-rounded ones
        import copy

        ref = copy.deepcopy(model)
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(p.half().float())
    images, _, captions = ProceduralImages("heldout", length=5, size=32).render(range(5))
    with torch.no_grad():
        want_i = torch.nn.functional.normalize(ref.encode_image(normalize_images(images, TINY)), dim=-1)
        want_t = torch.nn.functional.normalize(ref.encode_text(loaded.tokenize(captions, prefix="")), dim=-1)
    torch.testing.assert_close(loaded.encode_images(images).float(), want_i, rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.encode_texts(captions, prefix="").float(), want_t, rtol=0, atol=1e-6)
    metrics = evaluate_clip(loaded, n=16)
    assert 0 <= metrics["zero_shot"]["accuracy"] <= 1 and 0 <= metrics["retrieval"]["image_to_text_r1"] <= 1


def test_bad_config_is_one_line_error():
    with pytest.raises(UserError, match="multiple of the 8 classes"):
        TrainClipConfig(batch_size=20)
