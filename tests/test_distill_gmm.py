"""End-to-end DMD2 on a 2-D Gaussian mixture whose exact score is known in closed form.

The teacher is the exact x0-predictor E[x0 | x_t] of the mixture under rectified flow; the one-step generator and
the fake score are small MLPs. After distillation the generator's samples must reproduce the mixture's mode
weights and means.
"""

import torch
from torch import nn

from dmd_dar.diffusion.objective import denoising_loss
from dmd_dar.diffusion.paths import make_path
from dmd_dar.distill.config import MethodConfig
from dmd_dar.distill.denoiser import Denoiser
from dmd_dar.distill.method import DMD2

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
WEIGHTS = torch.tensor([0.3, 0.7])
STD = 0.3


class ExactMixtureX0(nn.Module):
    """E[x0 | x_t] for x0 ~ sum_k w_k N(mu_k, s^2 I) and x_t = (1 - t) x0 + t eps (closed form)."""

    def forward(self, x_t, t, cond=None):
        t = t.view(-1, 1)
        a, s2 = 1 - t, STD**2
        var = a**2 * s2 + t**2  # [B, 1]: variance of x_t given the component
        diff = x_t[:, None, :] - a[:, None, :] * MEANS[None]  # [B, K, 2]
        logp = torch.log(WEIGHTS)[None] - 0.5 * (diff**2).sum(-1) / var - torch.log(var)  # [B, K]
        r = logp.softmax(-1)  # posterior responsibilities
        post_mean = MEANS[None] + (a * s2 / var)[:, None, :] * diff  # [B, K, 2]
        return (r[..., None] * post_mean).sum(1)


class MLP(nn.Module):
    def __init__(self, with_time: bool):
        super().__init__()
        self.with_time = with_time
        self.net = nn.Sequential(nn.Linear(3 if with_time else 2, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                 nn.Linear(128, 2))

    def forward(self, x_t, t, cond=None):
        inp = torch.cat([x_t, t.view(-1, 1)], 1) if self.with_time else x_t
        return self.net(inp)


def test_one_step_dmd_matches_mixture_modes_and_means():
    torch.manual_seed(0)
    path = make_path("flow", "x0")
    teacher = Denoiser(ExactMixtureX0(), path)
    generator = Denoiser(MLP(with_time=False), path)
    fake = Denoiser(MLP(with_time=True), path)
    method = DMD2(MethodConfig(guidance_scale=1.0, ttur=1), generator, fake, teacher, student_times=[1.0])
    g_opt = torch.optim.Adam(generator.net.parameters(), lr=1e-3)
    f_opt = torch.optim.Adam(fake.net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    batch = 256

    def critic_update(x):
        loss, _ = method.critic_loss(x, None, gen)
        f_opt.zero_grad()
        loss.backward()
        f_opt.step()

    # The fake score starts untrained (no teacher copy here): fit it to the initial generator first.
    for _ in range(200):
        with torch.no_grad():
            x = method.generate(torch.randn(batch, 2, generator=gen), torch.ones(batch), None)
        critic_update(x)
    for _ in range(1200):
        z = torch.randn(batch, 2, generator=gen)
        x = method.generate(z, torch.ones(batch), None)
        loss, _, _ = method.generator_loss(x, None, gen)
        g_opt.zero_grad()
        loss.backward()
        g_opt.step()
        for _ in range(2):
            critic_update(x.detach())

    with torch.no_grad():
        x = method.generate(torch.randn(8000, 2, generator=gen), torch.ones(8000), None)
    right = x[:, 0] > 0
    assert abs(right.float().mean().item() - WEIGHTS[1].item()) < 0.08
    torch.testing.assert_close(x[right].mean(0), MEANS[1], atol=0.25, rtol=0)
    torch.testing.assert_close(x[~right].mean(0), MEANS[0], atol=0.25, rtol=0)
    assert 0.15 < x[right, 1].std().item() < 0.6  # not collapsed to a point


def test_exact_teacher_is_the_posterior_mean():
    """Sanity of the closed form: at t -> 0 it returns x_t itself; at t = 1 it returns the mixture mean."""
    m = ExactMixtureX0()
    x = torch.randn(5, 2)
    torch.testing.assert_close(m(x, torch.full((5,), 1e-6)), x, atol=1e-4, rtol=0)
    torch.testing.assert_close(m(x, torch.ones(5)), (WEIGHTS[:, None] * MEANS).sum(0).expand(5, 2), atol=1e-5,
                               rtol=0)


def test_fake_denoising_loss_is_minimised_by_the_exact_posterior_mean():
    """The critic objective's minimiser is E[x0|x_t]: the exact teacher beats a perturbed one on mixture data."""
    path = make_path("flow", "x0")
    gen = torch.Generator().manual_seed(1)
    comp = (torch.rand(20000, generator=gen) < WEIGHTS[1]).long()
    x0 = MEANS[comp] + STD * torch.randn(20000, 2, generator=gen)
    eps, t = torch.randn(20000, 2, generator=gen), torch.rand(20000, generator=gen)
    exact = ExactMixtureX0()
    loss_exact = denoising_loss(lambda x, tt: exact(x, tt), path, x0, eps, t)
    loss_off = denoising_loss(lambda x, tt: exact(x, tt) + 0.1, path, x0, eps, t)
    assert loss_exact < loss_off
