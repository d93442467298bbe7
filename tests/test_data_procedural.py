"""The embedded procedural dataset: determinism, range, captions, and measurably different spectra per class."""

import pytest
import torch

from dmd_dar.data.procedural import CLASS_NAMES, CLASS_PHRASES, COLOR_NAMES, NUM_CLASSES, ProceduralImages
from dmd_dar.errors import UserError
from dmd_dar.metrics.spectral import hf_ratio, rapsd


def test_deterministic_per_index():
    a = ProceduralImages("train", length=64, seed=3)
    b = ProceduralImages("train", length=64, seed=3)
    x, _, _ = a.render([5, 17, 40])
    y, _, _ = b.render([40, 17, 5])  # batch composition and order do not matter
    assert torch.equal(x[0], y[2]) and torch.equal(x[2], y[0])
    assert torch.equal(a[17][0], x[1])
    assert not torch.equal(a[5][0], a[5 + NUM_CLASSES][0])  # same class, other index
    assert not torch.equal(a[5][0], ProceduralImages("train", length=64, seed=4)[5][0])
    held = ProceduralImages("heldout", length=64, seed=3)
    assert all(not torch.equal(a[i][0], held[i][0]) for i in range(16))


def test_range_shapes_and_balanced_classes():
    ds = ProceduralImages(length=32)
    x, c, caps = ds.render(range(32))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and torch.isfinite(x).all()
    assert torch.equal(c, torch.arange(32) % NUM_CLASSES)
    for size, shape in [(48, (3, 48, 48)), ((24, 40), (3, 24, 40))]:
        im, _, _ = ProceduralImages(size=size, length=8).render(range(8))
        assert im.shape[1:] == shape and im.min() >= -1 and im.max() <= 1
    sub = ProceduralImages(classes=["rings", "dots"], length=4)
    assert [sub[i][1] for i in range(4)] == [5, 6, 5, 6]
    with pytest.raises(UserError, match="unknown procedural classes"):
        ProceduralImages(classes=["zebra"])
    with pytest.raises(UserError, match="split"):
        ProceduralImages("val")


def test_captions_name_class_and_colours():
    ds = ProceduralImages(length=24)
    for i in range(24):
        img, cid, cap = ds[i]
        info = ds.describe(i)
        assert cap == info["caption"] and cid == info["class_id"]
        assert CLASS_PHRASES[CLASS_NAMES[cid]] in cap
        assert cap.startswith(f"{info['fg']} and {info['bg']} ")
        assert info["fg"] in COLOR_NAMES and info["bg"] in COLOR_NAMES and info["fg"] != info["bg"]


def test_dataloader_batches():
    loader = torch.utils.data.DataLoader(ProceduralImages(length=20), batch_size=8)
    x, y, caps = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and y.tolist() == list(range(8)) and len(caps) == 8


@pytest.fixture(scope="module")
def spectra():
    tr = ProceduralImages("train", length=320)
    he = ProceduralImages("heldout", length=160)
    return tr.render(range(320)), he.render(range(160))


def test_hf_ratio_orders_smooth_to_sharp_to_nyquist(spectra):
    (x, c, _), _ = spectra
    hf = hf_ratio(x, 0.5)
    m = {n: float(hf[c == k].mean()) for k, n in enumerate(CLASS_NAMES)}
    assert m["smooth_blobs"] < 1e-3 < m["sharp_shapes"] < 0.2 < 0.95 < m["stripes_high"]
    assert m["stripes_low"] < 1e-3
    # per image too: every sharp shape has more detail than every blob image
    assert hf[c == 0].max() < hf[c == 1].min() and hf[c == 1].max() < hf[c == 3].min()


def test_classes_are_separable_by_their_spectra(spectra):
    (x, c, _), (xh, ch, _) = spectra
    def feature(images):  # log of the power-normalised RAPSD (colour contrast only scales the spectrum)
        p = rapsd(images, 16)
        return torch.log(p / p.sum(1, keepdim=True) + 1e-8)

    feat, feat_h = feature(x), feature(xh)
    centroids = torch.stack([feat[c == k].mean(0) for k in range(NUM_CLASSES)])  # [K, B]
    pred = torch.cdist(feat_h, centroids).argmin(1)
    acc = (pred == ch).float()
    assert acc.mean() > 0.8  # chance is 1/8; rings vs. noise texture are the spectrally closest pair
    for k in ("smooth_blobs", "sharp_shapes", "stripes_high"):
        assert acc[ch == CLASS_NAMES.index(k)].mean() >= 0.9
