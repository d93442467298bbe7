"""Native SiT/DiT: shapes, config validation, closed-form embeddings, routing loop, internals, label dropout."""

import copy
import math

import pytest
import torch

from dmd_dar.errors import UserError
from dmd_dar.models import ModelConfig, build_model, param_groups, preset_config
from dmd_dar.models.layers import Mlp, RelativePositionBias, sincos_2d, timestep_features
from dmd_dar.routing import RoutingConfig, routing_parameters

DAR = dict(kind="dar", query="static_t", chunk_size=2)


def _tiny(**overrides):
    return preset_config("tiny", **overrides)


def _randomise(model, std=0.2):
    """Non-zero weights everywhere outside the router (adaLN gates, final layer included)."""
    router = {id(p) for p in model.router.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in router:
                p.normal_(0.0, std)
    return model


def _inputs(cfg, batch=2):
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.rand(batch)
    y = torch.randint(0, max(cfg.num_classes, 1), (batch,)) if cfg.num_classes else None
    return x, t, y


@pytest.mark.parametrize("overrides", [
    {},
    {"num_classes": 0},
    {"learn_sigma": True},
    {"routing": RoutingConfig(**DAR)},
    {"routing": RoutingConfig(kind="dar", query="dynamic"), "image_size": 8, "patch_size": 2, "in_channels": 4},
])
def test_output_shape(overrides):
    cfg = _tiny(**overrides)
    model = build_model(cfg)
    x, t, y = _inputs(cfg)
    out = model(x, t, y)
    assert out.shape == (2, cfg.out_channels, cfg.image_size, cfg.image_size)
    assert torch.isfinite(out).all()


def test_scalar_t_broadcasts():
    cfg = _tiny()
    model = _randomise(build_model(cfg)).eval()
    x, _, y = _inputs(cfg)
    torch.testing.assert_close(model(x, torch.tensor(0.3), y), model(x, torch.full((2,), 0.3), y))


@pytest.mark.parametrize("key, overrides", [
    ("image_size", dict(image_size=18, patch_size=4)),
    ("hidden_size", dict(hidden_size=36, num_heads=8)),
    ("hidden_size", dict(hidden_size=30, num_heads=3)),
    ("depth", dict(depth=0)),
    ("class_dropout_prob", dict(class_dropout_prob=1.5)),
    ("num_classes", dict(num_classes=-1)),
    ("mlp_conv", dict(mlp_conv=2)),
    ("mlp_conv", dict(mlp_conv=-3)),
    ("mlp_conv", dict(mlp_conv=True)),
])
def test_bad_config_names_the_key(key, overrides):
    with pytest.raises(UserError, match=f"model.{key}"):
        _tiny(**overrides)


def test_config_dict_round_trip_and_unknown_key():
    cfg = _tiny(routing=RoutingConfig(**DAR))
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again.routing, RoutingConfig)
    with pytest.raises(UserError, match="depht"):
        ModelConfig.from_dict({**cfg.to_dict(), "depht": 3})
    with pytest.raises(UserError, match="unknown preset|preset"):
        preset_config("SiT-XXL/2")


def test_sit_xl2_parameter_counts():
    """SiT-XL/2 has 675M parameters (DAR paper Table 1); static DAR adds ~0.13M, dynamic one d x d per aggregator."""
    def count(routing):
        with torch.device("meta"):
            model = build_model(preset_config("SiT-XL/2", learn_sigma=True, routing=routing))
        return sum(p.numel() for p in model.parameters())

    d = 1152
    base = count(RoutingConfig())
    assert abs(base / 1e6 - 675) < 0.5
    aggregators = 56  # sublayers 2..56 plus the final one; sublayer 1 has one source and no parameters
    assert count(RoutingConfig(kind="dar", chunk_size=4)) - base == aggregators * 2 * d
    assert count(RoutingConfig(kind="dar", query="dynamic", chunk_size=4)) - base == aggregators * (d * d + d)


def test_timestep_embedder_embeds_t_times_1000():
    t = torch.tensor([0.0, 0.25, 1.0])
    feats = timestep_features(t * 1000, 8)
    freqs = torch.tensor([10000 ** (-k / 4) for k in range(4)])
    expected = torch.cat([torch.cos(1000 * t[:, None] * freqs), torch.sin(1000 * t[:, None] * freqs)], 1)
    torch.testing.assert_close(feats, expected)
    model = build_model(_tiny())
    emb = model.t_embedder
    torch.testing.assert_close(emb(t), emb.mlp(timestep_features(t * 1000, emb.frequency_dim)))


def test_sincos_positions_closed_form():
    dim, grid = 8, 3
    pos = sincos_2d(dim, grid)  # [9, 8]
    row, col = 2, 1
    token = row * grid + col
    w = [1.0, 10000 ** -0.5]
    expected = [math.sin(col * w[0]), math.sin(col * w[1]), math.cos(col * w[0]), math.cos(col * w[1]),
                math.sin(row * w[0]), math.sin(row * w[1]), math.cos(row * w[0]), math.cos(row * w[1])]
    torch.testing.assert_close(pos[token], torch.tensor(expected))


def test_relative_position_bias_closed_form():
    """bias[h, i, j] = table[h, offset(i, j)]: the same entry for every pair with the same 2-D patch offset."""
    grid = 3
    rpb = RelativePositionBias(num_heads=2, grid_size=grid)
    with torch.no_grad():
        rpb.table.copy_(torch.arange(2 * 25, dtype=torch.float32).view(2, 25))
    bias = rpb().detach()  # [1, H, T, T]
    assert bias.shape == (1, 2, 9, 9)
    at = lambda r, c: r * grid + c  # noqa: E731  row-major tokens
    for h in range(2):
        for (ri, ci), (rj, cj) in [((0, 0), (2, 1)), ((1, 2), (0, 0)), ((2, 2), (2, 2))]:
            expected = 25 * h + (ri - rj + grid - 1) * 5 + (ci - cj + grid - 1)
            assert float(bias[0, h, at(ri, ci), at(rj, cj)]) == expected
    # translation invariance: (0,0)->(1,1) and (1,1)->(2,2) share the offset (-1, -1)
    assert bias[0, 1, at(0, 0), at(1, 1)] == bias[0, 1, at(1, 1), at(2, 2)]


def _assert_zero_initialised_addition(base_overrides: dict, extra: dict, added) -> torch.nn.Module:
    """The contract of a zero-initialised architecture option: loaded with a base model's (non-zero) weights, only
    the option's tensors are missing and the output is the base model's; perturbing block 0's first added tensor
    changes the output, and gradients reach every added tensor of every block. ``added(block)`` names them
    (``{state-dict suffix: parameter}``). Returns the model with the option."""
    base = _randomise(build_model(_tiny(hidden_size=64, **base_overrides))).eval()
    model = build_model(_tiny(hidden_size=64, **base_overrides, **extra)).eval()
    missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"blocks.{k}.{name}" for k, block in enumerate(model.blocks)
                                     for name in added(block))
    x, t, y = _inputs(base.cfg)
    # In float64: with and without the (zero) addition, attention may run different fp32 kernels (with a bias
    # mask or without), whose rounding differs by CPU.
    torch.testing.assert_close(copy.deepcopy(model).double()(x.double(), t.double(), y),
                               copy.deepcopy(base).double()(x.double(), t.double(), y))
    with torch.no_grad():
        next(iter(added(model.blocks[0]).values())).normal_(0.0, 1.0)
    assert not torch.allclose(model(x, t, y), base(x, t, y), atol=1e-4)
    model(x, t, y).pow(2).mean().backward()
    for block in model.blocks:
        assert all(p.grad.abs().sum() > 0 for p in added(block).values())
    return model


def test_relative_position_bias_starts_as_the_plain_sit_and_learns():
    """Zero-initialised: with the other weights copied, the model equals the one without the bias; a non-zero table
    changes the output, gradients reach every table, and the tables are not weight-decayed."""
    biased = _assert_zero_initialised_addition(
        {}, {"relative_position_bias": True}, lambda b: {"attn.position_bias.table": b.attn.position_bias.table})
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(biased, lr=1e-4, weight_decay=0.1)}
    assert all(id(b.attn.position_bias.table) in groups["no_decay"] for b in biased.blocks)
    with pytest.raises(UserError, match="model.relative_position_bias"):
        _tiny(relative_position_bias="yes")


def test_mlp_conv_closed_form():
    """hidden(r, c) = fc1(x)(r, c) + sum over taps w[i, j] * fc1(x)(r + i - 1, c + j - 1), zero outside the grid;
    with one tap (the right neighbour) set, each token adds its right neighbour's fc1 features, channel by channel."""
    grid, d, m = 3, 4, 6
    mlp = Mlp(d, m, conv_kernel=3, grid_size=grid)
    scale = torch.arange(1.0, m + 1)
    with torch.no_grad():
        mlp.dwconv.weight[:, 0, 1, 2] = scale  # tap (row +0, col +1), per-channel weight
    x = torch.randn(2, grid * grid, d)
    h = mlp.fc1(x).detach()  # [B, T, M], tokens row-major
    right = torch.zeros_like(h)
    for r in range(grid):
        for c in range(grid - 1):
            right[:, r * grid + c] = h[:, r * grid + c + 1]
    expected = mlp.fc2(mlp.act(h + scale * right))
    torch.testing.assert_close(mlp(x), expected)


def test_mlp_conv_starts_as_the_plain_sit_and_learns():
    """Zero-initialised: with the other weights copied, the model equals the one without the convolution; a non-zero
    kernel changes the output and gradients reach every kernel."""
    _assert_zero_initialised_addition(
        {"relative_position_bias": True}, {"mlp_conv": 3},
        lambda b: {"mlp.dwconv.weight": b.mlp.dwconv.weight, "mlp.dwconv.bias": b.mlp.dwconv.bias})


def test_unpatchify_inverts_patch_layout():
    cfg = _tiny(learn_sigma=False)
    model = build_model(cfg)
    p, c, g = cfg.patch_size, cfg.in_channels, cfg.image_size // cfg.patch_size
    img = torch.randn(2, c, cfg.image_size, cfg.image_size)
    tokens = img.reshape(2, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * c)
    torch.testing.assert_close(model.unpatchify(tokens), img)


def test_adaln_zero_init():
    """From scratch every sublayer output and the head are zero (adaLN-Zero), for residual and DAR alike."""
    for routing in (RoutingConfig(), RoutingConfig(**DAR)):
        cfg = _tiny(routing=routing)
        model = build_model(cfg)
        x, t, y = _inputs(cfg)
        out, internals = model(x, t, y, return_internals=True)
        assert not out.any()
        assert all(not v.any() for v in internals.outputs)


def test_static_t_fixed_zero_inits_t_embedder_output_layer():
    dar = build_model(_tiny(routing=RoutingConfig(kind="dar", query="static_t", time_gain="fixed")))
    assert not dar.t_embedder.mlp[2].weight.any() and not dar.t_embedder.mlp[2].bias.any()
    assert not dar.t_embedder(torch.rand(3)).any()
    for routing in (RoutingConfig(), RoutingConfig(kind="dar", query="static"),
                    RoutingConfig(kind="dar", query="static_t", time_gain="learned")):
        assert build_model(_tiny(routing=routing)).t_embedder.mlp[2].weight.any()


def test_residual_internals_are_the_residual_stream():
    cfg = _tiny()
    model = _randomise(build_model(cfg))
    x, t, y = _inputs(cfg)
    out, it = model(x, t, y, return_internals=True)
    assert len(it.inputs) == len(it.outputs) == cfg.num_sublayers and it.weights is None
    running = it.v0
    for h, v in zip(it.inputs, it.outputs):
        torch.testing.assert_close(h, running)
        running = running + v
    torch.testing.assert_close(it.final_input, running)
    torch.testing.assert_close(it.block_outputs()[-1], it.final_input)
    assert len(it.block_outputs()) == cfg.depth
    torch.testing.assert_close(out, model(x, t, y))
    # sublayer outputs are the raw gated outputs, not residual sums
    block = model.blocks[0]
    torch.testing.assert_close(it.outputs[0], block.attn_sublayer(it.inputs[0], it.c))
    torch.testing.assert_close(block(it.v0, it.c), it.inputs[2])


@pytest.mark.parametrize("query", ["static", "static_t", "dynamic"])
def test_recorded_routing_weights_sum_to_one(query):
    cfg = _tiny(depth=3, routing=RoutingConfig(kind="dar", query=query, chunk_size=2))
    model = _randomise(build_model(cfg))
    with torch.no_grad():
        for p in routing_parameters(model):
            p.normal_(0.0, 1.0)
    x, t, y = _inputs(cfg)
    _, it = model(x, t, y, return_internals=True)
    assert len(it.weights) == cfg.num_sublayers + 1
    for alpha in it.weights:
        torch.testing.assert_close(alpha.sum(0), torch.ones(2, cfg.num_tokens))
    assert any((alpha.std(0) > 1e-3).any() for alpha in it.weights[1:])  # not all uniform


def test_label_dropout_gives_the_null_label():
    cfg = _tiny(class_dropout_prob=1.0)
    model = _randomise(build_model(cfg))
    x, t, y = _inputs(cfg)
    model.train()
    dropped = model(x, t, y)
    model.eval()
    torch.testing.assert_close(dropped, model(x, t, None))  # y=None is the null label
    torch.testing.assert_close(dropped, model(x, t, torch.full_like(y, cfg.num_classes)))
    assert (model(x, t, y) - dropped).abs().max() > 1e-3  # eval mode keeps labels
    emb = model.y_embedder
    emb.dropout_prob = 0.5
    labels = emb.drop_labels(torch.zeros(4000, dtype=torch.long))
    assert set(labels.tolist()) == {0, cfg.num_classes}
    assert abs((labels == cfg.num_classes).float().mean().item() - 0.5) < 0.05
    forced = emb.drop_labels(torch.tensor([1, 2, 3]), force_drop=torch.tensor([True, False, True]))
    assert forced.tolist() == [cfg.num_classes, 2, cfg.num_classes]


def test_unconditional_model_rejects_labels():
    cfg = _tiny(num_classes=0)
    model = build_model(cfg)
    assert model.y_embedder is None
    with pytest.raises(ValueError, match="unconditional"):
        model(*_inputs(_tiny())[:2], torch.tensor([0, 1]))


def test_param_groups_split_routing_decay_and_no_decay():
    model = build_model(_tiny(routing=RoutingConfig(kind="dar", query="dynamic", chunk_size=2)))
    groups = param_groups(model, lr=1e-4, routing_lr=1e-3, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in by_name["routing"]["params"]} == {id(p) for p in routing_parameters(model)}
    assert by_name["routing"]["lr"] == 1e-3 and by_name["routing"]["weight_decay"] == 0.0
    assert by_name["decay"]["weight_decay"] == 0.01 and by_name["no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in by_name["no_decay"]["params"]}
    assert id(model.y_embedder.embedding_table.weight) in no_decay
    assert id(model.blocks[0].attn.qkv.bias) in no_decay
    assert all(p.ndim >= 2 for p in by_name["decay"]["params"])
    torch.optim.AdamW(groups)  # accepted as is
    residual = param_groups(build_model(_tiny()), lr=1e-4)
    assert [g["name"] for g in residual] == ["decay", "no_decay"]
