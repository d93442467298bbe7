"""DMD2 (Yin et al. 2024) and Decoupled DMD (Liu et al. 2025): one generator step and one critic step, each
returning ``(loss, logs)``.

The method owns no optimizer and knows nothing about devices or processes; the trainer calls
``generator_step`` every ``ttur``-th iteration and ``critic_step`` every iteration, as the official code does,
on the iteration's ``MicroBatch``es. Each step builds its own inputs; ``generator_loss`` / ``critic_loss`` are
the losses for given samples underneath them.

    generator:  x = G(x_{t_k}, t_k, c)                    (t_0 = 1: pure noise; few-step: backward simulation)
                t ~ U[t_min, t_max] (teacher shift), x_t = noise(x, eps, t)
                x0_real = teacher(x_t, t, c) with CFG, x0_fake = fake(x_t, t, c)   (no grad)
                L_G = w_dm * 0.5 ||x - sg(x - g)||^2 [+ w_gan * softplus(-D(x))] [+ w_reg * L_reg]
    critic:     L_fake = teacher-parameterisation denoising loss of fake on sg(x) [+ w_d * L_D(real, fake)]

Decoupled DMD (``method.objective=decoupled``, ``DecoupledDMD``) replaces the coupled update g by two terms,
each on its own re-noised sample of x (own time, own noise) and normalised per sample by its own mean|x - x0_c|:

    CA = -(w_CA - 1)(x0_c - x0_u) at tau_CA <= t_k         DM = x0_f - x0_c at tau_DM (the DM range)
    L_G = 0.5 ||x - sg(x - (ca_weight CA + dm_weight DM))||^2 [+ meanvar_weight KL] [+ GAN] [+ regression]

``method.schedule=random`` (CDM) draws a new few-step schedule for every generator update (``student_schedule``).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dmd_dar.diffusion.objective import denoising_loss
from dmd_dar.diffusion.samplers import guidance_mask
from dmd_dar.diffusion.timesteps import random_student_schedule, sample_capped_timesteps
from dmd_dar.diffusion.timesteps import shift as apply_shift
from dmd_dar.distill.denoiser import Denoiser
from dmd_dar.distill.gan import score_features
from dmd_dar.distill.health import grad_norm_wrt, per_bucket_rms
from dmd_dar.distill.losses import (
    ca_term,
    distribution_matching_loss,
    dm_gradient,
    dm_term,
    gan_discriminator_loss,
    gan_generator_loss,
    image_moments,
    meanvar_kl,
    normalized_update,
    proxy_loss,
    regression_loss,
)
from dmd_dar.errors import UserError
from dmd_dar.training.sharding import forward_module, is_sharded

if TYPE_CHECKING:  # an annotation only: the config module's RunConfig brings training.run (accelerate) along
    from dmd_dar.distill.config import MethodConfig


@contextlib.contextmanager
def frozen(*modules: nn.Module | None):
    """Temporarily stop parameter gradients of ``modules`` (inputs still get gradients through them)."""
    saved = []
    for m in modules:
        if m is not None:
            for p in m.parameters():
                saved.append((p, p.requires_grad))
                p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


@dataclass
class Batch:
    """One iteration's inputs, as a task draws them: generator noise and conditions, and (optionally) real samples."""

    noise: torch.Tensor
    cond: Any
    real: torch.Tensor | None = None
    real_cond: Any = None


@dataclass
class MicroBatch:
    """One micro-batch of one training iteration, as both phases see it.

    batch:  the task's draw (noise, conditions; real images when ``DMD2.needs_real``).
    gen:    this micro-batch's own random stream (timesteps and noise of both losses).
    shared: the stream every process draws alike (the few-step index k; the random schedule).
    sample: the generator's sample (detached), set by this iteration's generator step, for the critic step.
    debug:  the generator step's tensors for the debug grid (generator output, real / fake x0 at one x_t, t).
    """

    batch: Batch
    gen: torch.Generator
    shared: torch.Generator
    sample: torch.Tensor | None = None
    debug: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RegressionPairs:
    """Cached teacher ODE pairs for the DMD1 regression loss: noise [N,C,H,W], conditions [N], targets [N,C,H,W]."""

    noise: torch.Tensor
    cond: torch.Tensor
    target: torch.Tensor


class DMD2:
    """The DMD2 objective over three score networks sharing one parameterisation.

    generator: the student, ``Denoiser`` whose x0 prediction at the student times is the sample.
    fake:      the trainable fake-score network (None only for ``DecoupledDMD`` without the DM regulariser).
    teacher:   the frozen real score (with ``null_cond`` for CFG).
    """

    def __init__(self, cfg: MethodConfig, generator: Denoiser, fake: Denoiser, teacher: Denoiser,
                 student_times: list[float], shift: float = 1.0, gan_head: nn.Module | None = None,
                 regression: RegressionPairs | None = None, lpips_fn=None) -> None:
        if cfg.gan_weight > 0 and gan_head is None:
            raise ValueError("method.gan_weight > 0 needs a GAN head")
        if cfg.needs_regression_pairs and regression is None:
            raise ValueError("method.regression_weight > 0 or method.warm_start_steps > 0 needs cached regression "
                             "pairs")
        self.cfg, self.generator, self.fake, self.teacher = cfg, generator, fake, teacher
        self.path = teacher.path
        self.student_times = list(student_times)
        self.shift = shift
        self.gan_head = gan_head
        self.regression = regression
        self.lpips_fn = lpips_fn

    @property
    def needs_real(self) -> bool:
        """Whether the batches must carry real images: the GAN's discriminator sees them, and a few-step
        student without backward simulation starts from real images noised to its input time."""
        few_step = len(self.student_times) > 1 or (self.cfg.schedule == "random" and self.cfg.k_max > 1)
        return self.cfg.gan_weight > 0 or (few_step and not self.cfg.backward_simulation)

    @property
    def has_critic(self) -> bool:
        """Whether a critic phase trains anything: the fake score and/or the GAN head."""
        return self.fake is not None or self.gan_head is not None

    @property
    def gan_backbone(self) -> nn.Module:
        """The network whose tokens the GAN head reads: the fake score, or without one the frozen teacher (a
        teacher-initialised discriminator backbone, as in LADD; only the head trains)."""
        return (self.fake if self.fake is not None else self.teacher).net

    # -- timesteps ---------------------------------------------------------------------------------------------
    def dm_timesteps(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """DM timesteps: uniform in [t_min, t_max], then the teacher's flow shift."""
        return apply_shift(_uniform(n, self.cfg.t_min, self.cfg.t_max, gen), self.shift).float()

    def fake_timesteps(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return apply_shift(_uniform(n, self.cfg.fake_t_min, self.cfg.fake_t_max, gen), self.shift).float()

    # -- the generator -----------------------------------------------------------------------------------------
    def student_schedule(self, shared: torch.Generator) -> list[float]:
        """The student times of this generator update: ``student_times`` (``method.schedule=fixed``), or a fresh
        random schedule drawn from the stream every process shares (``random``: CDM's dynamic schedule)."""
        c = self.cfg
        if c.schedule == "fixed":
            return self.student_times
        return random_student_schedule(c.k_min, c.k_max, c.schedule_t_min, c.schedule_t_max, self.shift, shared)

    def generator_input(self, noise: torch.Tensor, cond, gen: torch.Generator, shared: torch.Generator,
                        real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{t_k}, t_k [B]): the student's input for this step.

        One step: pure noise at t_0. Few steps: pick k (shared by all processes), then either run the student
        itself from noise through steps 0..k-1 without gradients (backward simulation), or noise real images to t_k.
        The times are ``student_schedule``'s.
        """
        b = noise.shape[0]
        times = self.student_schedule(shared)
        k = int(torch.randint(len(times), (1,), generator=shared))
        t_k = torch.full((b,), times[k], device=noise.device)
        if k == 0:
            return noise, t_k
        if self.cfg.backward_simulation:
            x = noise
            with torch.no_grad():
                for j in range(k):
                    t_j = torch.full((b,), times[j], device=noise.device)
                    x0 = self.generator.x0(x, t_j, cond)
                    eps = torch.randn(x0.shape, generator=gen).to(x0)
                    x = self.path.add_noise(x0, eps, torch.full((b,), times[j + 1], device=x0.device))
            return x.to(noise.dtype), t_k
        if real is None:
            raise ValueError("few-step training without backward simulation needs real images")
        return self.path.add_noise(real, noise, t_k).to(noise.dtype), t_k

    def generate(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The student's sample (x0 prediction) at (x_t, t); differentiable."""
        return self.generator.x0(x_t, t, cond).to(x_t.dtype)

    def generator_step(self, micro: MicroBatch, with_diagnostics: bool = False
                       ) -> tuple[torch.Tensor, dict[str, float]]:
        """The generator phase on one micro-batch: its input (``generator_input``), the student's sample with
        graph (``generate``) and its loss (``generator_loss``). Leaves the detached sample in ``micro.sample``
        for this iteration's critic step and the debug-grid tensors in ``micro.debug``.
        Returns (loss, logs)."""
        b = micro.batch
        x_in, t_in = self.generator_input(b.noise, b.cond, micro.gen, micro.shared, b.real)
        x = self.generate(x_in, t_in, b.cond)
        loss, logs, micro.debug = self.generator_loss(x, b.cond, micro.gen, with_diagnostics, t_student=t_in)
        micro.sample = x.detach()
        return loss, logs

    def generator_loss(self, x: torch.Tensor, cond, gen: torch.Generator, with_diagnostics: bool = False,
                       t_student: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
        """Generator loss for samples ``x`` (with graph). Returns (loss, logs, debug tensors for image grids).
        ``t_student`` [B]: the student's input times of ``x`` (DMD2 does not use them; ``DecoupledDMD`` caps CA's
        times by them)."""
        cfg = self.cfg
        b = x.shape[0]
        t = self.dm_timesteps(b, gen).to(x.device)
        eps = torch.randn(x.shape, generator=gen).to(x)
        with torch.no_grad():
            x_t = self.path.add_noise(x.detach(), eps, t).to(x.dtype)
            x0_real = self.teacher.x0(x_t, t, cond, guidance=cfg.guidance_scale, interval=cfg.guidance_interval)
            x0_fake = self.fake.x0(x_t, t, cond, guidance=cfg.fake_guidance_scale)
        loss_dm = distribution_matching_loss(x, x0_real, x0_fake)
        loss = cfg.dm_weight * loss_dm
        logs: dict[str, float] = {"gen/dm_loss": loss_dm.item(),
                                  "gen/x_mean": x.detach().float().mean().item(),
                                  "gen/x_std": x.detach().float().std().item()}
        g = dm_gradient(x.detach(), x0_real, x0_fake)
        logs.update(per_bucket_rms(g, t.cpu(), "dm_grad"))
        loss = self._extra_terms(x, cond, gen, loss, cfg.dm_weight * loss_dm, logs, with_diagnostics)
        debug = {"generator": x.detach(), "real_x0": x0_real, "fake_x0": x0_fake, "t": t}
        return loss, logs, debug

    def _extra_terms(self, x: torch.Tensor, cond, gen: torch.Generator, loss: torch.Tensor,
                     main_loss: torch.Tensor, logs: dict[str, float], with_diagnostics: bool) -> torch.Tensor:
        """``loss`` plus the optional GAN and regression terms (their logs into ``logs``); ``main_loss``: the
        weighted score-based loss, against which the GAN's gradient is compared in the diagnostics."""
        cfg = self.cfg
        if cfg.gan_weight > 0:
            loss_gan, g_gan, logits = self._gan_generator_grad(x, cond, gen)
            loss = loss + cfg.gan_weight * loss_gan
            if x.requires_grad:  # chain g_gan (= gan_weight * dL_gan/dx) into the student; the added value is 0
                surrogate = (x * g_gan).sum()
                loss = loss + (surrogate - surrogate.detach())
            logs.update({"gen/gan_loss": loss_gan.item(), "gan/logits_gen": logits.mean().item()})
            if with_diagnostics and x.requires_grad and main_loss.requires_grad:
                dm_norm = grad_norm_wrt(main_loss, x)
                logs["gen/gan_to_dm_grad_ratio"] = g_gan.float().norm().item() / max(dm_norm, 1e-12)
        if cfg.regression_weight > 0:
            loss_reg = self._regression_loss(gen, x.device, x.dtype)
            loss = loss + cfg.regression_weight * loss_reg
            logs["gen/regression_loss"] = loss_reg.item()
        logs["gen/loss"] = loss.item()
        return loss

    def _gan_generator_grad(self, x: torch.Tensor, cond, gen: torch.Generator
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(GAN generator loss, its gradient w.r.t. the samples ``x`` times gan_weight, logits), in a backward of
        its own from a detached copy of ``x``, which the generator loss then chains into the student.

        A backward of its own because an FSDP-sharded fake score cannot take part in a partial one (its hooks
        expect every backward through it to complete) nor have its parameters frozen after wrapping: under FSDP
        its parameter gradients are computed here and discarded (the critic update clears them first). Under DDP
        the bare fake score and head run with their parameters frozen, so only the samples get a gradient.
        This backward is not loss-scaled: under fp16 mixed precision a small GAN gradient can underflow (bf16, the
        configs' choice, has fp32's range).
        """
        cfg = self.cfg
        b = x.shape[0]
        fake_net, head = forward_module(self.gan_backbone), forward_module(self.gan_head)
        x_leaf = x.detach().requires_grad_(True)
        with torch.enable_grad(), contextlib.nullcontext() if is_sharded(fake_net) else frozen(fake_net, head):
            t_g = _uniform(b, 0.0, cfg.gan_max_t, gen).float().to(x.device)
            x_g = self.path.add_noise(x_leaf, torch.randn(x.shape, generator=gen).to(x), t_g).to(x.dtype)
            logits = head(score_features(fake_net, x_g, t_g, cond, cfg.gan_feature))
            loss_gan = gan_generator_loss(logits)
            (cfg.gan_weight * loss_gan).backward()
        return loss_gan.detach(), x_leaf.grad.detach(), logits.detach()

    def warm_start_step(self, micro: MicroBatch, with_diagnostics: bool = False
                        ) -> tuple[torch.Tensor, dict[str, float]]:
        """The generator phase of a warm-start iteration (``method.warm_start_steps``): the regression loss alone,
        on as many cached pairs as the micro-batch has samples. Leaves the student's samples in ``micro.sample``
        (the drift check reads them); no critic step follows."""
        n = micro.batch.noise.shape[0]
        loss, x = self._regression(micro.gen, micro.batch.noise.device, micro.batch.noise.dtype, n)
        micro.sample = x.detach()
        return loss, {"gen/regression_loss": loss.item(), "gen/loss": loss.item(),
                      "gen/x_mean": micro.sample.float().mean().item(), "gen/x_std": micro.sample.float().std().item()}

    def _regression_loss(self, gen: torch.Generator, device, dtype) -> torch.Tensor:
        return self._regression(gen, device, dtype, 16)[0]

    def _regression(self, gen: torch.Generator, device, dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(regression loss, student samples) on ``n`` pairs drawn with replacement from the cached ones (at most
        as many as are cached): the one-step student from each pair's noise against the teacher's ODE sample."""
        pairs = self.regression
        idx = torch.randint(pairs.noise.shape[0], (min(pairs.noise.shape[0], n),), generator=gen)
        z = pairs.noise[idx].to(device, dtype)
        t0 = torch.full((z.shape[0],), self.student_times[0], device=device)
        x = self.generate(z, t0, pairs.cond[idx].to(device))
        loss = regression_loss(x, pairs.target[idx].to(device), self.cfg.regression_loss, self.lpips_fn)
        return loss, x

    # -- the critic --------------------------------------------------------------------------------------------
    def critic_step(self, micro: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The critic phase on one micro-batch: ``critic_loss`` on the sample of this iteration's generator
        step, or, in an iteration without one (``ttur`` > 1), on the current student's sample drawn here
        without graph. The generator's parameters are frozen meanwhile (a sharded generator's are not, see
        ``is_sharded``: they get zero gradients, cleared before its own update): this phase trains only the fake
        score and the GAN head."""
        b = micro.batch
        if micro.sample is None:
            with torch.no_grad():
                x_in, t_in = self.generator_input(b.noise, b.cond, micro.gen, micro.shared, b.real)
                # Outside gradient synchronisation: the bare module under DDP, the FSDP wrapper itself.
                student = replace(self.generator, net=forward_module(self.generator.net))
                micro.sample = student.x0(x_in, t_in, b.cond).to(b.noise.dtype)
        net = forward_module(self.generator.net)
        with contextlib.nullcontext() if is_sharded(net) else frozen(net):  # sharded: see is_sharded
            return self.critic_loss(micro.sample, b.cond, micro.gen, b.real, b.real_cond)

    def critic_loss(self, x: torch.Tensor, cond, gen: torch.Generator,
                    real: torch.Tensor | None = None, real_cond=None) -> tuple[torch.Tensor, dict[str, float]]:
        """Fake-score denoising loss on the generator's samples (detached) [+ the GAN discriminator loss]."""
        cfg = self.cfg
        x = x.detach()
        b = x.shape[0]
        loss, logs = torch.zeros((), device=x.device), {}
        if self.fake is not None:
            t = self.fake_timesteps(b, gen).to(x.device)
            eps = torch.randn(x.shape, generator=gen).to(x)
            loss_fake = denoising_loss(lambda x_t, tt: self.fake.pred(x_t, tt, cond), self.path, x, eps, t)
            loss = loss_fake
            logs["critic/fake_loss"] = loss_fake.item()
        if cfg.gan_weight > 0:
            if real is None:
                raise ValueError("the GAN needs real images")
            both = torch.cat([x, real.to(x)])
            both_cond = torch.cat([cond, real_cond if real_cond is not None else cond])
            t_g = _uniform(both.shape[0], 0.0, cfg.gan_max_t, gen).float().to(x.device)
            noised = self.path.add_noise(both, torch.randn(both.shape, generator=gen).to(x), t_g).to(x.dtype)
            logits = self.gan_head(score_features(self.gan_backbone, noised, t_g, both_cond, cfg.gan_feature))
            logits_fake, logits_real = logits[:b], logits[b:]
            loss_d = gan_discriminator_loss(logits_fake, logits_real)
            loss = loss + cfg.gan_disc_weight * loss_d
            acc = 0.5 * ((logits_fake < 0).float().mean() + (logits_real > 0).float().mean())
            logs.update({"critic/gan_d_loss": loss_d.item(), "gan/logits_fake": logits_fake.mean().item(),
                         "gan/logits_real": logits_real.mean().item(), "gan/accuracy": acc.item()})
        logs["critic/loss"] = loss.item()
        return loss, logs


class DecoupledDMD(DMD2):
    """Decoupled DMD (Liu et al. 2025, arXiv 2511.22677; CDM, arXiv 2605.06376): CA and a regulariser as separate
    terms, each with its own re-noised sample, timestep sampler, weight and (CA) guidance scale.

    DMD2's update at one x_t, ``x0_f - [x0_u + w (x0_c - x0_u)]``, is exactly ``DM + CA`` with
    ``DM = x0_f - x0_c`` (distribution matching, needs the fake score) and ``CA = -(w - 1)(x0_c - x0_u)`` (CFG
    augmentation, the teacher alone; ``terms``). Here CA is evaluated at ``tau_CA`` drawn at or below the student's
    input time t_k (``method.ca_timesteps=capped``: sampled before the teacher's shift, then shifted) and DM over
    the DM range, each normalised by its own ``max(mean|x - x0_c|, norm_floor)``. CA is the engine (alone it makes
    a few-step generator, then drifts: growing variance); the regulariser (``method.regularizer``) holds it:
    ``dm`` (the fake score), ``meanvar`` (a per-image mean/variance KL to ``meanvar_target``, no fake score) or
    ``gan`` (the GAN head alone, on the teacher's features).

    A teacher without an unconditional prediction (``Denoiser.guidance_input``: Flux-dev's embedded guidance, one
    pass) has no CA term: it is refused. Its DM term reads the teacher at its embedded guidance
    ``method.guidance_scale``: a guidance-distilled model represents the guided distribution itself, so that
    prediction is its conditional score (the one DMD2 already matches).

    meanvar_target: ([C] mean, [C] variance) of teacher samples' per-image statistics, for ``regularizer=meanvar``.
    """

    def __init__(self, cfg: MethodConfig, generator: Denoiser, fake: Denoiser | None, teacher: Denoiser,
                 student_times: list[float], shift: float = 1.0, gan_head: nn.Module | None = None,
                 regression: RegressionPairs | None = None, lpips_fn=None,
                 meanvar_target: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__(cfg, generator, fake, teacher, student_times, shift, gan_head, regression, lpips_fn)
        if cfg.regularizer == "dm" and fake is None:
            raise ValueError("method.regularizer=dm needs a fake score")
        if cfg.ca_weight > 0 and (teacher.null_cond is None or teacher.guidance_input):
            raise UserError("method.ca_weight > 0: CFG augmentation needs the teacher's unconditional prediction, "
                            "which this teacher has not (an unconditional model, or embedded guidance as in "
                            "Flux-dev); set method.ca_weight=0 (distribution matching only), or for Flux-dev t2i.guidance=cfg")
        if cfg.ca_weight > 0 and cfg.ca_timesteps == "capped":
            # the lowest student time: a random schedule's intermediate times lie above shift(schedule_t_min)
            lowest = (float(apply_shift(torch.tensor(cfg.schedule_t_min, dtype=torch.float64), shift))
                      if cfg.schedule == "random" else min(student_times))
            sample_capped_timesteps(torch.tensor([lowest]), cfg.ca_t_min, cfg.ca_t_max, shift,
                                    key="method.ca_t_min")  # refuses an empty range up front
        if cfg.regularizer == "meanvar" and meanvar_target is None:
            raise UserError("method.regularizer=meanvar needs target statistics: set method.meanvar_target=[mean, "
                            "var], or let the task measure them from teacher samples (t2i.reference_samples > 0)")
        if cfg.regularizer == "dm" and cfg.dm_weight == 0 and cfg.ca_weight > 0:
            warnings.warn("method.dm_weight=0 with method.regularizer=dm: CA alone ('engine only', for diagnosis) "
                          "drifts: the generator's variance keeps growing (oversaturation, then noise)", stacklevel=2)
        self.meanvar_target = meanvar_target

    @property
    def ca_scale(self) -> float:
        c = self.cfg
        return c.guidance_scale if c.ca_guidance_scale is None else c.ca_guidance_scale

    def ca_timesteps(self, t_student: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """CA times [B] in ``[ca_t_min, ca_t_max]`` before the shift: capped by each sample's student input time
        (``method.ca_timesteps=capped``), or not (``full``: Decoupled DMD's "decoupled-full" ablation)."""
        c = self.cfg
        if c.ca_timesteps == "full":
            return apply_shift(_uniform(t_student.shape[0], c.ca_t_min, c.ca_t_max, gen), self.shift).float()
        return sample_capped_timesteps(t_student.detach().cpu(), c.ca_t_min, c.ca_t_max, self.shift, gen,
                                       key="method.ca_t_min").float()

    @torch.no_grad()
    def terms(self, x: torch.Tensor, cond, t_ca: torch.Tensor | None, eps_ca: torch.Tensor | None,
              t_dm: torch.Tensor | None, eps_dm: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The unnormalised terms at given times and noises (``None``: that term is off), with the conditional x0
        each is normalised by: ``{"ca", "ca_x0_c", "dm", "dm_x0_c", "dm_x0_f"}`` (those present)."""
        out: dict[str, torch.Tensor] = {}
        x = x.detach()
        if t_ca is not None:
            x_t = self.path.add_noise(x, eps_ca, t_ca).to(x.dtype)
            x0_c, x0_u = self.teacher.x0_cond_uncond(x_t, t_ca, cond)
            ca = ca_term(x0_c, x0_u, self.ca_scale)
            inside = guidance_mask(t_ca, self.cfg.guidance_interval)  # CA is the guidance: none outside it
            out["ca"] = ca if inside is None else ca * inside.view(-1, *[1] * (ca.ndim - 1)).to(ca)
            out["ca_x0_c"] = x0_c
        if t_dm is not None:
            x_t = self.path.add_noise(x, eps_dm, t_dm).to(x.dtype)
            g = self.cfg.guidance_scale if self.teacher.guidance_input else 1.0
            x0_c = self.teacher.x0(x_t, t_dm, cond, guidance=g)
            x0_f = self.fake.x0(x_t, t_dm, cond, guidance=self.cfg.fake_guidance_scale)
            out.update(dm=dm_term(x0_f, x0_c), dm_x0_c=x0_c, dm_x0_f=x0_f)
        return out

    def generator_loss(self, x: torch.Tensor, cond, gen: torch.Generator, with_diagnostics: bool = False,
                       t_student: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
        """``0.5 ||x - sg(x - (ca_weight CA + dm_weight DM))||^2`` [+ meanvar] [+ GAN] [+ regression] for
        samples ``x`` (with graph) at student input times ``t_student`` [B] (default: the first student time)."""
        cfg = self.cfg
        b = x.shape[0]
        if t_student is None:
            t_student = torch.full((b,), self.student_times[0])
        t_ca = eps_ca = t_dm = eps_dm = None
        if cfg.ca_weight > 0:
            t_ca = self.ca_timesteps(t_student, gen).to(x.device)
            eps_ca = torch.randn(x.shape, generator=gen).to(x)
        if cfg.regularizer == "dm" and cfg.dm_weight > 0:
            t_dm = self.dm_timesteps(b, gen).to(x.device)
            eps_dm = torch.randn(x.shape, generator=gen).to(x)
        raw = self.terms(x, cond, t_ca, eps_ca, t_dm, eps_dm)
        xd = x.detach()
        update = torch.zeros_like(xd, dtype=torch.promote_types(x.dtype, torch.float32))
        logs: dict[str, float] = {}
        norms = {}
        for name, t, weight in (("ca", t_ca, cfg.ca_weight), ("dm", t_dm, cfg.dm_weight)):
            if name in raw:
                g = normalized_update(raw[name], xd, raw[f"{name}_x0_c"], cfg.norm_floor)
                update = update + weight * g
                norms[name] = (weight * g).float().norm().item()
                logs[f"gen/{name}_norm"] = norms[name]
                logs.update(per_bucket_rms(g, t.cpu(), f"{name}_grad"))
        if len(norms) == 2:
            logs["gen/ca_to_dm_norm_ratio"] = norms["ca"] / max(norms["dm"], 1e-12)
        loss_proxy = proxy_loss(x, update)
        loss = loss_proxy
        logs["gen/proxy_loss"] = loss_proxy.item()
        if cfg.regularizer == "meanvar":
            loss_kl = meanvar_kl(x, *self.meanvar_target)
            loss = loss + cfg.meanvar_weight * loss_kl
            logs["gen/meanvar_kl"] = loss_kl.item()
        mean, var = image_moments(xd)
        logs.update({"gen/x_mean": xd.float().mean().item(), "gen/x_std": xd.float().std().item(),
                     "gen/image_mean": mean.mean().item(), "gen/image_var": var.mean().item()})
        loss = self._extra_terms(x, cond, gen, loss, loss, logs, with_diagnostics)
        debug = {"generator": xd, "t": t_dm if t_dm is not None else t_ca}
        if "dm" in raw:  # the grid's rows: real / fake x0 at DM's x_t, as for DMD2
            debug.update(real_x0=raw["dm_x0_c"], fake_x0=raw["dm_x0_f"])
        elif "ca" in raw:  # no fake score: the conditional teacher x0 at CA's x_t
            debug["real_x0"] = raw["ca_x0_c"]
        return loss, logs, debug
