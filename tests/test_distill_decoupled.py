"""Decoupled DMD (method.objective=decoupled) and the random few-step schedule against closed forms."""

import contextlib

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dmd_dar.cli import main
from dmd_dar.diffusion.paths import make_path
from dmd_dar.diffusion.samplers import student_timesteps
from dmd_dar.diffusion.timesteps import (
    random_student_schedule,
    sample_capped_timesteps,
    shift,
    unshift,
)
from dmd_dar.distill.config import MethodConfig
from dmd_dar.distill.denoiser import Denoiser, class_null_cond
from dmd_dar.distill.health import VarianceDriftCheck, output_drift
from dmd_dar.distill.losses import image_moments, meanvar_kl, normalized_update, proxy_loss
from dmd_dar.distill.method import DMD2, DecoupledDMD
from dmd_dar.errors import UserError

PARAMETERISATIONS = [("flow", "velocity"), ("flow", "x0"), ("vp", "eps"), ("vp", "v"), ("vp", "x0")]


class _ClassNet(nn.Module):
    """A toy class-conditional network (label 3 = null) whose prediction depends on x_t, t and the label."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, x_t, t, y):
        return self.gain * torch.tanh(x_t) + 0.3 * y.to(x_t).view(-1, 1, 1, 1) - 0.2 * t.view(-1, 1, 1, 1)


def _method(cls, path, **cfg):
    null = class_null_cond(3)
    teacher = Denoiser(_ClassNet(0.7), path, null)
    fake = Denoiser(_ClassNet(0.4), path, null)
    generator = Denoiser(_ClassNet(1.0), path, null)
    return cls(MethodConfig(**cfg), generator, fake, teacher, student_times=[1.0])


@pytest.mark.parametrize("kind, prediction", PARAMETERISATIONS)
def test_decoupled_terms_at_the_same_tau_and_noise_sum_to_the_coupled_update(kind, prediction):
    """DMD2's g before normalisation, x0_fake - x0_cfg at (t, eps), is exactly CA + DM at the same (t, eps)."""
    path = make_path(kind, prediction, dtype=torch.float64)
    coupled = _method(DMD2, path, guidance_scale=3.5)
    decoupled = _method(DecoupledDMD, path, objective="decoupled", guidance_scale=3.5)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    # DMD2 draws (t, eps) from the stream; replay the same draws for both decoupled terms.
    _, _, debug = coupled.generator_loss(x, y, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    t = coupled.dm_timesteps(4, replay).to(torch.float64)
    eps = torch.randn(x.shape, generator=replay).to(x)
    torch.testing.assert_close(t, debug["t"].to(torch.float64))
    terms = decoupled.terms(x, y, t, eps, t, eps)
    coupled_update = debug["fake_x0"] - debug["real_x0"]
    torch.testing.assert_close(terms["ca"] + terms["dm"], coupled_update, rtol=1e-12, atol=1e-12)
    assert terms["ca"].abs().max() > 1e-3 and terms["dm"].abs().max() > 1e-3  # both terms are really there


def test_ca_term_is_zero_outside_the_guidance_interval():
    path = make_path("flow", "velocity", dtype=torch.float64)
    method = _method(DecoupledDMD, path, objective="decoupled", guidance_scale=3.0, guidance_interval=[0.5, 1.0])
    x, y = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1])
    t, eps = torch.tensor([0.2, 0.8], dtype=torch.float64), torch.randn(2, 1, 2, 2, dtype=torch.float64)
    ca = method.terms(x, y, t, eps, None, None)["ca"]
    assert ca[0].abs().max() == 0 and ca[1].abs().max() > 0


@pytest.mark.parametrize("s", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4])
def test_ca_times_never_exceed_the_student_time(s, steps):
    path = make_path("flow", "velocity")
    method = _method(DecoupledDMD, path, objective="decoupled")
    method.shift = s
    times = student_timesteps(steps, shift=s)
    t_student = torch.tensor(times).repeat(2000)
    tau = method.ca_timesteps(t_student, torch.Generator().manual_seed(0))
    assert (tau <= t_student).all() and (tau >= shift(0.02, s).item() - 1e-6).all()
    for t_k in times:  # each student time's taus reach up to it (the cap binds, not t_max)
        below = tau[t_student == t_k]
        assert below.max() > min(t_k, shift(0.98, s).item()) - 0.05


def test_uncapped_ca_times_span_the_whole_range():
    method = _method(DecoupledDMD, make_path("flow", "velocity"), objective="decoupled", ca_timesteps="full")
    t_student = torch.full((4000,), 0.25)
    tau = method.ca_timesteps(t_student, torch.Generator().manual_seed(0))
    assert (tau > 0.9).any() and (tau < 0.1).any() and (tau >= 0.02).all() and (tau <= 0.98).all()


def test_capped_ca_times_follow_the_shifted_distribution():
    """CDF of tau = shift(u), u ~ U[lo, unshift(cap)]: P(tau <= v) = (unshift(v) - lo) / (unshift(cap) - lo)."""
    s, cap, lo = 3.0, 0.6, 0.02
    n = 200_000
    tau = sample_capped_timesteps(torch.full((n,), cap), lo, 0.98, s, torch.Generator().manual_seed(1))
    hi = float(unshift(cap, s))
    for v in (0.1, 0.2, 0.35, 0.5, 0.59):
        expected = (float(unshift(v, s)) - lo) / (hi - lo)
        assert abs((tau <= v).double().mean().item() - expected) < 0.005, v
    assert tau.max() <= cap


def test_normaliser_floor_keeps_the_update_finite_where_x_equals_the_teacher():
    x = torch.randn(2, 3, 4, 4)
    direction = torch.ones_like(x)
    floored = normalized_update(direction, x, x.clone(), floor=1e-3)
    assert torch.isfinite(floored).all()
    torch.testing.assert_close(floored, direction / 1e-3)  # the weight is exactly 1 / floor
    unfloored = normalized_update(direction, x, x.clone(), floor=0.0)
    assert torch.isfinite(unfloored).all() and unfloored.abs().max() == 0  # nan_to_num: 1/0 -> 0
    # Away from the floor it is DMD2's weight 1 / mean|x - x0|.
    x0 = x + 0.5
    torch.testing.assert_close(normalized_update(direction, x, x0, floor=1e-3), direction / 0.5)


def test_proxy_loss_gradient_is_the_update_over_n():
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    update = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    proxy_loss(x, update).backward()
    torch.testing.assert_close(x.grad, update / x.numel())


def test_meanvar_kl_gradient_matches_its_closed_form():
    """KL(N(m, v) || N(mu, s)) per image and channel, averaged over B*C; with N pixels per channel,
    dKL/dx_i = [(m - mu) / s + (1/s - 1/v)(x_i - m)] / (N B C)."""
    b, c, h, w = 3, 2, 4, 5
    x = (torch.randn(b, c, h, w, dtype=torch.float64) * 0.7 + 0.2).requires_grad_(True)
    mu, s = torch.tensor([0.1, -0.3], dtype=torch.float64), torch.tensor([0.5, 1.5], dtype=torch.float64)
    kl = meanvar_kl(x, mu, s)
    kl.backward()
    xd = x.detach()
    m = xd.mean(dim=(2, 3), keepdim=True)
    v = xd.var(dim=(2, 3), unbiased=False, keepdim=True)
    mu4, s4 = mu.view(1, -1, 1, 1), s.view(1, -1, 1, 1)
    n = h * w
    expected = ((m - mu4) / s4 + (1 / s4 - 1 / v) * (xd - m)) / (n * b * c)
    torch.testing.assert_close(x.grad, expected)
    closed = (0.5 * (torch.log(s4 / v) + (v + (m - mu4) ** 2) / s4 - 1)).mean()
    torch.testing.assert_close(kl.detach(), closed)
    # zero exactly at the target statistics
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    zm, zv = z.mean(dim=(2, 3)), z.var(dim=(2, 3), unbiased=False)
    assert meanvar_kl(z, zm[0], zv[0]).item() >= 0
    one = z[:1]
    assert abs(meanvar_kl(one, one.mean(dim=(0, 2, 3)), one.var(dim=(2, 3), unbiased=False)[0]).item()) < 1e-12


def test_meanvar_regulariser_needs_no_fake_score_and_gets_the_kl_gradient():
    path = make_path("flow", "x0", dtype=torch.float64)
    null = class_null_cond(3)
    teacher, generator = Denoiser(_ClassNet(0.7), path, null), Denoiser(_ClassNet(1.0), path, null)
    target = (torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    cfg = MethodConfig(objective="decoupled", regularizer="meanvar", ca_weight=0.0, meanvar_weight=2.0)
    method = DecoupledDMD(cfg, generator, None, teacher, [1.0], meanvar_target=target)
    assert not method.has_critic
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    loss, logs, _ = method.generator_loss(x, torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    loss.backward()
    xk = x.detach().clone().requires_grad_(True)
    (2.0 * meanvar_kl(xk, *target)).backward()
    torch.testing.assert_close(x.grad, xk.grad)  # CA off: the generator's gradient is the KL's alone
    assert "gen/meanvar_kl" in logs and "gen/dm_norm" not in logs


def test_bad_decoupled_input_names_the_key():
    path = make_path("flow", "velocity")
    score = Denoiser(_ClassNet(1.0), path, class_null_cond(3))
    unconditional = Denoiser(_ClassNet(1.0), path, None)
    cfg = MethodConfig(objective="decoupled")
    with pytest.raises(UserError, match="method.ca_weight=0"):
        DecoupledDMD(cfg, score, score, unconditional, [1.0])
    with pytest.raises(UserError, match="method.ca_t_min"):  # 4 steps: the last student time is 0.25 <= 0.3
        DecoupledDMD(MethodConfig(objective="decoupled", ca_t_min=0.3), score, score, score,
                     student_timesteps(4))
    with pytest.raises(UserError, match="method.meanvar_target"):
        DecoupledDMD(MethodConfig(objective="decoupled", regularizer="meanvar"), score, None, score, [1.0])
    with pytest.raises(UserError, match="method.k_min=5, method.k_max=4"):
        MethodConfig(schedule="random", k_min=5)
    with pytest.raises(UserError, match="method.objective=decoupled"):
        MethodConfig(regularizer="meanvar")
    with pytest.raises(UserError, match="method.gan_weight"):
        MethodConfig(objective="decoupled", regularizer="gan")
    with pytest.warns(UserWarning, match="engine only"):
        DecoupledDMD(MethodConfig(objective="decoupled", dm_weight=0.0), score, score, score, [1.0])


def test_random_schedules_start_at_one_decrease_and_agree_across_processes():
    counts = set()
    for step in range(200):
        # every process seeds its shared stream alike (trainer: derive_seed(seed, "shared", step))
        a = random_student_schedule(1, 4, 0.25, 0.95, 3.0, torch.Generator().manual_seed(step))
        b = random_student_schedule(1, 4, 0.25, 0.95, 3.0, torch.Generator().manual_seed(step))
        assert a == b and a[0] == 1.0
        assert all(hi > lo for hi, lo in zip(a, a[1:]))
        assert all(shift(0.25, 3.0).item() - 1e-9 <= t <= shift(0.95, 3.0).item() + 1e-9 for t in a[1:])
        counts.add(len(a))
    assert counts == {1, 2, 3, 4}


def test_the_method_rolls_out_along_the_random_schedule():
    """generator_input's t_k is one of the schedule's times; the schedule is drawn from the shared stream, so
    two processes with different private streams get the same t_k."""
    path = make_path("flow", "velocity")
    method = _method(DecoupledDMD, path, objective="decoupled", schedule="random", k_min=2, k_max=4)
    noise, y = torch.randn(2, 1, 3, 3), torch.tensor([0, 1])
    for step in range(20):
        t_ks = []
        for rank in range(2):
            shared = torch.Generator().manual_seed(step)
            times = method.student_schedule(torch.Generator().manual_seed(step))
            _, t_k = method.generator_input(noise, y, torch.Generator().manual_seed(100 + rank), shared)
            assert min(abs(float(t_k[0]) - t) for t in times) < 1e-6  # t_k is float32
            t_ks.append(float(t_k[0]))
        assert t_ks[0] == t_ks[1]


# -- a class-conditional Gaussian teacher with an exact score and CFG ---------------------------------------------
# Two classes of 4x4 images, x0 ~ N(+-a P, s^2 I) with P a +-1 checkerboard; label 2 is the null condition (the
# 50/50 mixture). The generator is itself Gaussian, x = m_c + sigma * z, so the fake score can be its exact
# posterior mean: the test isolates the objective from critic fitting.
AMP, STD = 0.5, 0.2
CHECKER = torch.tensor([[1.0, -1, 1, -1], [-1, 1, -1, 1]] * 2).view(1, 4, 4)
CLASS_MEANS = torch.stack([AMP * CHECKER, -AMP * CHECKER])  # [2, 1, 4, 4]


def _gaussian_x0(x_t, t, mu, var0):
    """E[x0 | x_t] for x0 ~ N(mu, var0) under x_t = (1 - t) x0 + t eps."""
    a, t4 = (1 - t).view(-1, 1, 1, 1), t.view(-1, 1, 1, 1)
    return mu + (a * var0 / (a**2 * var0 + t4**2)) * (x_t - a * mu)


class _ExactClassTeacher(nn.Module):
    def forward(self, x_t, t, y):
        cond = _gaussian_x0(x_t, t, CLASS_MEANS[y.clamp(max=1)], STD**2)
        a, t4 = (1 - t).view(-1, 1), t.view(-1, 1)
        var = a**2 * STD**2 + t4**2
        flat = x_t.flatten(1)
        logp = torch.stack([-0.5 * ((flat - a * CLASS_MEANS[k].flatten()) ** 2).sum(1) / var[:, 0]
                            for k in range(2)], 1)
        posts = torch.stack([_gaussian_x0(x_t, t, CLASS_MEANS[k], STD**2) for k in range(2)], 1)
        uncond = (logp.softmax(1).view(-1, 2, 1, 1, 1) * posts).sum(1)
        return torch.where((y < 2).view(-1, 1, 1, 1), cond, uncond)


class _GaussianGenerator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.m = nn.Parameter(CLASS_MEANS.clone())  # starts at the teacher's distribution
        self.log_std = nn.Parameter(torch.full((1, 4, 4), float(torch.log(torch.tensor(STD)))))

    def forward(self, z, t, y):
        return self.m[y] + self.log_std.exp() * z


class _ExactFake(nn.Module):
    """The generator's own E[x0 | x_t, c] (a perfect fake score)."""

    def __init__(self, generator: _GaussianGenerator) -> None:
        super().__init__()
        self.generator = [generator]  # not a submodule: the fake score has no parameters of its own

    @torch.no_grad()
    def forward(self, x_t, t, y):
        g = self.generator[0]
        return _gaussian_x0(x_t, t, g.m[y], g.log_std.exp() ** 2)


def _variance_trajectory(dm_weight: float, iters: int = 250, every: int = 50) -> list[float]:
    path, null = make_path("flow", "x0"), class_null_cond(2)
    net = _GaussianGenerator()
    cfg = MethodConfig(objective="decoupled", guidance_scale=4.0, dm_weight=dm_weight)
    with pytest.warns(UserWarning) if dm_weight == 0 else contextlib.nullcontext():
        method = DecoupledDMD(cfg, Denoiser(net, path, null), Denoiser(_ExactFake(net), path, null),
                              Denoiser(_ExactClassTeacher(), path, null), [1.0])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    out = []
    for it in range(iters + 1):
        y = torch.randint(2, (64,), generator=gen)
        x = net(torch.randn(64, 1, 4, 4, generator=gen), None, y)
        if it % every == 0:
            out.append(image_moments(x.detach())[1].mean().item())
        loss, _, _ = method.generator_loss(x, y, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


def test_ca_alone_drives_the_variance_up_and_dm_bounds_it():
    """The anchors' failure signature on an exact teacher: CA alone (dm_weight 0) increases the generator's
    per-image variance at every checkpoint, far beyond the teacher's (a^2 + s^2 = 0.29); with DM it settles."""
    teacher_var = AMP**2 + STD**2
    alone = _variance_trajectory(dm_weight=0.0)
    assert all(b > a + 0.2 for a, b in zip(alone, alone[1:])), alone
    assert alone[-1] > 7 * teacher_var, alone
    both = _variance_trajectory(dm_weight=1.0)
    assert max(both) < 3.5 * teacher_var, both
    assert abs(both[-1] - both[-3]) < 0.1, both  # settled, not growing
    assert both[-1] < alone[-1] / 2.5


def test_flux_style_embedded_guidance_refuses_ca_and_matches_at_its_guidance():
    """A guidance-distilled teacher (one pass, guidance as an input) has no x0_u: CA is refused with the fix;
    with ca_weight 0 its DM term reads the teacher at guidance_scale, as DMD2's real score does."""
    from dmd_dar.t2i.task import EmbeddedGuidanceDenoiser  # lazy: diffusers, seconds to import

    class GuidanceNet(nn.Module):  # student and fake score: a fixed guidance input of their own (as T2INet)
        def forward(self, x_t, t, cond):
            g = cond.get("guidance", torch.full((x_t.shape[0],), 2.0, dtype=x_t.dtype))
            return 0.5 * x_t + g.view(-1, 1, 1, 1) * cond["text"]

    path = make_path("flow", "velocity", dtype=torch.float64)
    teacher = EmbeddedGuidanceDenoiser(GuidanceNet(), path, None)
    student = Denoiser(GuidanceNet(), path, None)
    with pytest.raises(UserError, match="method.ca_weight=0"):
        DecoupledDMD(MethodConfig(objective="decoupled", guidance_scale=3.5), student, student, teacher, [1.0])
    cfg = MethodConfig(objective="decoupled", guidance_scale=3.5, ca_weight=0.0)
    method = DecoupledDMD(cfg, student, student, teacher, [1.0])
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    cond = {"text": torch.randn(2, 1, 2, 2, dtype=torch.float64)}
    t, eps = torch.tensor([0.3, 0.7], dtype=torch.float64), torch.randn(2, 1, 2, 2, dtype=torch.float64)
    terms = method.terms(x, cond, None, None, t, eps)
    x_t = path.add_noise(x, eps, t)
    torch.testing.assert_close(terms["dm_x0_c"], teacher.x0(x_t, t, cond, guidance=3.5))
    assert "ca" not in terms


@pytest.mark.parametrize("family", ["sd35_medium", "qwen_image", "pixart_sigma", "flux_dev"])
def test_each_t2i_family_has_a_decoupled_layer(family, capsys):
    assert main(["distill", "--dry-run", "-c", f"t2i/{family}.yaml", "-c", f"t2i/{family}_decoupled.yaml"]) == 0
    out = capsys.readouterr().out
    assert "objective: decoupled" in out and f"runs/t2i/{family}_decoupled" in out
    assert ("ca_weight: 0.0" in out) == (family == "flux_dev")  # embedded guidance: no CA


def test_embedded_decoupled_layers_change_only_the_objective_and_the_steps(capsys):
    """The comparison is fair: the decoupled layer changes method.objective (and CA's own keys), the 4-step layer
    the student steps; every other key is the main job's."""
    def resolved(*layers):
        args = [a for layer in layers for a in ("-c", layer)]
        assert main(["distill", "--dry-run", *args]) == 0
        cfg = OmegaConf.to_container(OmegaConf.create(capsys.readouterr().out))
        cfg["run"].pop("out_dir")
        return cfg

    main_job = resolved()
    one = resolved("distill_embedded_decoupled.yaml")
    four = resolved("distill_embedded_decoupled.yaml", "distill_embedded_decoupled_4step.yaml")
    changed = {k for k in one["method"] if one["method"][k] != main_job["method"][k]}
    assert changed == {"objective", "ca_guidance_scale"}  # its other CA keys equal the library defaults
    assert one["method"]["ca_guidance_scale"] == main_job["method"]["guidance_scale"]  # written out, same value
    assert {k: v for k, v in one.items() if k != "method"} == {k: v for k, v in main_job.items() if k != "method"}
    assert {k for k in four["method"] if four["method"][k] != one["method"][k]} == {"student_steps"}


def test_variance_drift_is_logged_and_flagged_beyond_the_factor():
    ref_var = torch.tensor([0.25])
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5  # per-image var ~ 0.25
    logs = output_drift(x, torch.zeros(1), torch.full((1,), 0.5), ref_var)
    assert abs(logs["drift/image_var_ratio"] - 1.0) < 0.1 and logs["drift/image_mean_abs"] < 0.05
    warnings = []
    check = VarianceDriftCheck(2.0)
    assert check(logs, warnings.append)["health/variance_drift"] == 0.0
    hot = output_drift(3 * x, torch.zeros(1), torch.full((1,), 0.5), ref_var)  # variance x 9
    assert hot["drift/image_var_ratio"] > 8
    assert check(hot, warnings.append)["health/variance_drift"] == 1.0
    assert check(hot, warnings.append)["health/variance_drift"] == 1.0
    assert len(warnings) == 1 and "variance_drift_factor=2.0" in warnings[0]  # once per excursion
    assert "drift/image_var_ratio" not in output_drift(x, torch.zeros(1), torch.ones(1))  # no reference variance
