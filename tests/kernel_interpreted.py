"""The fused DAR kernel under Triton's interpreter (CPU): run by ``test_routing_kernel.py`` in a subprocess with
``TRITON_INTERPRET=1`` (the interpreter is chosen when the kernel is defined, so the variable must be set before
``dmd_dar.routing`` is imported). Not collected on its own (not ``test_*.py``).

Values and gradients against ``aggregate_reference`` for every query shape, scale, source set and dtype, with
``torch.testing.assert_close``'s default tolerances (those of the lean-path tests), gradcheck in float64, N = 57
sources (SiT-XL/2 dense: the deepest model in our configs), widths that are not powers of two, and the saved
activations.
"""

import os

import pytest
import torch

from dmd_dar.routing import DARRouter, RoutingConfig, aggregate_lean, aggregate_reference
from dmd_dar.routing.kernel import aggregate_fused, dar_fused_forward

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_routing_kernel.py"

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _case(n, b, t, d, query_tokens, dtype):
    src = [torch.randn(b, t, d, dtype=dtype).requires_grad_() for _ in range(n)]
    qdtype = torch.float64 if dtype == torch.float64 else torch.float32  # parameters stay fp32 under autocast
    q = torch.randn(b, query_tokens, d, dtype=qdtype, requires_grad=True)
    gain = (1 + 0.1 * torch.randn(d, dtype=qdtype)).requires_grad_()
    return src, q, gain


def _values_and_grads(fn, src, q, gain, count_scale, w=None):
    h, alpha = fn(src, q, gain, 1e-6, count_scale)
    w = torch.randn_like(h) if w is None else w
    grads = torch.autograd.grad((h.float() * w.float()).sum(), [q, gain, *src])
    return h, alpha, grads, w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("query_tokens", [1, 3])
@pytest.mark.parametrize("count_scale", [False, True])
def test_fused_matches_reference_values_and_gradients(dtype, query_tokens, count_scale):
    src, q, gain = _case(5, 2, 3, 8, query_tokens, dtype)
    h_ref, a_ref, g_ref, w = _values_and_grads(aggregate_reference, src, q, gain, count_scale)
    h, a, g, _ = _values_and_grads(aggregate_fused, src, q, gain, count_scale, w)
    assert h.dtype == dtype and a.dtype == a_ref.dtype
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(a, a_ref)
    for got, want in zip(g, g_ref):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("n, d", [(57, 8), (3, 6), (4, 40), (2, 1152)])
def test_fused_any_depth_and_width(n, d):
    """N up to 57 sources (SiT-XL/2, dense final aggregator) and widths that are not a power of two."""
    src, q, gain = _case(n, 2, 5, d, 5, torch.float32)
    h_ref, a_ref, g_ref, w = _values_and_grads(aggregate_reference, src, q, gain, False)
    h, a, g, _ = _values_and_grads(aggregate_fused, src, q, gain, False, w)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(a, a_ref)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("query_tokens", [1, 2])
def test_fused_gradcheck(query_tokens):
    src, q, gain = _case(3, 1, 2, 4, query_tokens, torch.float64)
    assert torch.autograd.gradcheck(lambda q, g, *s: aggregate_fused(list(s), q, g, 1e-6, True)[0], (q, gain, *src))


@pytest.mark.parametrize("query", ["static", "static_t", "dynamic"])
@pytest.mark.parametrize("chunk, summary", [(1, "last"), (3, "last"), (3, "sum")])
def test_router_with_the_kernel_equals_the_torch_path(query, chunk, summary):
    """Every query and source set through DARRouter: same outputs and same gradients for every parameter."""
    num, dim = 7, 6
    routers = {k: DARRouter(num, dim, RoutingConfig(kind="dar", query=query, chunk_size=chunk, summary=summary,
                                                    time_gain="learned", kernel=k)) for k in ("torch", "triton")}
    with torch.no_grad():
        for p in routers["torch"].parameters():
            p.add_(0.3 * torch.randn_like(p))
    routers["triton"].load_state_dict(routers["torch"].state_dict())
    v0, t_emb = torch.randn(2, 4, dim), torch.randn(2, dim)
    outputs, grads = {}, {}
    for kind, router in routers.items():
        torch.manual_seed(1)
        state = router.begin(v0)
        for l in range(1, num + 1):
            h = router.input_for(l, state, t_emb)
            router.push(state, torch.tanh(h) + torch.randn(2, 4, dim))
        out = router.output(state, t_emb)
        out.pow(2).sum().backward()
        outputs[kind] = out.detach()
        grads[kind] = {name: p.grad for name, p in router.named_parameters()}
    torch.testing.assert_close(outputs["triton"], outputs["torch"])
    for name, g in grads["torch"].items():
        assert g is not None and g.abs().sum() > 0, name
        # fp32 gradients through 7 layers reach |g| ~ 20 with sum summaries: the two paths sum in different orders,
        # so the absolute tolerance scales with the gradient's size (1e-6 of it, ~10 fp32 ulps at the top)
        scale = max(1.0, g.abs().max().item())
        torch.testing.assert_close(grads["triton"][name], g, atol=1e-6 * scale, rtol=1.3e-6, msg=name)


def test_fused_saves_less_than_the_lean_path():
    """Besides the sources, the kernel keeps [N, B, T] logits and inverse RMS and a [B, T] log-sum-exp."""
    n, b, t, d = 6, 2, 5, 16
    src, q, gain = _case(n, b, t, d, 1, torch.float32)
    source_ptrs = {s.untyped_storage().data_ptr() for s in src}

    def saved_bytes(fn) -> int:
        seen: dict[int, int] = {}

        def pack(x):
            ptr = x.untyped_storage().data_ptr()
            if ptr not in source_ptrs:
                seen[ptr] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn(src, q, gain, 1e-6, False)
        return sum(seen.values())

    fused = saved_bytes(aggregate_fused)
    lean = saved_bytes(lambda *a: aggregate_lean(*a, layout="per_source"))
    params = (q.numel() + gain.numel()) * 4
    assert fused == params + (2 * n + 1) * b * t * 4
    assert fused < lean


def test_custom_op_registration_is_consistent():
    """Schema, fake (meta) implementation and autograd registration agree with the real kernel."""
    src, q, gain = _case(3, 1, 2, 8, 1, torch.float32)
    torch.library.opcheck(dar_fused_forward, ([s.detach() for s in src], q.detach(), gain.detach(), 1e-6, 1.0),
                          test_utils=("test_schema", "test_faketensor"))
