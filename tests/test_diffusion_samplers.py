"""Samplers, CFG and timesteps against closed forms (Gaussian data has an exact denoiser)."""

import math

import pytest
import torch

from dmd_dar.diffusion.noise import make_noise
from dmd_dar.diffusion.paths import make_path
from dmd_dar.diffusion.samplers import (
    cfg,
    cfg_x0,
    check_guidance_interval,
    ddim_sample,
    euler_sample,
    few_step_sample,
    guided,
    heun_sample,
    network_x0_fn,
    sample_ode,
    student_timesteps,
    timestep_grid,
)
from dmd_dar.diffusion.timesteps import (
    dm_timestep_range,
    sample_dm_timesteps,
    sample_logit_normal,
    sample_timesteps,
    shift,
    unshift,
)
from dmd_dar.errors import UserError

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
STD = torch.tensor([0.5, 1.5], dtype=torch.float64)


def exact_denoiser(path, mu=MU, std=STD):
    """E[x0 | x_t] and E[eps | x_t] for x0 ~ N(mu, std^2) per dimension, returned as path predictions."""
    def fn(x_t, t):
        a, s = path.alpha_sigma(t, like=x_t)
        var = a * a * std * std + s * s
        r = x_t - a * mu
        return path.x0_eps_to_pred(mu + a * std * std / var * r, s / var * r, t)
    return fn


def exact_map(path, z):
    """The probability-flow ODE map from t=1 to data is affine per dimension for Gaussian data."""
    a, s = path.alpha_sigma(torch.ones(1, dtype=torch.float64))
    return MU + STD * (z - a * MU) / torch.sqrt(a * a * STD * STD + s * s)


@pytest.mark.parametrize("kind,pred,sampler", [("flow", "velocity", euler_sample), ("flow", "velocity", heun_sample),
                                               ("vp", "eps", ddim_sample), ("vp", "v", ddim_sample),
                                               ("flow", "velocity", ddim_sample)])
def test_ode_samplers_reach_gaussian_data(kind, pred, sampler):
    path = make_path(kind, pred, dtype=torch.float64)
    z = torch.randn(4000, 2, dtype=torch.float64)
    ref = exact_map(path, z)
    xs = {n: sampler(exact_denoiser(path), path, z, timestep_grid(n, dtype=torch.float64)) for n in (50, 100)}
    err = {n: (x - ref).abs() / STD for n, x in xs.items()}
    x = xs[100]
    assert err[100].mean() < 0.03 and err[100].max() < 0.15
    # at least first-order convergence to the exact ODE solution
    assert err[50].mean() / err[100].mean() > 1.7
    torch.testing.assert_close(x.mean(0), MU, atol=0.08, rtol=0)
    torch.testing.assert_close(x.var(0), STD ** 2, rtol=0.15, atol=0)


def test_heun_converges_faster_than_euler():
    path = make_path("flow", dtype=torch.float64)
    z = torch.randn(500, 2, dtype=torch.float64)
    ref = exact_map(path, z)
    err = {}
    for name, fn in [("euler", euler_sample), ("heun", heun_sample)]:
        for n in (10, 20):
            err[name, n] = (fn(exact_denoiser(path), path, z, timestep_grid(n, dtype=torch.float64)) - ref).abs().max()
    assert err["heun", 20] < err["euler", 20] / 10
    # first order halves the error when the steps double, second order quarters it
    assert 1.6 < err["euler", 10] / err["euler", 20] < 2.5
    assert err["heun", 10] / err["heun", 20] > 3.2


def test_sample_ode_dispatch_and_shift_grid():
    path = make_path("flow", dtype=torch.float64)
    z = torch.randn(100, 2, dtype=torch.float64)
    x = sample_ode("heun", exact_denoiser(path), path, z, 30, shift=3.0)
    assert (x - exact_map(path, z)).abs().max() < 0.01
    with pytest.raises(UserError, match="unknown sampler"):
        sample_ode("dpm", exact_denoiser(path), path, z, 4)
    g = timestep_grid(4, shift=3.0, dtype=torch.float64)
    torch.testing.assert_close(g, shift(torch.linspace(1, 0, 5, dtype=torch.float64), 3.0))


@pytest.mark.parametrize("kind,pred", [("flow", "velocity"), ("vp", "eps"), ("vp", "v"), ("vp", "x0")])
def test_cfg_forms_agree_in_x0_space(kind, pred):
    path = make_path(kind, pred, dtype=torch.float64)
    x_t = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    pc, pu = torch.randn_like(x_t), torch.randn_like(x_t)
    for s in (1.0, 2.5, 7.0):
        a = path.pred_to_x0(cfg(pc, pu, s), x_t, t)
        b = cfg_x0(path.pred_to_x0(pc, x_t, t), path.pred_to_x0(pu, x_t, t), s)
        torch.testing.assert_close(a, b)


def test_guided_batches_cond_and_uncond_in_one_forward():
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return x * 0 + y.view(-1, 1).to(x.dtype)  # prediction = label value

    x = torch.zeros(3, 2)
    y = torch.tensor([1, 2, 3])
    out = guided(model, 3.0, y, torch.tensor([10]))(x, torch.full((3,), 0.5))
    assert calls == [6]
    torch.testing.assert_close(out, (10 + 3 * (y - 10)).view(-1, 1).float().expand(3, 2))
    out1 = guided(model, 1.0, y, torch.tensor([10]))(x, 0.5)
    assert calls == [6, 3]
    torch.testing.assert_close(out1, y.view(-1, 1).float().expand(3, 2))


def test_guidance_interval_guides_inside_and_returns_the_conditional_prediction_outside():
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return x * 0 + y.view(-1, 1).to(x.dtype) + t.view(-1, 1).to(x.dtype)  # prediction = label + t

    x = torch.zeros(4, 2)
    y = torch.tensor([1, 2, 3, 4])
    t = torch.tensor([0.2, 0.35, 0.6, 0.9])  # 0.35 and 0.9: the closed interval's ends
    out = guided(model, 5.0, y, torch.tensor([10]), interval=[0.35, 0.9])(x, t)
    assert calls == [8]
    c = (y + t).view(-1, 1).expand(4, 2)
    u = (10 + t).view(-1, 1).expand(4, 2)
    want = torch.stack([c[0], u[1] + 5 * (c[1] - u[1]), u[2] + 5 * (c[2] - u[2]), u[3] + 5 * (c[3] - u[3])])
    torch.testing.assert_close(out, want)
    assert torch.equal(out[0], c[0])  # exactly the conditional prediction, not u + 1 * (c - u)
    # A step entirely outside the interval runs the conditional half only (a sampler's t is shared by the batch).
    out_lo = guided(model, 5.0, y, torch.tensor([10]), interval=[0.35, 0.9])(x, 0.1)
    assert calls == [8, 4]
    assert torch.equal(out_lo, (y + 0.1).view(-1, 1).expand(4, 2).float())
    # [0, 1] guides every step: the same as no interval.
    full = guided(model, 5.0, y, torch.tensor([10]), interval=[0.0, 1.0])(x, t)
    torch.testing.assert_close(full, guided(model, 5.0, y, torch.tensor([10]))(x, t))


def test_guidance_interval_sampling_is_guided_only_inside():
    """Euler with an interval equals Euler whose denoiser switches guidance by hand at the same times."""
    path = make_path("flow", "velocity", dtype=torch.float64)

    def model(x, t, y):
        return 0.3 * x + y.view(-1, 1).to(x.dtype) * (1 + t.view(-1, 1))

    y, null = torch.tensor([1, 2]), torch.tensor([0])
    z = torch.randn(2, 3, dtype=torch.float64)

    def by_hand(x, t):
        s = 4.0 if 0.3 <= float(t[0]) <= 0.7 else 1.0
        c, u = model(x, t, y), model(x, t, null.expand(2))
        return c if s == 1.0 else u + s * (c - u)

    ts = timestep_grid(10, dtype=torch.float64)
    a = euler_sample(guided(model, 4.0, y, null, interval=[0.3, 0.7]), path, z, ts)
    torch.testing.assert_close(a, euler_sample(by_hand, path, z, ts))
    assert not torch.allclose(a, euler_sample(guided(model, 4.0, y, null), path, z, ts))


@pytest.mark.parametrize("bad", [[0.5], [0.7, 0.3], [-0.1, 0.5], [0.2, 1.5], "x", [0.1, "a"]])
def test_guidance_interval_is_validated_with_the_key_named(bad):
    with pytest.raises(UserError, match="my.key"):
        check_guidance_interval(bad, "my.key")
    assert check_guidance_interval(None) is None
    assert check_guidance_interval([0, 1]) == (0.0, 1.0)


def test_student_timesteps():
    assert student_timesteps(1) == [1.0]
    assert student_timesteps(4) == [1.0, 0.75, 0.5, 0.25]
    shifted = student_timesteps(4, shift=3.0)
    assert shifted[0] == pytest.approx(1.0) and shifted[2] == pytest.approx(0.75)


def test_few_step_sample_renoises_to_each_student_time():
    path = make_path("vp", "eps", dtype=torch.float64)
    seen = []
    c = 0.7

    def x0_fn(x, t):
        seen.append((float(t[0]), x.clone()))
        return torch.full_like(x, c)

    z = torch.randn(4000, 1, dtype=torch.float64)
    out = few_step_sample(x0_fn, path, z, [1.0, 0.75, 0.5, 0.25], generator=torch.Generator().manual_seed(1))
    assert [t for t, _ in seen] == [1.0, 0.75, 0.5, 0.25]
    torch.testing.assert_close(out, torch.full_like(z, c))
    for t, x in seen[1:]:  # x_t = alpha c + sigma * fresh noise
        a, s = path.alpha_sigma(torch.tensor(t, dtype=torch.float64))
        assert abs(float(x.mean()) - float(a) * c) < 0.05
        assert abs(float(x.std()) - float(s)) < 0.05


def test_network_x0_fn_is_the_x0_of_the_networks_prediction_under_the_fixed_condition():
    path = make_path("flow", "velocity")  # x_t = (1 - t) x0 + t eps, v = eps - x0, so x0 = x_t - t v
    calls = []

    def net(x, t, cond):
        calls.append(cond)
        return (cond * torch.ones_like(x)).double()  # a float64 prediction for float32 inputs

    x0_fn = network_x0_fn(net, path, 2.0)
    x = torch.randn(3, 1, 2, 2)
    t = torch.tensor([0.25, 0.5, 1.0])
    out = x0_fn(x, t)
    assert calls == [2.0] and out.dtype == torch.float32
    torch.testing.assert_close(out, x - 2.0 * t.view(-1, 1, 1, 1))


def test_make_noise_draws_each_image_from_its_own_seed():
    seeds, shape = [3, 5, 7], (2, 4)
    z = make_noise(seeds, shape)
    assert z.shape == (3, *shape)
    for i, s in enumerate(seeds):
        assert torch.equal(z[i], torch.randn(shape, generator=torch.Generator().manual_seed(s)))
    assert torch.equal(make_noise([5], shape)[0], z[1])  # independent of the other images of the batch
    assert not torch.equal(z[0], z[1])


def test_shift_inverse_and_endpoints():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0, 7.5):
        torch.testing.assert_close(unshift(shift(t, s), s), t)
        torch.testing.assert_close(shift(unshift(t, s), s), t)
    assert float(shift(0.5, 3.0)) == pytest.approx(0.75)
    with pytest.raises(UserError):
        shift(t, 0.0)


def test_logit_normal_median_and_logit_mean():
    g = torch.Generator().manual_seed(0)
    t = sample_logit_normal(20000, mean=0.5, std=1.2, generator=g)
    logit = torch.log(t) - torch.log1p(-t)
    assert abs(float(logit.mean()) - 0.5) < 0.03
    assert abs(float(logit.std()) - 1.2) < 0.03
    assert abs(float(t.median()) - 1 / (1 + math.exp(-0.5))) < 0.01


def test_timestep_samplers_ranges():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(1000, "uniform", t_min=0.1, t_max=0.3, generator=g)
    assert t.min() >= 0.1 and t.max() <= 0.3
    with pytest.raises(UserError, match="unknown timestep sampler"):
        sample_timesteps(4, "cosine")
    lo, hi = dm_timestep_range(0.02, 0.98, 3.0)
    assert lo == pytest.approx(float(shift(0.02, 3.0))) and hi == pytest.approx(float(shift(0.98, 3.0)))
    t = sample_dm_timesteps(2000, shift_s=3.0, generator=g)
    assert lo <= float(t.min()) and float(t.max()) <= hi
    assert abs(float(unshift(t, 3.0).mean()) - 0.5) < 0.02  # uniform before the shift
    with pytest.raises(UserError):
        dm_timestep_range(0.9, 0.1)


@pytest.mark.parametrize("kind,pred", [("flow", "velocity"), ("vp", "eps"), ("vp", "v"), ("vp", "x0")])
def test_score_of_exact_denoiser_is_gaussian_score(kind, pred):
    path = make_path(kind, pred, dtype=torch.float64)
    x_t = torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    a, s = path.alpha_sigma(t, like=x_t)
    expected = -(x_t - a * MU) / (a * a * STD * STD + s * s)  # grad log N(x_t; a mu, a^2 std^2 + s^2)
    torch.testing.assert_close(path.score(exact_denoiser(path)(x_t, t), x_t, t), expected)
