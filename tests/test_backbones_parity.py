"""DAR adapters for diffusers models: at step 0 the wrapper computes the stock model's function (outputs and
parameter gradients), with and without gradient checkpointing; routing parameters get gradients; the diffusers
module tree and state-dict keys are untouched."""

import copy
import inspect

import pytest
import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
)

from dmd_dar.backbones import ADAPTERS, DARTransformer, wrap_with_dar
from dmd_dar.distill.task import disable_dropout
from dmd_dar.routing import RoutingConfig

B = 2


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter so that zero-initialised gates / output layers are not trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()  # eval: DiT's label embedder drops labels at random in train mode


def _dit():
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    inputs = dict(hidden_states=torch.randn(B, 4, 8, 8), timestep=torch.tensor([3, 700]),
                  class_labels=torch.tensor([1, 9]))
    return model, inputs


def _pixart():
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                     caption_channels=12, use_additional_conditions=False)
    mask = torch.ones(B, 5)
    mask[1, 3:] = 0
    inputs = dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 5, 12),
                  timestep=torch.tensor([3, 700]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                  encoder_attention_mask=mask)
    return model, inputs


def _sd3():
    # Two blocks: block 0 has SD3.5's dual attention, block 1 is the context_pre_only block.
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                  pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8,
                                  dual_attention_layers=(0,), qk_norm="rms_norm")
    inputs = dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 5, 12),
                  pooled_projections=torch.randn(B, 10), timestep=torch.tensor([3.0, 700.0]))
    return model, inputs


def _flux():
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                   pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                         indexing="ij"), -1).reshape(16, 3)
    inputs = dict(hidden_states=torch.randn(B, 16, 8), encoder_hidden_states=torch.randn(B, 5, 12),
                  pooled_projections=torch.randn(B, 10), timestep=torch.tensor([0.1, 0.9]),
                  img_ids=img_ids, txt_ids=torch.zeros(5, 3))
    return model, inputs


def _qwen():
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                        axes_dims_rope=(2, 2, 4))
    mask = torch.ones(B, 5)
    mask[1, 4:] = 0
    inputs = dict(hidden_states=torch.randn(B, 16, 16), encoder_hidden_states=torch.randn(B, 5, 12),
                  encoder_hidden_states_mask=mask, timestep=torch.tensor([0.1, 0.9]),
                  img_shapes=[[(1, 4, 4)]] * B)
    return model, inputs


FACTORIES = {"DiT": _dit, "PixArt": _pixart, "SD3": _sd3, "Flux": _flux, "QwenImage": _qwen}
TWO_STREAM = {"SD3", "Flux", "QwenImage"}
_CACHE: dict[str, tuple] = {}


def make(name: str):
    """A fresh copy of a tiny, randomised model of family ``name`` and its inputs (built once per session)."""
    if name not in _CACHE:
        torch.manual_seed(1)
        model, inputs = FACTORIES[name]()
        _CACHE[name] = (_randomise(model, seed=2), inputs)
    model, inputs = _CACHE[name]
    return copy.deepcopy(model), copy.deepcopy(inputs)


def dar(query: str = "static_t", chunk: int = 1) -> RoutingConfig:
    return RoutingConfig(kind="dar", query=query, chunk_size=chunk)


def _sample(out):
    return out.sample if hasattr(out, "sample") else out[0]


def _run(module, inputs, grad: bool):
    """Output and (when ``grad``) the gradients of a fixed scalar loss w.r.t. the diffusers parameters."""
    module.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        out = _sample(module(**copy.deepcopy(inputs)))
    if not grad:
        return out, None
    (out.square().mean() + out.mean()).backward()
    transformer = module.transformer if isinstance(module, DARTransformer) else module
    return out.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


CASES = [(name, text) for name in FACTORIES for text in ((False, True) if name in TWO_STREAM else (False,))]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("chunk", [1, 3], ids=["dense", "chunk3"])
@pytest.mark.parametrize("query", ["static", "static_t", "dynamic"])
@pytest.mark.parametrize("name, route_text", CASES, ids=[f"{n}{'-text' if t else ''}" for n, t in CASES])
def test_step0_parity(name, route_text, query, chunk, checkpointing):
    model, inputs = make(name)
    if checkpointing:
        model.enable_gradient_checkpointing()
    expected, expected_grads = _run(model, inputs, grad=checkpointing)
    assert expected.abs().mean() > 1e-2  # non-trivial output

    wrapper = wrap_with_dar(model, dar(query, chunk), route_text=route_text)
    got, grads = _run(wrapper, inputs, grad=checkpointing)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    if checkpointing:  # same function at step 0 => same gradients for every diffusers parameter
        assert grads.keys() == expected_grads.keys()
        for key, g in expected_grads.items():
            torch.testing.assert_close(grads[key], g, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_residual_kind_reproduces_stock(name):
    model, inputs = make(name)
    expected, _ = _run(model, inputs, grad=False)
    wrapper = wrap_with_dar(model, RoutingConfig(kind="residual"))
    got, _ = _run(wrapper, inputs, grad=False)
    assert (got - expected).abs().max().item() <= 1e-6
    assert not any(True for _ in wrapper.router.parameters())


def test_pixart_sigma_width_twin_is_bit_exact():
    """At PixArt-Sigma's real width (D = 16 x 72 = 1152, T5 captions of 4096 channels; two layers, random
    weights, 16 image tokens) the residual twin reproduces the stock model bit for bit, outputs and gradients,
    and the DAR retrofit to float rounding. The tiny-width tests above cannot see a 1-ulp difference of a
    strided operand (PatchEmbed's transposed view read unnormalised by the cross-attention): it is below their
    tolerances there and above them here."""
    torch.manual_seed(1)
    model = PixArtTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=1152, sample_size=128, patch_size=2,
                                     caption_channels=4096, use_additional_conditions=False,
                                     interpolation_scale=2).eval()  # diffusers' own init: no zero gates to perturb
    mask = torch.ones(B, 5)
    mask[1, 3:] = 0
    inputs = dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 5, 4096),
                  timestep=torch.tensor([3, 700]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                  encoder_attention_mask=mask)
    expected, expected_grads = _run(model, inputs, grad=True)
    assert expected.abs().mean() > 1e-1  # non-trivial output

    got, grads = _run(wrap_with_dar(model, RoutingConfig(kind="residual")), inputs, grad=True)
    assert torch.equal(got, expected)
    assert grads.keys() == expected_grads.keys()
    assert all(torch.equal(grads[key], g) for key, g in expected_grads.items())

    got, grads = _run(wrap_with_dar(model, dar("static_t")), inputs, grad=True)
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()
    # atol relative to the largest gradient: the key biases' gradients are zero up to rounding (softmax shift
    # invariance), so their own scale is noise.
    atol = 1e-6 * max(g.abs().max().item() for g in expected_grads.values())
    for key, g in expected_grads.items():
        torch.testing.assert_close(grads[key], g, atol=atol, rtol=1e-4, msg=key)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_train_mode_equals_eval_mode_once_dropout_is_disabled(name):
    """What the distillation tasks do to the student and the fake score (``disable_dropout``) leaves nothing that
    differs between .train() and .eval() in any family. DiT's per-block label embedders (dropout 0.1 each) are the
    only train-mode behaviour of the five: PixArt, SD3, Flux and Qwen-Image already run alike in both modes."""
    model, inputs = make(name)
    wrapper = wrap_with_dar(model, dar("dynamic", 3), route_text=name in TWO_STREAM)
    label_dropout = [m for m in wrapper.modules() if getattr(m, "dropout_prob", 0) > 0]
    assert len(label_dropout) == (len(model.transformer_blocks) if name == "DiT" else 0)
    expected, _ = _run(wrapper.eval(), inputs, grad=False)
    if name != "DiT":
        assert torch.equal(_run(wrapper.train(), inputs, grad=False)[0], expected)
    disable_dropout(wrapper)
    assert not [m for m in wrapper.modules() if getattr(m, "dropout_prob", 0) > 0]
    for seed in range(4):  # several draws: with B=2 one draw may drop no label by chance
        torch.manual_seed(seed)
        assert torch.equal(_run(wrapper.train(), inputs, grad=False)[0], expected)


@pytest.mark.parametrize("query", ["static", "static_t", "dynamic"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_gradients_reach_routers(name, query):
    model, inputs = make(name)
    route_text = name in TWO_STREAM
    wrapper = wrap_with_dar(model, dar(query, chunk=3), route_text=route_text)
    wrapper.enable_gradient_checkpointing()  # delegated to the diffusers model
    _run(wrapper, inputs, grad=True)
    routers = [wrapper.router] + ([wrapper.text_router] if route_text else [])
    for router in routers:
        named = dict(router.named_parameters())
        assert named
        assert all(p.grad is not None for p in named.values()), [n for n, p in named.items() if p.grad is None]
        # At zero queries the RMSNorm gains have zero gradient; the query parameters must not.
        query_grads = [p.grad for n, p in named.items() if "norm_gain" not in n]
        assert all(g.abs().sum() > 0 for g in query_grads)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_trained_routing_changes_the_function(name):
    """Non-zero queries re-weight the sources: the wrapper is no longer the stock model."""
    model, inputs = make(name)
    expected, _ = _run(model, inputs, grad=False)
    wrapper = wrap_with_dar(model, dar("static"), route_text=name in TWO_STREAM)
    with torch.no_grad():
        for n, p in wrapper.named_parameters():
            if n.endswith(".query"):
                p.normal_(0, 30.0)
    got, _ = _run(wrapper, inputs, grad=False)
    assert (got - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", list(FACTORIES))
def test_module_tree_and_state_dict_keys_unchanged(name):
    model, _ = make(name)
    keys = list(model.state_dict().keys())
    modules = [n for n, _ in model.named_modules()]
    wrapper = wrap_with_dar(model, dar("dynamic", 3), route_text=name in TWO_STREAM)
    assert wrapper.transformer is model
    assert list(model.state_dict().keys()) == keys
    assert [n for n, _ in model.named_modules()] == modules
    outer = set(wrapper.state_dict().keys())
    assert {k for k in outer if k.startswith("transformer.")} == {f"transformer.{k}" for k in keys}
    assert all(k.startswith(("transformer.", "router.", "text_router.")) for k in outer)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_drop_in_for_pipelines(name):
    """Same forward signature; config/dtype/device fall through; saving without routers is refused."""
    model, inputs = make(name)
    wrapper = wrap_with_dar(model, dar())
    stock = inspect.signature(type(model).forward).parameters
    assert list(inspect.signature(type(wrapper).forward).parameters) == list(stock)
    assert wrapper.config is model.config and wrapper.dtype == torch.float32
    out = wrapper(**inputs, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    with pytest.raises(AttributeError, match="routers"):
        wrapper.save_pretrained("unused")


def test_sd3_dual_attention_has_no_dead_aggregator():
    """attn2 shares the joint attention's routed input, so its sublayer has no aggregator (block 0 = 1, 2, 3)."""
    model, _ = make("SD3")
    wrapper = wrap_with_dar(model, dar())
    names = set(wrapper.router.aggregators.keys())
    assert "sublayer_2" not in names and {"sublayer_3", "sublayer_4", "sublayer_5", "final"} <= names
    assert wrapper.router.num_sublayers == 5  # block 0: attn, attn2, ff; block 1: attn, ff
    assert wrapper.text_router.num_sublayers == 2  # block 0: attn, ff; block 1 reads the output aggregator


@pytest.mark.parametrize("route_text", [False, True])
def test_sd3_skip_layers_and_controlnet(route_text):
    model, inputs = make("SD3")
    inputs = dict(inputs, skip_layers=[0], block_controlnet_hidden_states=[torch.randn(B, 16, 16)])
    expected, _ = _run(model, inputs, grad=False)
    got, _ = _run(wrap_with_dar(model, dar("dynamic", 3), route_text=route_text), inputs, grad=False)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("repeat", [False, True])
def test_flux_controlnet_residuals(repeat):
    model, inputs = make("Flux")
    inputs = dict(inputs, controlnet_block_samples=[torch.randn(B, 16, 16)],
                  controlnet_single_block_samples=[torch.randn(B, 16, 16)], controlnet_blocks_repeat=repeat)
    expected, _ = _run(model, inputs, grad=False)
    got, _ = _run(wrap_with_dar(model, dar("static_t", 3), route_text=True), inputs, grad=False)
    assert (got - expected).abs().max().item() <= 1e-5


def test_flux_guidance_and_no_single_blocks():
    torch.manual_seed(3)
    model = _randomise(FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=0,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                              pooled_projection_dim=10, guidance_embeds=True,
                                              axes_dims_rope=(2, 2, 4)), seed=4)
    _, inputs = make("Flux")
    inputs = dict(inputs, guidance=torch.tensor([3.5, 1.0]))
    expected, _ = _run(model, inputs, grad=False)
    wrapper = wrap_with_dar(model, dar("static_t"), route_text=True)
    assert wrapper.text_router.num_sublayers == 2  # block 1's text FF output is never read
    got, _ = _run(wrapper, inputs, grad=False)
    assert (got - expected).abs().max().item() <= 1e-5


def test_qwen_zero_cond_t():
    torch.manual_seed(5)
    model = _randomise(QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                   attention_head_dim=8, num_attention_heads=2,
                                                   joint_attention_dim=12, axes_dims_rope=(2, 2, 4),
                                                   zero_cond_t=True), seed=6)
    _, inputs = make("QwenImage")
    inputs = dict(inputs, img_shapes=[[(1, 2, 4), (1, 2, 4)]] * B)
    expected, _ = _run(model, inputs, grad=False)
    got, _ = _run(wrap_with_dar(model, dar("static_t", 3), route_text=True), inputs, grad=False)
    assert (got - expected).abs().max().item() <= 1e-5


def test_every_adapter_is_exercised():
    assert {type(make(name)[0]).__name__ for name in FACTORIES} == set(ADAPTERS)


class _ThreeOutputProcessor:
    """Stands in for an IP-adapter processor: returns a third (image) output that Flux adds after the FF."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        out, context_out = FluxAttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask,
                                               image_rotary_emb)
        return out, context_out, 0.5 * torch.tanh(out)


def test_flux_third_attention_output_is_added_like_diffusers():
    model, inputs = make("Flux")
    for block in model.transformer_blocks:
        block.attn.set_processor(_ThreeOutputProcessor())
    expected, _ = _run(model, inputs, grad=False)
    got, _ = _run(wrap_with_dar(model, dar("dynamic")), inputs, grad=False)
    assert (got - expected).abs().max().item() <= 1e-5


def test_wrapper_deepcopies_and_pickles():
    """Students and fake-score networks are copies of one wrapped teacher."""
    import pickle

    model, inputs = make("DiT")
    wrapper = wrap_with_dar(model, dar("dynamic", 3))
    expected, _ = _run(wrapper, inputs, grad=False)
    for clone in (copy.deepcopy(wrapper), pickle.loads(pickle.dumps(wrapper))):
        assert clone.transformer is not model
        got, _ = _run(clone, inputs, grad=False)
        assert torch.equal(got, expected)
