"""ST-LPIPS (bundled stlpips-pytorch weights): properties, offline loading, and the eval runner's `auto` choice."""

import hashlib
import socket
import urllib.request

import pytest
import torch

from dmd_dar.config import build_config
from dmd_dar.data.manifest import save_png_folder
from dmd_dar.data.procedural import ProceduralImages
from dmd_dar.errors import UserError
from dmd_dar.evaluation import EvalConfig, Evaluation, run
from dmd_dar.metrics.lpips_metric import (
    BACKBONE_FILES,
    LpipsDiversity,
    LpipsFidelity,
    LpipsModel,
    pairwise_lpips,
)
from dmd_dar.metrics.stlpips_metric import STLPIPS_NAME, StLpipsModel, default_weights_path

pytest.importorskip("stlpips_pytorch")


@pytest.fixture(scope="module")
def model():
    return StLpipsModel()


@pytest.fixture(scope="module")
def natural():
    """Procedural images with edges and texture at 48 px, in [-1, 1]."""
    ds = ProceduralImages("heldout", 4, size=48, classes=["sharp_shapes", "checkers", "rings", "textured_fill"])
    x, _, _ = ds.render(range(4))
    return x.float()


def test_identity_symmetry_positivity_and_batching(model, natural):
    a, b = natural[:2], natural[2:]
    d = model(a, b)
    assert d.shape == (2,) and d.dtype == torch.float64 and bool((d > 0).all())
    torch.testing.assert_close(model(a, a), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(model(b, a), d)
    torch.testing.assert_close(torch.cat([model(a[i:i + 1], b[i:i + 1]) for i in range(2)]), d)
    with pytest.raises(UserError, match="at least 21x21"):
        model(a[..., :20, :20], b[..., :20, :20])


def test_blur_is_farther_than_slight_noise(model, natural):
    x = natural
    blurred = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    noised = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    d_blur, d_noise = model(x, blurred), model(x, noised)
    assert bool((d_blur > d_noise).all()), (d_blur, d_noise)


def test_offline_weights_only_and_protocol(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    import torchvision.models._api as tv_api

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.utils.model_zoo, "load_url", no_network)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_network, raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    loads = []
    real_load = torch.load

    def checked_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    m = StLpipsModel()
    assert loads == [True]  # our weights-only read, never the package's plain torch.load
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert float(m(x, x.flip(-1))) > 0
    p = m.protocol()
    path = default_weights_path()
    assert p["name"] == STLPIPS_NAME and p["label"] == "ST-LPIPS" and p["comparable_with_lpips"] is False
    assert "NOT comparable" in p["note"] and p["weights"]["file"].endswith("alex_shift_tolerant.pth")
    with open(path, "rb") as fh:
        assert p["weights"]["sha256"] == hashlib.sha256(fh.read()).hexdigest()[:16]
    own = {k: v for k, v in m.model.state_dict().items() if not k.startswith("lins.")}  # lins.* alias lin*
    ref = real_load(path, map_location="cpu", weights_only=True)
    assert own.keys() == ref.keys() and sum(v.numel() for v in own.values()) == 2_473_734
    assert all(torch.equal(own[k], ref[k]) for k in ref)


def test_strict_key_check(tmp_path):
    sd = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    extra = tmp_path / "extra.pth"
    torch.save({**sd, "net.slice9.weight": torch.zeros(1)}, extra)
    with pytest.raises(UserError, match="unexpected"):
        StLpipsModel(weights=extra)
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in sd.items() if k != "lin2.model.1.weight"}, missing)
    with pytest.raises(UserError, match="lin2.model.1.weight"):
        StLpipsModel(weights=missing)


def test_accumulators_take_either_model(model, natural):
    fid = LpipsFidelity(model)
    fid.update(natural[:2], natural[2:], keys=[0, 1], groups=["a", "b"])
    out = fid.compute()
    assert out["n"] == 2 and out["protocol"]["name"] == STLPIPS_NAME
    div = LpipsDiversity(model)
    div.update(natural[:3], groups=["g", "g", "g"])
    assert div.compute()["mean"] == pytest.approx(float(pairwise_lpips(model, natural[:3]).mean()))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stlpips_eval")
    ds = ProceduralImages("heldout", 4, size=32, classes=["stripes_high", "smooth_blobs"])
    x, cids, _ = ds.render(range(4))
    recs = [{"seed": i, "class_id": int(c), "class_name": ds.class_names[int(c)]} for i, c in enumerate(cids)]
    save_png_folder(x, root / "teacher", recs)
    save_png_folder(torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False), root / "student", recs)
    return root


def _eval(root, out, *extra):
    cfg = build_config(EvalConfig, [], [f"samples=[{root / 'teacher'},{root / 'student'}]",
                                        "metrics=[lpips_fidelity,lpips_diversity]", "bootstrap=20",
                                        f"out_dir={out}", *extra])
    run(cfg)
    return Evaluation.load(out / "metrics.json")


def test_eval_auto_falls_back_to_stlpips_then_prefers_lpips(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no standard AlexNet trunk in the hub cache
    m = _eval(folders, tmp_path / "st")
    lp = m.protocol["models"]["lpips"]
    assert lp["name"] == STLPIPS_NAME and lp["selection"]["requested"] == "auto"
    assert lp["selection"]["ran"] == "stlpips_alex" and BACKBONE_FILES["alex"] in lp["selection"]["why"]
    assert all(r.available for r in m.availability.values())
    fid = m.comparisons[0].lpips_fidelity
    assert fid.model.label == "ST-LPIPS" and fid.model.model == STLPIPS_NAME and fid.model.comparable_with_lpips is False
    assert fid.n == 4 and fid.mean.estimate > 0
    div = m.sets["teacher"].lpips_diversity
    assert div.model.label == "ST-LPIPS" and div.n_groups == 2 and div.mean.estimate > 0
    assert "ST-LPIPS fidelity" in m.verdicts[0]
    html = (tmp_path / "st" / "report.html").read_text()
    assert "ST-LPIPS fidelity" in html and "ST-LPIPS diversity" in html

    # With the standard trunk file in the hub cache, auto runs standard LPIPS alex.
    trunk = LpipsModel("alex", random_backbone=True, seed=0).model.net.state_dict()
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save({f"features.{k.split('.', 2)[1]}.{k.split('.', 2)[2]}": v for k, v in trunk.items()},
               ckpt / BACKBONE_FILES["alex"])
    m2 = _eval(folders, tmp_path / "std", "report=false")
    assert m2.protocol["models"]["lpips"]["selection"] == {"requested": "auto", "ran": "alex"}
    assert m2.comparisons[0].lpips_fidelity.model.label == "LPIPS"
    assert "ST-LPIPS" not in m2.verdicts[0] and "LPIPS fidelity" in m2.verdicts[0]


def test_eval_rejects_unknown_net(folders):
    with pytest.raises(UserError, match="lpips.net"):
        build_config(EvalConfig, [], [f"samples=[{folders / 'teacher'}]", "lpips.net=squeeze"])
