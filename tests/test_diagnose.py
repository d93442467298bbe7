"""Routing diagnostics on a tiny SiT: shapes, closed forms (identical states, zero gates, LayerNorm invariance,
finite-difference gate gradient), batch-size independence, DAR weight maps, attention locality, per-class losses,
and the command's files."""

import json
import math

import pytest
import torch

from dmd_dar.analysis.diagnose import DiagnoseConfig, run
from dmd_dar.analysis.diagnostics import (
    attention_locality,
    diagnose_model,
    per_token_rms,
    timestep_diagnostics,
    token_cosine,
    uniform_attention_distance,
)
from dmd_dar.artifact import ArtifactMeta, DiffusionConfig, save_artifact
from dmd_dar.diffusion.paths import make_path
from dmd_dar.models import build_model, preset_config
from dmd_dar.routing import RoutingConfig

PATH = make_path("flow", "velocity")
DAR = RoutingConfig(kind="dar", query="static_t", chunk_size=2)


def _model(routing=None, seed=0):
    torch.manual_seed(seed)
    model = build_model(preset_config("tiny", **({"routing": routing} if routing else {})))
    with torch.no_grad():  # non-zero adaLN gates and head; router parameters keep their (zero-query) init
        for name, p in model.named_parameters():
            if not name.startswith("router."):
                p.normal_(0.0, 0.2)
    return model.eval()


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    return x0, torch.randn(x0.shape, generator=g), torch.randint(0, 4, (n,), generator=g)


def _zero_gates(model, block):
    """adaLN-Zero gates of both sublayers of ``block`` (0-indexed) -> 0, so v = 0 there."""
    d = model.cfg.hidden_size
    lin = model.blocks[block].adaLN_modulation[-1]
    with torch.no_grad():
        for part in (0, 1):
            rows = slice(3 * d * part + 2 * d, 3 * d * part + 3 * d)
            lin.weight[rows] = 0
            lin.bias[rows] = 0


def test_statistics_closed_forms():
    x = torch.randn(2, 5, 8)
    assert float(token_cosine(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(token_cosine(x, -3 * x)) == pytest.approx(-1.0, abs=1e-12)
    assert float(per_token_rms(torch.full((2, 3, 4), -2.5))) == pytest.approx(2.5)


def test_attention_locality_closed_forms():
    """Uniform maps: entropy 1 and the mean pairwise patch distance; one-hot maps on the query itself: 0 and 0;
    attention to the right-hand neighbour: entropy 0, distance 1."""
    grid, t = 2, 4
    assert uniform_attention_distance(grid) == pytest.approx((8 * 1 + 4 * math.sqrt(2)) / 16)  # 16 ordered pairs
    ent, dist = attention_locality(torch.full((3, 2, t, t), 1 / t), grid)
    assert float(ent) == pytest.approx(1.0) and float(dist) == pytest.approx(uniform_attention_distance(grid))
    ent, dist = attention_locality(torch.eye(t).expand(3, 2, t, t), grid)
    assert float(ent) == pytest.approx(0.0, abs=1e-12) and float(dist) == 0.0
    neighbour = torch.zeros(t, t)
    neighbour[[0, 1, 2, 3], [1, 0, 3, 2]] = 1  # tokens (r, c) row-major: 0 <-> 1 and 2 <-> 3 are horizontal pairs
    ent, dist = attention_locality(neighbour.expand(1, 1, t, t), grid)
    assert float(ent) == pytest.approx(0.0, abs=1e-12) and float(dist) == pytest.approx(1.0)


@pytest.mark.parametrize("bias", [False, True], ids=["sincos", "relative_bias"])
def test_attention_weights_are_what_forward_applies(bias):
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", relative_position_bias=bias)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    attn = model.blocks[0].attn
    x = torch.randn(2, model.cfg.num_tokens, model.cfg.hidden_size)
    w = attn.attention_weights(x)  # [B, H, T, T]
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    _, _, v = attn._heads(x)
    manual = attn.proj((w @ v).transpose(1, 2).reshape(x.shape))
    torch.testing.assert_close(manual, attn(x), rtol=1e-5, atol=1e-5)


def test_attention_and_class_statistics_of_diagnose():
    """Attention statistics per block lie in their ranges; the class losses, weighted by class counts, give back
    the overall loss; a class without samples is NaN."""
    model = _model()
    x0, eps, _ = _batch(n=6)
    y = torch.tensor([0, 0, 1, 2, 2, 2])  # class 3 absent
    res = diagnose_model(model, PATH, x0, eps, y, [0.3, 0.8], batch_size=4, counterfactual=False)
    depth = model.cfg.depth
    assert res["attn_entropy"].shape == (2, depth) and res["attn_distance"].shape == (2, depth)
    assert ((res["attn_entropy"] > 0) & (res["attn_entropy"] <= 1 + 1e-9)).all()
    grid = model.cfg.image_size // model.cfg.patch_size
    assert float(res["attn_distance_uniform"]) == pytest.approx(uniform_attention_distance(grid))
    assert ((res["attn_distance"] >= 0) & (res["attn_distance"] <= math.sqrt(2) * (grid - 1))).all()
    cl = res["class_loss"]  # [n_t, classes]
    assert cl.shape == (2, 4) and torch.isnan(cl[:, 3]).all()
    counts = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close((cl[:, :3] * counts).sum(-1) / 6, res["loss"])


def test_residual_shapes_zero_gate_and_identical_states():
    model = _model()
    _zero_gates(model, 1)  # block 2: z_2 = z_1 exactly, sublayers 3 and 4 output zeros
    x0, eps, y = _batch()
    res = diagnose_model(model, PATH, x0, eps, y, [0.2, 0.7, 1.0], batch_size=4)
    depth, num_l = model.cfg.depth, model.cfg.num_sublayers
    assert res["rms"].shape == res["grad_rms"].shape == (3, depth)
    assert res["cos"].shape == (3, depth - 1)
    assert res["gate_drop"].shape == res["gate_grad"].shape == (3, num_l)
    assert res["source_importance"].shape == (3, num_l, num_l + 1)
    assert "weights" not in res and torch.isfinite(res["grad_rms"]).all() and (res["grad_rms"] > 0).all()
    torch.testing.assert_close(res["cos"][:, 0], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
    assert res["gate_drop"][:, 2:].abs().max() == 0 and res["gate_grad"][:, 2:].abs().max() == 0
    assert res["gate_drop"][:, :2].abs().min() > 0
    # pre-LN sublayers are (nearly) scale invariant in their input, so the source gates of one target sum to ~0
    imp = res["source_importance"]
    rows = imp.nan_to_num().sum(-1)
    assert rows.abs().max() < 1e-3 * imp.nan_to_num().abs().max()
    assert torch.isnan(imp[:, 0, 1:]).all() and not torch.isnan(imp[:, -1, :num_l]).any()


def test_gate_grad_matches_finite_difference():
    model = _model(seed=1)
    x0, eps, y = _batch(seed=1)
    out = timestep_diagnostics(model, PATH, x0, eps, y, 0.6, counterfactual=False, source_map=False)
    l, h = 2, 1e-2

    def loss_with_gate(g):
        handle = model.blocks[0].mlp.register_forward_hook(lambda m, i, o: o * g)
        try:
            with torch.no_grad():
                t = torch.full((4,), 0.6)
                pred = model(PATH.add_noise(x0, eps, t), t, y)
                return float((pred - PATH.training_target(x0, eps, t)).pow(2).mean())
        finally:
            handle.remove()

    fd = (loss_with_gate(1 + h) - loss_with_gate(1 - h)) / (2 * h)
    assert float(out["gate_grad"][l - 1]) == pytest.approx(fd, rel=2e-2, abs=1e-5)


def test_batching_does_not_change_results():
    model = _model(DAR)
    x0, eps, y = _batch()
    a = diagnose_model(model, PATH, x0, eps, y, [0.5], batch_size=4)
    b = diagnose_model(model, PATH, x0, eps, y, [0.5], batch_size=2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-7, equal_nan=True)


def test_dar_weight_maps_sum_to_one():
    model = _model(DAR)
    x0, eps, y = _batch()
    res = diagnose_model(model, PATH, x0, eps, y, [0.1, 0.9], batch_size=4, counterfactual=False)
    num_l = model.cfg.num_sublayers
    w = res["weights"]
    assert w.shape == (2, num_l + 1, num_l + 1) and res["entropy"].shape == (2, num_l + 1)
    torch.testing.assert_close(w.nansum(-1), torch.ones(2, num_l + 1, dtype=torch.float64), rtol=0, atol=1e-6)
    assert "source_importance" not in res
    # chunk size 2, L = 4: final aggregator sees c_0 = v_0, c_1 = v_2, then v_3, v_4
    assert torch.isfinite(w[0, -1]).tolist() == [True, False, True, True, True]
    assert float(res["entropy"][0, 0]) == 0.0 and ((res["entropy"] >= 0) & (res["entropy"] <= 1 + 1e-9)).all()


def test_fresh_dar_routes_uniformly():
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", routing=DAR)).eval()  # zero queries, zero e(t) -> uniform weights
    x0, eps, y = _batch()
    res = diagnose_model(model, PATH, x0, eps, y, [0.5], batch_size=4, counterfactual=False)
    w = res["weights"][0]
    for a in range(w.shape[0]):
        n = int(torch.isfinite(w[a]).sum())
        torch.testing.assert_close(w[a][torch.isfinite(w[a])], torch.full((n,), 1 / n, dtype=torch.float64))
    torch.testing.assert_close(res["entropy"][0, 1:], torch.ones(w.shape[0] - 1, dtype=torch.float64))


@pytest.mark.parametrize("routing", [None, DAR], ids=["residual", "dar"])
def test_command_writes_json_and_pngs(tmp_path, routing):
    model = _model(routing)
    ckpt = save_artifact(tmp_path / "export", model, ArtifactMeta(role="teacher", diffusion=DiffusionConfig(),
                                                                  class_names=["a", "b", "c", "d"]))
    out = run(DiagnoseConfig(checkpoint=str(ckpt), out_dir=str(tmp_path / "diag"), num_samples=3,
                             t_grid=[0.25, 1.0], batch_size=2, device="cpu"))
    data = json.loads((out / "diagnostics.json").read_text())
    res = data["results"]
    assert res["t"] == [0.25, 1.0] and len(res["rms"]) == 2 and len(res["rms"][0]) == model.cfg.depth
    assert all(math.isfinite(v) for v in res["grad_rms"][1])
    for name in data["files"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = {"depth_lines.png", "heatmap_rms.png", "heatmap_grad_rms.png", "heatmap_cos.png",
                "heatmap_gate_drop.png", "heatmap_gate_grad.png", "heatmap_attention_entropy.png",
                "heatmap_attention_distance.png", "heatmap_class_loss.png"}
    expected |= {"routing_weights.png", "heatmap_entropy.png"} if routing else {"source_importance.png"}
    assert expected <= set(data["files"])
    if routing:
        assert res["weights"][0][0][1] is None  # NaN -> null
