"""DAR routing: source sets, softmax weights, lean autograd == reference, gradients, residual parity."""

import pytest
import torch

from dmd_dar.errors import UserError
from dmd_dar.routing import (
    DARRouter,
    ResidualRouter,
    RoutingConfig,
    aggregate_lean,
    aggregate_reference,
    build_router,
    routing_parameters,
    source_indices,
)

# Worked indices from reference/dar_paper.md §1.4 (SiT-XL/2, L = 56 sublayers, S = 4).
WORKED_S4 = {
    1: [0],
    2: [0, 1],
    4: [0, 1, 2, 3],
    5: [0, 4],
    25: [0, 4, 8, 12, 16, 20, 24],
    26: [0, 4, 8, 12, 16, 20, 24, 25],
    28: [0, 4, 8, 12, 16, 20, 24, 25, 26, 27],
    56: list(range(0, 53, 4)) + [53, 54, 55],
    57: list(range(0, 53, 4)) + [53, 54, 55, 56],
}


def test_source_sets_match_worked_indices_s4():
    for sublayer, expected in WORKED_S4.items():
        assert source_indices(sublayer, 56, 4) == expected, sublayer


@pytest.mark.parametrize("chunk, max_sources, final_sources", [(1, 56, 57), (4, 17, 18), (8, 14, 15)])
def test_source_set_sizes_by_chunk(chunk, max_sources, final_sources):
    sizes = [len(source_indices(l, 56, chunk)) for l in range(1, 57)]
    assert max(sizes) == max_sources
    assert len(source_indices(57, 56, chunk)) == final_sources
    # the immediately preceding output is always routable
    assert all(l - 1 in source_indices(l, 56, chunk) for l in range(1, 58))


def test_dense_is_all_previous_outputs():
    assert source_indices(7, 10, 1) == list(range(7))
    assert source_indices(11, 10, 1) == list(range(11))


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_history_holds_the_indexed_sources(chunk):
    """The tensors SourceHistory hands out are exactly v_i for the indices of source_indices."""
    num = 10
    router = DARRouter(num, 4, RoutingConfig(kind="dar", query="static", chunk_size=chunk))
    values = [torch.full((1, 1, 4), float(i)) for i in range(num + 1)]  # v_i filled with i
    state = router.begin(values[0])
    for l in range(1, num + 1):
        got = [int(s[0, 0, 0]) for s in state.sources()]
        assert got == source_indices(l, num, chunk)
        state.push(values[l])
    assert [int(s[0, 0, 0]) for s in state.final_sources()] == source_indices(num + 1, num, chunk)


def _random_sources(n=5, b=2, t=3, d=8, dtype=torch.float64):
    return [torch.randn(b, t, d, dtype=dtype, requires_grad=True) for _ in range(n)]


@pytest.mark.parametrize("layout", ["stacked", "per_source"])
@pytest.mark.parametrize("query_tokens", [1, 3])
@pytest.mark.parametrize("count_scale", [False, True])
def test_lean_matches_reference_forward_and_backward(query_tokens, count_scale, layout):
    src = _random_sources()
    q = torch.randn(2, query_tokens, 8, dtype=torch.float64, requires_grad=True)
    gain = (1 + 0.1 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    h_ref, a_ref = aggregate_reference(src, q, gain, 1e-6, count_scale)
    w = torch.randn_like(h_ref)
    grads_ref = torch.autograd.grad((h_ref * w).sum(), [q, gain, *src])
    h, a = aggregate_lean(src, q, gain, 1e-6, count_scale, layout)
    grads = torch.autograd.grad((h * w).sum(), [q, gain, *src])
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(a, a_ref.to(a.dtype))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("layout", ["stacked", "per_source"])
def test_lean_without_grad_matches_reference(layout):
    """Under no_grad (teacher passes) the lean path runs its maths without the autograd function: same values."""
    src = _random_sources()
    q = torch.randn(2, 3, 8, dtype=torch.float64)
    gain = 1 + 0.1 * torch.randn(8, dtype=torch.float64)
    h_ref, a_ref = aggregate_reference(src, q, gain, 1e-6, True)
    with torch.no_grad():
        h, a = aggregate_lean(src, q, gain, 1e-6, True, layout)
    torch.testing.assert_close(h, h_ref.detach())
    torch.testing.assert_close(a, a_ref.detach())


@pytest.mark.parametrize("layout", ["stacked", "per_source"])
def test_lean_gradcheck(layout):
    src = _random_sources(n=3, b=1, t=2, d=4)
    q = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    gain = torch.rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, g, *s: aggregate_lean(list(s), q, g, 1e-6, False, layout)[0],
                                    (q, gain, *src))


def test_weights_are_softmax_over_depth_and_sum_to_one():
    src = _random_sources(dtype=torch.float32)
    q = torch.randn(2, 1, 8)
    h, alpha = aggregate_reference(src, q, torch.ones(8), 1e-6, False)
    torch.testing.assert_close(alpha.sum(0), torch.ones(2, 3))
    assert alpha.dtype == torch.float32 and (alpha > 0).all()
    # zero query: uniform weights, h is the mean of the sources
    h0, a0 = aggregate_reference(src, torch.zeros(2, 1, 8), torch.ones(8), 1e-6, False)
    torch.testing.assert_close(a0, torch.full_like(a0, 1 / 5))
    torch.testing.assert_close(h0, torch.stack(src).mean(0).float().detach())


@pytest.mark.parametrize("layout", ["stacked", "per_source"])
def test_softmax_runs_in_fp32_for_bf16_sources(layout):
    src = [s.detach().to(torch.bfloat16) for s in _random_sources()]
    h, alpha = aggregate_lean(src, torch.randn(2, 1, 8), torch.ones(8), 1e-6, False, layout)
    assert h.dtype == torch.bfloat16 and alpha.dtype == torch.float32
    torch.testing.assert_close(alpha.sum(0), torch.ones(2, 3))


@pytest.mark.parametrize("query", ["static", "static_t", "dynamic"])
@pytest.mark.parametrize("chunk, summary", [(1, "last"), (3, "sum")])
def test_zero_query_count_scaled_dar_equals_residual(query, chunk, summary):
    """With zero queries and count scaling, DAR reproduces the residual stream at every sublayer."""
    num, dim = 7, 6
    cfg = RoutingConfig(kind="dar", query=query, chunk_size=chunk, summary=summary).for_retrofit()
    dar, res = build_router(cfg, num, dim), ResidualRouter(num, dim)
    values = [torch.randn(2, 5, dim) for _ in range(num + 1)]
    t_emb = torch.randn(2, dim)
    s_dar, s_res = dar.begin(values[0]), res.begin(values[0])
    for l in range(1, num + 1):
        torch.testing.assert_close(dar.input_for(l, s_dar, t_emb), res.input_for(l, s_res), atol=1e-5, rtol=1e-5)
        dar.push(s_dar, values[l])
        res.push(s_res, values[l])
    torch.testing.assert_close(dar.output(s_dar, t_emb), res.output(s_res), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("query", ["static", "static_t", "dynamic"])
def test_gradients_reach_every_router_parameter(query):
    num, dim = 5, 6
    router = DARRouter(num, dim, RoutingConfig(kind="dar", query=query, chunk_size=2, time_gain="learned"))
    # Queries start at zero; move them so every parameter sits at a point with a generic gradient.
    with torch.no_grad():
        for p in router.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = router.begin(torch.randn(2, 3, dim))
    t_emb = torch.randn(2, dim)
    for l in range(1, num + 1):
        h = router.input_for(l, state, t_emb)
        router.push(state, torch.tanh(h) + torch.randn(2, 3, dim))
    router.output(state, t_emb).pow(2).sum().backward()
    params = dict(router.named_parameters())
    assert params and set(map(id, routing_parameters(router))) == set(map(id, params.values()))
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_recorded_weights_one_per_aggregator():
    num = 4
    router = DARRouter(num, 4, RoutingConfig(kind="dar", query="static"))
    state = router.begin(torch.randn(1, 2, 4), record_weights=True)
    for l in range(1, num + 1):
        router.push(state, router.input_for(l, state))
    router.output(state)
    assert [w.shape[0] for w in state.weights] == [1, 2, 3, 4, 5]


def test_bad_config_names_the_key():
    with pytest.raises(UserError, match="routing.query"):
        RoutingConfig(kind="dar", query="magic")
    with pytest.raises(UserError, match="chunk_size"):
        RoutingConfig(kind="dar", chunk_size=0)
