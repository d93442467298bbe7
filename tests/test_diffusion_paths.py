"""Noise paths: conversions round-trip and match their closed forms."""

import pytest
import torch

from dmd_dar.diffusion.paths import RectifiedFlow, VPPath, make_path
from dmd_dar.errors import UserError

CASES = [("flow", "velocity"), ("flow", "x0"), ("flow", "eps"), ("vp", "eps"), ("vp", "v"), ("vp", "x0")]


def _data(b=6):
    x0 = torch.randn(b, 3, 4, 5, dtype=torch.float64)
    eps = torch.randn(b, 3, 4, 5, dtype=torch.float64)
    t = torch.linspace(0.02, 0.98, b, dtype=torch.float64)
    return x0, eps, t


@pytest.mark.parametrize("kind,pred", CASES)
def test_conversions_round_trip(kind, pred):
    path = make_path(kind, pred, dtype=torch.float64)
    x0, eps, t = _data()
    x_t = path.add_noise(x0, eps, t)
    target = path.training_target(x0, eps, t)
    x0_hat, eps_hat = path.pred_to_x0_eps(target, x_t, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    torch.testing.assert_close(path.x0_to_pred(x0, x_t, t), target)
    torch.testing.assert_close(path.eps_to_pred(eps, x_t, t), target)
    a, s = path.alpha_sigma(t, like=x0)
    torch.testing.assert_close(path.score(target, x_t, t), -eps / s)


def test_flow_closed_forms():
    path = RectifiedFlow()
    x0, eps, t = _data()
    x0, eps, t = x0.float(), eps.float(), t.float()
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(path.add_noise(x0, eps, t), (1 - tb) * x0 + tb * eps)
    torch.testing.assert_close(path.training_target(x0, eps, t), eps - x0)
    v = eps - x0
    torch.testing.assert_close(path.pred_to_velocity(v, path.add_noise(x0, eps, t), t), v)


def test_vp_schedule_matches_discrete_ddpm():
    path = VPPath(dtype=torch.float64)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    idx = torch.tensor([0, 1, 250, 499, 998, 999])
    torch.testing.assert_close(path.abar(path.timestep_to_t(idx)), abar[idx])
    a, s = path.alpha_sigma(torch.rand(50, dtype=torch.float64))
    torch.testing.assert_close(a * a + s * s, torch.ones(50, dtype=torch.float64))
    # v = alpha eps - sigma x0 (docs/CONVENTIONS.md)
    vp = VPPath("v", dtype=torch.float64)
    x0, eps, t = _data()
    a, s = vp.alpha_sigma(t, like=x0)
    torch.testing.assert_close(vp.training_target(x0, eps, t), a * eps - s * x0)


@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
def test_vp_velocity_is_time_derivative(pred):
    path = VPPath(pred, dtype=torch.float64)
    x0, eps, _ = _data(3)
    t = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64) + 3e-4  # inside one log-SNR segment
    h = 1e-5
    fd = (path.add_noise(x0, eps, t + h) - path.add_noise(x0, eps, t - h)) / (2 * h)
    x_t = path.add_noise(x0, eps, t)
    v = path.pred_to_velocity(path.training_target(x0, eps, t), x_t, t)
    torch.testing.assert_close(v, fd, rtol=1e-5, atol=1e-6)


def test_end_points_stay_finite():
    path = RectifiedFlow("eps")
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([1.0, 0.0])
    assert torch.isfinite(path.pred_to_x0(x, x, t)).all()
    assert torch.isfinite(RectifiedFlow("x0").pred_to_eps(x, x, t)).all()
    assert torch.isfinite(RectifiedFlow().score(x, x, t)).all()


def test_dtypes():
    path = RectifiedFlow()
    x = torch.randn(2, 3, 4, 4)
    out = path.pred_to_x0(x.bfloat16(), x, torch.rand(2))
    assert out.dtype == torch.float32
    assert make_path("vp", dtype=torch.float64).pred_to_x0(x, x, torch.rand(2)).dtype == torch.float32
    assert make_path("vp", dtype=torch.float64).pred_to_x0(x.double(), x.double(), 0.5).dtype == torch.float64


def test_factory_errors():
    assert isinstance(make_path("rectified_flow"), RectifiedFlow)
    assert make_path("vp").prediction == "eps"
    with pytest.raises(UserError, match="unknown noise path"):
        make_path("edm")
    with pytest.raises(UserError, match="not supported"):
        make_path("flow", "v")
