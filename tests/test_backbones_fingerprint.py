"""The diffusers code the adapters re-implement is the code they were proven against; registry and version guard."""

import pytest
import torch

from dmd_dar.backbones import ADAPTERS, TESTED_DIFFUSERS, compat, is_tested_diffusers, wrap_with_dar
from dmd_dar.errors import UserError
from dmd_dar.routing import RoutingConfig

MIRRORED = sorted({target for adapter in ADAPTERS.values() for target in adapter.mirrors})


@pytest.mark.parametrize("target", MIRRORED)
def test_mirrored_diffusers_source_is_unchanged(target):
    qualname = target.split(":")[1]
    assert target in compat.RECORDED_FINGERPRINTS, f"no recorded fingerprint for {qualname}"
    got = compat.fingerprint(target)
    assert got == compat.RECORDED_FINGERPRINTS[target], (
        f"diffusers changed {qualname}: re-check the adapter against it and update the recorded hash "
        f"(dmd_dar/backbones/compat.py, {compat.RECORDED_FINGERPRINTS[target]} -> {got}) and TESTED_DIFFUSERS"
    )


def test_every_recorded_fingerprint_is_mirrored():
    assert sorted(compat.RECORDED_FINGERPRINTS) == MIRRORED


def test_fingerprint_ignores_docstrings_comments_and_annotations():
    def a(x: int, y: "torch.Tensor" = None) -> int:
        """Doc."""
        z: int = x + 1  # comment
        return z

    def b(x, y=None):
        z = x + 1
        return z

    def c(x, y=None):
        z = x + 2
        return z

    for fn, name in ((a, "a"), (b, "b"), (c, "c")):
        globals()[f"_probe_{name}"] = fn
    probe = f"{__name__}:_probe_"
    assert compat.fingerprint(probe + "a") == compat.fingerprint(probe + "b")
    assert compat.fingerprint(probe + "a") != compat.fingerprint(probe + "c")


def test_installed_diffusers_is_in_the_tested_range():
    assert is_tested_diffusers(), f"installed diffusers is outside TESTED_DIFFUSERS={TESTED_DIFFUSERS}"
    assert not is_tested_diffusers("0.34.0")


def test_wrap_warns_outside_the_tested_range(monkeypatch):
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=4)
    monkeypatch.setattr(compat, "TESTED_DIFFUSERS", "<0.1")
    with pytest.warns(UserWarning, match="outside the tested range"):
        wrap_with_dar(model, RoutingConfig(kind="dar"))


def test_unsupported_model_lists_the_supported_classes():
    with pytest.raises(UserError, match="DiTTransformer2DModel.*FluxTransformer2DModel|Flux.*DiT"):
        wrap_with_dar(torch.nn.Linear(2, 2), RoutingConfig(kind="dar"))


def test_route_text_on_a_single_stream_model_is_a_user_error():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=4)
    with pytest.raises(UserError, match="route_text"):
        wrap_with_dar(model, RoutingConfig(kind="dar"), route_text=True)
