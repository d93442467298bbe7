"""Residual -> DAR retrofit parity, gradient flow through the full model, checkpointing, save/load."""

import pytest
import torch

from dmd_dar.errors import UserError
from dmd_dar.models import (
    build_model,
    is_identity_router,
    load_model,
    load_weights,
    preset_config,
    read_config,
    save_model,
    to_dar,
    to_residual,
)
from dmd_dar.routing import RoutingConfig, routing_parameters


def _trained_residual(depth=3, **overrides):
    """A tiny residual model with random non-zero weights in every layer (adaLN and head included)."""
    model = build_model(preset_config("tiny", depth=depth, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def _inputs(model, batch=2):
    cfg = model.cfg
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    return x, torch.rand(batch), torch.randint(0, cfg.num_classes, (batch,))


@pytest.mark.parametrize("query", ["static", "static_t", "dynamic"])
@pytest.mark.parametrize("chunk, summary", [(1, "last"), (2, "sum"), (2, "last"), (4, "sum")])
def test_to_dar_is_function_preserving(query, chunk, summary):
    """Same weights, zero queries: the DAR copy equals the residual model (for_retrofit makes 'last' -> 'sum')."""
    model = _trained_residual()
    dar = to_dar(model, RoutingConfig(kind="dar", query=query, chunk_size=chunk, summary=summary))
    assert dar.cfg.routing.scale == "count"
    assert dar.cfg.routing.summary == ("sum" if chunk > 1 else summary)
    assert not model.cfg.routing.is_dar  # the original is untouched
    x, t, y = _inputs(model)
    out = model(x, t, y)
    assert out.abs().mean() > 0.1  # not trivially zero
    out_dar, it = dar(x, t, y, return_internals=True)
    torch.testing.assert_close(out_dar, out, atol=1e-5, rtol=1e-5)
    _, it_res = model(x, t, y, return_internals=True)
    for h, h_res in zip(it.inputs, it_res.inputs):
        torch.testing.assert_close(h, h_res, atol=1e-5, rtol=1e-5)
    # the t-embedder was not touched (not re-initialised to zero)
    torch.testing.assert_close(dar.t_embedder.mlp[2].weight, model.t_embedder.mlp[2].weight)


@pytest.mark.parametrize("mlp_conv", [0, 3])
def test_to_dar_is_function_preserving_with_relative_position_bias(mlp_conv):
    """The embedded teacher's architecture (learned attention bias tables, convolutional MLP) converts exactly."""
    model = _trained_residual(relative_position_bias=True, mlp_conv=mlp_conv)
    dar = to_dar(model, RoutingConfig(kind="dar", query="static_t", chunk_size=4))
    assert dar.cfg.relative_position_bias and dar.cfg.mlp_conv == mlp_conv
    x, t, y = _inputs(model)
    torch.testing.assert_close(dar(x, t, y), model(x, t, y), atol=1e-5, rtol=1e-5)


def test_chunked_last_summaries_break_parity():
    """Documented: chunked DAR with 'last' summaries drops intra-chunk outputs, so it is not a retrofit."""
    model = _trained_residual()
    x, t, y = _inputs(model)
    out = model(x, t, y)
    kw = dict(kind="dar", query="static", chunk_size=2, scale="count")
    last = to_dar(model, RoutingConfig(summary="last", **kw), function_preserving=False)
    total = to_dar(model, RoutingConfig(summary="sum", **kw), function_preserving=False)
    torch.testing.assert_close(total(x, t, y), out, atol=1e-5, rtol=1e-5)
    diff = (last(x, t, y) - out).abs().max()
    assert diff > 1e-2 * out.abs().max(), float(diff)
    assert not is_identity_router(last) and is_identity_router(total)


def test_convex_scale_parity_only_up_to_layernorm_eps():
    """The paper's convex weights give h_l = (residual) / |S_l|; LayerNorm hides that up to its epsilon."""
    model = _trained_residual()
    dar = to_dar(model, RoutingConfig(kind="dar", query="static", scale="convex"), function_preserving=False)
    x, t, y = _inputs(model)
    torch.testing.assert_close(dar(x, t, y), model(x, t, y), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("query", ["static_t", "dynamic"])
def test_parity_with_gradient_checkpointing(query):
    model = _trained_residual()
    dar = to_dar(model, RoutingConfig(kind="dar", query=query, chunk_size=2))
    ckpt = to_dar(model, RoutingConfig(kind="dar", query=query, chunk_size=2))
    ckpt.cfg.gradient_checkpointing = True
    with torch.no_grad():  # move the queries so that routing is non-trivial, identically in both copies
        for p, q in zip(routing_parameters(dar), routing_parameters(ckpt)):
            p.add_(0.3 * torch.randn_like(p))
            q.copy_(p)
    x, t, y = _inputs(model)
    outs, grads = [], []
    for m in (dar, ckpt):
        m.train()
        m.y_embedder.dropout_prob = 0.0
        m.zero_grad()
        out = m(x, t, y)
        out.pow(2).mean().backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)
    for g_ckpt, g in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_ckpt, g, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_residual_is_exact():
    model = _trained_residual().train()
    model.y_embedder.dropout_prob = 0.0
    x, t, y = _inputs(model)
    runs = []
    for flag in (False, True):
        model.cfg.gradient_checkpointing = flag
        model.zero_grad()
        out = model(x, t, y)
        out.pow(2).mean().backward()
        runs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=0, rtol=0)
    for g1, g0 in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(g1, g0, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("query", ["static", "static_t", "dynamic"])
def test_gradients_reach_every_router_parameter_through_the_model(query):
    model = _trained_residual()
    dar = to_dar(model, RoutingConfig(kind="dar", query=query, chunk_size=2)).train()
    dar.y_embedder.dropout_prob = 0.0
    with torch.no_grad():  # off zero: at zero queries, the time gain / norm gains have zero gradient
        for p in routing_parameters(dar):
            p.add_(0.1 * torch.randn_like(p))
    x, t, y = _inputs(dar)
    dar(x, t, y).pow(2).mean().backward()
    named = {n: p for n, p in dar.named_parameters() if n.startswith("router.")}
    assert named and {id(p) for p in named.values()} == {id(p) for p in routing_parameters(dar)}
    for name, p in named.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_to_residual_round_trip_and_guard():
    model = _trained_residual()
    dar = to_dar(model, RoutingConfig(kind="dar", query="dynamic", chunk_size=2))
    back = to_residual(dar)
    x, t, y = _inputs(model)
    torch.testing.assert_close(back(x, t, y), model(x, t, y), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        dar.router.aggregators["sublayer_3"].query_proj.weight.add_(0.1)
    with pytest.raises(UserError, match="force=True"):
        to_residual(dar)
    assert not to_residual(dar, force=True).cfg.routing.is_dar
    with pytest.raises(UserError, match="already uses DAR"):
        to_dar(dar, RoutingConfig(kind="dar"))
    with pytest.raises(UserError, match="kind='dar'"):
        to_dar(model, RoutingConfig(kind="residual"))


@pytest.mark.parametrize("routing, bias, conv", [(RoutingConfig(), False, 0),
                                                 (RoutingConfig(kind="dar", query="static_t", chunk_size=2), False, 0),
                                                 (RoutingConfig(), True, 3)])
def test_save_load_round_trip(tmp_path, routing, bias, conv):
    model = _trained_residual(routing=routing, relative_position_bias=bias, mlp_conv=conv)
    with torch.no_grad():
        for p in routing_parameters(model):
            p.normal_(0.0, 0.5)
    path = save_model(model, tmp_path / "model.safetensors")
    assert read_config(path) == model.cfg
    loaded = load_model(path)
    assert not loaded.training
    x, t, y = _inputs(model)
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y), atol=0, rtol=0)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary behind


def test_load_mismatched_architecture_names_file_and_keys(tmp_path):
    path = save_model(_trained_residual(depth=3), tmp_path / "deep.safetensors")
    shallow = build_model(preset_config("tiny", depth=2))
    with pytest.raises(UserError, match=r"deep\.safetensors.*unexpected .*blocks\.2\.") as err:
        load_weights(shallow, path)
    assert "\n" not in str(err.value)
    wide = build_model(preset_config("tiny", depth=3, hidden_size=48))
    with pytest.raises(UserError, match="shape mismatch"):
        load_weights(wide, path)
    dar = build_model(preset_config("tiny", depth=3, routing=RoutingConfig(kind="dar")))
    with pytest.raises(UserError, match=r"missing \d+ key\(s\): router\.aggregators"):
        load_weights(dar, path)


def test_load_corrupt_or_missing_file(tmp_path):
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00\x01not a safetensors file")
    for fn in (load_model, lambda p: load_weights(build_model(preset_config("tiny")), p)):
        with pytest.raises(UserError, match="corrupt.safetensors") as err:
            fn(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    good = save_model(_trained_residual(), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-64])
    with pytest.raises(UserError, match="truncated.safetensors"):
        load_model(truncated)
