"""LPIPS with a seeded random trunk (bundled lin weights): properties, file loading, fidelity and diversity."""

import pytest
import torch
from safetensors.torch import save_file

from dmd_dar.errors import UserError
from dmd_dar.metrics.availability import MetricUnavailable, try_metric
from dmd_dar.metrics.lpips_metric import (
    BACKBONE_FILES,
    LpipsDiversity,
    LpipsFidelity,
    LpipsModel,
    lpips_diversity,
    pairwise_lpips,
)


@pytest.fixture(scope="module")
def model():
    return LpipsModel("alex", random_backbone=True, seed=0)


def imgs(n, seed, size=64):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lpips_properties(model):
    a, b = imgs(3, 1), imgs(3, 2)
    d = model(a, b)
    assert d.shape == (3,) and d.dtype == torch.float64
    assert bool((d > 0).all())
    torch.testing.assert_close(model(a, a), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(model(b, a), d)
    torch.testing.assert_close(torch.cat([model(a[i:i + 1], b[i:i + 1]) for i in range(3)]), d)
    proto = model.protocol()
    assert proto["backbone"]["random_init_seed"] == 0 and len(proto["lin_weights"]["sha256"]) == 16


def test_backbone_safetensors_round_trip_through_the_loader(model, tmp_path):
    # Write the random trunk under torchvision's key names, as alexnet-owt-*.pth holds them.
    sd = {f"features.{k.split('.', 2)[1]}.{k.split('.', 2)[2]}": v for k, v in model.model.net.state_dict().items()}
    path = tmp_path / "alexnet.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = LpipsModel("alex", backbone_weights=path, seed=123)  # different init seed: weights must come from file
    a, b = imgs(2, 3), imgs(2, 4)
    torch.testing.assert_close(loaded(a, b), model(a, b), rtol=0, atol=0)
    assert loaded.protocol()["backbone"]["file"] == str(path)
    bad = tmp_path / "bad.safetensors"
    save_file({"features.0.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(UserError, match="features.0.bias|missing"):
        LpipsModel("alex", backbone_weights=bad)


def test_missing_backbone_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MetricUnavailable) as err:
        LpipsModel("vgg")
    assert err.value.needs == str(tmp_path / "hub" / "checkpoints" / BACKBONE_FILES["vgg"])
    _, rec = try_metric("lpips", LpipsModel, "alex")
    assert rec["available"] is False and rec["needs"].endswith(BACKBONE_FILES["alex"])


def test_fidelity_pairs_by_key_and_merges(model):
    s, t = imgs(4, 5), imgs(4, 6)
    keys = [("class", i % 2, 10 + i, i) for i in range(4)]
    groups = [i % 2 for i in range(4)]
    full = LpipsFidelity(model)
    full.update_by_key(s, keys, t.flip(0), keys[::-1], groups)  # teacher in another order
    direct = model(s, t)
    torch.testing.assert_close(full.values("lpips"), direct)
    a, b = LpipsFidelity(model), LpipsFidelity(model)
    a.update(s[:1], t[:1], keys[:1], groups[:1])
    b.update(s[1:], t[1:], keys[1:], groups[1:])
    merged = a.merge_state(b.state_dict()).compute()
    assert merged["mean"] == pytest.approx(full.compute()["mean"], rel=1e-6)  # float32 batching
    assert set(merged["per_group"]) == {"0", "1"}
    same = LpipsFidelity(model)
    same.update(s, s)
    assert same.compute()["mean"] == 0.0


def test_diversity_pairs_groups_and_merge(model):
    x = imgs(3, 7)
    d = pairwise_lpips(model, x)
    assert d.shape == (3,)
    torch.testing.assert_close(d, torch.stack([model(x[i:i + 1], x[j:j + 1])[0] for i, j in [(0, 1), (0, 2), (1, 2)]]))
    perm = pairwise_lpips(model, x[[2, 0, 1]])
    assert float(perm.mean()) == pytest.approx(float(d.mean()), rel=1e-6)
    copies = x[:1].expand(4, -1, -1, -1)
    y = imgs(2, 8)
    batch = torch.cat([x, copies, y])
    groups = ["p0"] * 3 + ["p1"] * 4 + ["p2"] * 2
    res = lpips_diversity(model, batch, groups)
    assert res["per_group"]["p1"] == 0.0 and res["n_groups"] == 3 and (res["k_min"], res["k_max"]) == (2, 4)
    assert res["per_group"]["p0"] == pytest.approx(float(d.mean()), rel=1e-9)
    a, b = LpipsDiversity(model), LpipsDiversity(model)
    a.update(batch[:7], groups[:7])
    b.update(batch[7:], groups[7:])
    assert a.merge_state(b.state_dict()).compute()["mean"] == pytest.approx(res["mean"], rel=1e-12)
    with pytest.raises(UserError, match="arrived twice"):
        a.update(batch[:3], groups[:3])
