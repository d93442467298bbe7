"""DMD2 losses and the teacher interface against closed forms."""

import pytest
import torch

from dmd_dar.diffusion.paths import make_path
from dmd_dar.diffusion.samplers import cfg as cfg_pred
from dmd_dar.distill.denoiser import Denoiser, class_null_cond
from dmd_dar.distill.losses import (
    distribution_matching_loss,
    dm_gradient,
    gan_discriminator_loss,
    gan_generator_loss,
)
from dmd_dar.errors import UserError


def test_dm_loss_gradient_is_g_over_n_in_sign_and_scale():
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    x0_real = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    x0_fake = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    distribution_matching_loss(x, x0_real, x0_fake).backward()
    w = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)  # per-sample normaliser
    expected = (x0_fake - x0_real) / w / x.numel()
    torch.testing.assert_close(x.grad, expected)
    # A descent step moves x from the fake prediction towards the real one.
    assert ((x.grad * (x0_real - x0_fake)).sum() < 0)


def test_dm_loss_gradient_vanishes_when_fake_equals_real():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    x0 = torch.randn(2, 3, 4, 4)
    loss = distribution_matching_loss(x, x0, x0.clone())
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().max().item() == 0.0


def test_dm_gradient_is_finite_when_normaliser_is_zero():
    x = torch.zeros(2, 1, 2, 2)
    g = dm_gradient(x, torch.zeros_like(x), torch.ones_like(x))  # |x - x0_real| = 0 -> 1/0
    assert torch.isfinite(g).all() and g.abs().max() == 0


def test_gan_losses_closed_form():
    z = torch.tensor([0.0, 0.0])
    assert gan_generator_loss(z).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert gan_discriminator_loss(z, z).item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item())
    # a perfect discriminator has ~zero loss
    assert gan_discriminator_loss(torch.full((4,), -30.0), torch.full((4,), 30.0)).item() < 1e-9


class _Oracle(torch.nn.Module):
    """Returns the exact prediction of a known (x0, eps) pair in a given parameterisation."""

    def __init__(self, path, x0, eps):
        super().__init__()
        self.path, self.x0, self.eps = path, x0, eps

    def forward(self, x_t, t, cond):
        return self.path.x0_eps_to_pred(self.x0, self.eps, t)


@pytest.mark.parametrize("kind, prediction", [("flow", "velocity"), ("flow", "x0"), ("vp", "eps"), ("vp", "v"),
                                              ("vp", "x0")])
def test_denoiser_x0_for_every_parameterisation(kind, prediction):
    path = make_path(kind, prediction, dtype=torch.float64)
    x0, eps = torch.randn(4, 3, 4, 4, dtype=torch.float64), torch.randn(4, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    x_t = path.add_noise(x0, eps, t)
    den = Denoiser(_Oracle(path, x0, eps), path)
    torch.testing.assert_close(den.x0(x_t, t, None), x0)


class _LinearCond(torch.nn.Module):
    """A toy class-conditional network whose prediction depends on the label."""

    def forward(self, x_t, t, y):
        return 0.5 * x_t + y.float().view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("kind, prediction", [("flow", "velocity"), ("vp", "eps"), ("vp", "v")])
def test_cfg_in_x0_space_equals_cfg_in_prediction_space(kind, prediction):
    path = make_path(kind, prediction, dtype=torch.float64)
    net = _LinearCond()
    den = Denoiser(net, path, null_cond=class_null_cond(10))
    x_t = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    y = torch.tensor([1, 2, 3])
    scale = 3.5
    pred = cfg_pred(net(x_t, t, y), net(x_t, t, torch.full_like(y, 10)), scale)
    torch.testing.assert_close(den.x0(x_t, t, y, guidance=scale), path.pred_to_x0(pred, x_t, t))


def test_guidance_interval_guides_only_the_samples_inside_it():
    """DMD's real score with ``method.guidance_interval``: per-sample, since every sample has its own t."""
    path = make_path("flow", "velocity", dtype=torch.float64)
    den = Denoiser(_LinearCond(), path, null_cond=class_null_cond(10))
    x_t = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.6, 0.95], dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4])
    plain, full = den.x0(x_t, t, y), den.x0(x_t, t, y, guidance=3.0)
    mixed = den.x0(x_t, t, y, guidance=3.0, interval=[0.3, 0.7])
    torch.testing.assert_close(mixed[1:3], full[1:3])
    assert torch.equal(mixed[[0, 3]], plain[[0, 3]])
    assert not torch.allclose(mixed[[0, 3]], full[[0, 3]])


def test_dmd_real_score_uses_method_guidance_interval():
    """The generator loss with an interval that no DM timestep reaches equals the unguided loss; [0, 1] equals
    guidance everywhere (the real score is the only guided network)."""
    from dmd_dar.distill.config import MethodConfig
    from dmd_dar.distill.method import DMD2

    path = make_path("flow", "velocity", dtype=torch.float64)
    teacher = Denoiser(_LinearCond(), path, null_cond=class_null_cond(10))
    fake = Denoiser(torch.nn.Identity(), path)
    fake.pred = lambda x_t, t, cond: 0.9 * x_t  # noqa: E731 (an unconditional stand-in)
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4, 5, 6])

    def loss(**method):
        m = DMD2(MethodConfig(t_min=0.1, t_max=0.8, **method), teacher, fake, teacher, student_times=[1.0])
        return m.generator_loss(x, y, torch.Generator().manual_seed(3))[0].item()

    assert loss(guidance_scale=3.0, guidance_interval=[0.9, 1.0]) == loss(guidance_scale=1.0)
    assert loss(guidance_scale=3.0, guidance_interval=[0.0, 1.0]) == loss(guidance_scale=3.0)
    assert loss(guidance_scale=3.0) != loss(guidance_scale=1.0)


def test_teacher_without_parameterisation_is_rejected():
    with pytest.raises(UserError, match="no declared parameterisation"):
        Denoiser(_LinearCond(), None)


class _ExactPrediction(torch.nn.Module):
    """The exact score network of data that is one known ``x0``: its x0-predictor is the constant ``x0``, so
    the velocity / eps it predicts follows from (x_t, t) in closed form (``path.x0_to_pred``); ``offset``
    perturbs it."""

    def __init__(self, path, x0: torch.Tensor, offset: float = 0.0) -> None:
        super().__init__()
        self.path, self.x0, self.offset = path, x0, offset

    def forward(self, x_t, t, cond=None):
        return self.path.x0_to_pred(self.x0.expand_as(x_t), x_t, t) + self.offset


@pytest.mark.parametrize("kind, prediction", [("flow", "velocity"), ("vp", "eps")])
def test_fake_score_loss_vanishes_for_the_exact_score_of_a_known_x0(kind, prediction):
    """The critic's denoising loss regresses the teacher parameterisation's target (velocity, eps), not x0:
    for a generator whose samples all equal one x0 and a fake score predicting exactly that x0's velocity /
    eps, it is 0 up to round-off; a fake score off by a constant c costs exactly c^2."""
    from dmd_dar.distill.config import MethodConfig
    from dmd_dar.distill.method import DMD2, Batch, MicroBatch

    path = make_path(kind, prediction, dtype=torch.float64)
    x0 = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = Denoiser(_ExactPrediction(path, x0), path)
    cfg = MethodConfig(fake_t_min=0.01)  # flow: an x0's velocity is ill-posed at t -> 0 (sigma is clamped)
    method = DMD2(cfg, exact, exact, exact, student_times=[1.0])
    noise = torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    micro = MicroBatch(Batch(noise, None), torch.Generator().manual_seed(2), torch.Generator().manual_seed(3))
    loss, logs = method.critic_step(micro)  # no generator step before it: the step draws the student's sample
    torch.testing.assert_close(micro.sample, x0.expand(8, -1, -1, -1), atol=1e-12, rtol=0)
    assert loss.item() < 1e-10 and logs["critic/fake_loss"] == loss.item()
    shifted = Denoiser(_ExactPrediction(path, x0, offset=1e-3), path)
    off = DMD2(cfg, exact, shifted, exact, student_times=[1.0])
    loss_off, _ = off.critic_loss(micro.sample, None, torch.Generator().manual_seed(2))
    assert loss_off.item() == pytest.approx(1e-6, rel=1e-3)
