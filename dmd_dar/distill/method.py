"""DMD2 (Yin et al. 2024): one generator step and one critic step, each returning ``(loss, logs)``.

The method owns no optimizer and knows nothing about devices or processes; the trainer calls
``generator_step`` every ``ttur``-th iteration and ``critic_step`` every iteration, as the official code does,
on the iteration's ``MicroBatch``es. Each step builds its own inputs; ``generator_loss`` / ``critic_loss`` are
the losses for given samples underneath them.

    generator:  x = G(x_{t_k}, t_k, c)                    (t_0 = 1: pure noise; few-step: backward simulation)
                t ~ U[t_min, t_max] (teacher shift), x_t = noise(x, eps, t)
                x0_real = teacher(x_t, t, c) with CFG, x0_fake = fake(x_t, t, c)   (no grad)
                L_G = w_dm * 0.5 ||x - sg(x - g)||^2 [+ w_gan * softplus(-D(x))] [+ w_reg * L_reg]
    critic:     L_fake = teacher-parameterisation denoising loss of fake on sg(x) [+ w_d * L_D(real, fake)]
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dmd_dar.diffusion.objective import denoising_loss
from dmd_dar.diffusion.timesteps import shift as apply_shift
from dmd_dar.distill.denoiser import Denoiser
from dmd_dar.distill.gan import score_features
from dmd_dar.distill.health import grad_norm_wrt, per_bucket_rms
from dmd_dar.distill.losses import (
    distribution_matching_loss,
    dm_gradient,
    gan_discriminator_loss,
    gan_generator_loss,
    regression_loss,
)
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
    shared: the stream every process draws alike (the few-step index k).
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
    fake:      the trainable fake-score network.
    teacher:   the frozen real score (with ``null_cond`` for CFG).
    """

    def __init__(self, cfg: MethodConfig, generator: Denoiser, fake: Denoiser, teacher: Denoiser,
                 student_times: list[float], shift: float = 1.0, gan_head: nn.Module | None = None,
                 regression: RegressionPairs | None = None, lpips_fn=None) -> None:
        if cfg.gan_weight > 0 and gan_head is None:
            raise ValueError("method.gan_weight > 0 needs a GAN head")
        if cfg.regression_weight > 0 and regression is None:
            raise ValueError("method.regression_weight > 0 needs cached regression pairs")
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
        return self.cfg.gan_weight > 0 or (len(self.student_times) > 1 and not self.cfg.backward_simulation)

    # -- timesteps ---------------------------------------------------------------------------------------------
    def dm_timesteps(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """DM timesteps: uniform in [t_min, t_max], then the teacher's flow shift."""
        return apply_shift(_uniform(n, self.cfg.t_min, self.cfg.t_max, gen), self.shift).float()

    def fake_timesteps(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return apply_shift(_uniform(n, self.cfg.fake_t_min, self.cfg.fake_t_max, gen), self.shift).float()

    # -- the generator -----------------------------------------------------------------------------------------
    def generator_input(self, noise: torch.Tensor, cond, gen: torch.Generator, shared: torch.Generator,
                        real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{t_k}, t_k [B]): the student's input for this step.

        One step: pure noise at t_0. Few steps: pick k (shared by all processes), then either run the student
        itself from noise through steps 0..k-1 without gradients (backward simulation), or noise real images to t_k.
        """
        b = noise.shape[0]
        k = int(torch.randint(len(self.student_times), (1,), generator=shared))
        t_k = torch.full((b,), self.student_times[k], device=noise.device)
        if k == 0:
            return noise, t_k
        if self.cfg.backward_simulation:
            x = noise
            with torch.no_grad():
                for j in range(k):
                    t_j = torch.full((b,), self.student_times[j], device=noise.device)
                    x0 = self.generator.x0(x, t_j, cond)
                    eps = torch.randn(x0.shape, generator=gen).to(x0)
                    x = self.path.add_noise(x0, eps, torch.full((b,), self.student_times[j + 1], device=x0.device))
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
        loss, logs, micro.debug = self.generator_loss(x, b.cond, micro.gen, with_diagnostics)
        micro.sample = x.detach()
        return loss, logs

    def generator_loss(self, x: torch.Tensor, cond, gen: torch.Generator,
                       with_diagnostics: bool = False) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
        """Generator loss for samples ``x`` (with graph). Returns (loss, logs, debug tensors for image grids)."""
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
        if cfg.gan_weight > 0:
            loss_gan, g_gan, logits = self._gan_generator_grad(x, cond, gen)
            loss = loss + cfg.gan_weight * loss_gan
            if x.requires_grad:  # chain g_gan (= gan_weight * dL_gan/dx) into the student; the added value is 0
                surrogate = (x * g_gan).sum()
                loss = loss + (surrogate - surrogate.detach())
            logs.update({"gen/gan_loss": loss_gan.item(), "gan/logits_gen": logits.mean().item()})
            if with_diagnostics and x.requires_grad:
                dm_norm = grad_norm_wrt(cfg.dm_weight * loss_dm, x)
                logs["gen/gan_to_dm_grad_ratio"] = g_gan.float().norm().item() / max(dm_norm, 1e-12)
        if cfg.regression_weight > 0:
            loss_reg = self._regression_loss(gen, x.device, x.dtype)
            loss = loss + cfg.regression_weight * loss_reg
            logs["gen/regression_loss"] = loss_reg.item()
        logs["gen/loss"] = loss.item()
        debug = {"generator": x.detach(), "real_x0": x0_real, "fake_x0": x0_fake, "t": t}
        return loss, logs, debug

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
        fake_net, head = forward_module(self.fake.net), forward_module(self.gan_head)
        x_leaf = x.detach().requires_grad_(True)
        with torch.enable_grad(), contextlib.nullcontext() if is_sharded(fake_net) else frozen(fake_net, head):
            t_g = _uniform(b, 0.0, cfg.gan_max_t, gen).float().to(x.device)
            x_g = self.path.add_noise(x_leaf, torch.randn(x.shape, generator=gen).to(x), t_g).to(x.dtype)
            logits = head(score_features(fake_net, x_g, t_g, cond, cfg.gan_feature))
            loss_gan = gan_generator_loss(logits)
            (cfg.gan_weight * loss_gan).backward()
        return loss_gan.detach(), x_leaf.grad.detach(), logits.detach()

    def _regression_loss(self, gen: torch.Generator, device, dtype) -> torch.Tensor:
        pairs = self.regression
        idx = torch.randint(pairs.noise.shape[0], (min(pairs.noise.shape[0], 16),), generator=gen)
        z = pairs.noise[idx].to(device, dtype)
        t0 = torch.full((z.shape[0],), self.student_times[0], device=device)
        x = self.generate(z, t0, pairs.cond[idx].to(device))
        return regression_loss(x, pairs.target[idx].to(device), self.cfg.regression_loss, self.lpips_fn)

    # -- the critic --------------------------------------------------------------------------------------------
    def critic_step(self, micro: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The critic phase on one micro-batch: ``critic_loss`` on the sample of this iteration's generator
        step, or, in an iteration without one (``ttur`` > 1), on the current student's sample drawn here
        without graph. The generator's parameters are frozen meanwhile: this phase trains only the fake score
        and the GAN head."""
        b = micro.batch
        if micro.sample is None:
            with torch.no_grad():
                x_in, t_in = self.generator_input(b.noise, b.cond, micro.gen, micro.shared, b.real)
                # Outside gradient synchronisation: the bare module under DDP, the FSDP wrapper itself.
                student = replace(self.generator, net=forward_module(self.generator.net))
                micro.sample = student.x0(x_in, t_in, b.cond).to(b.noise.dtype)
        with frozen(forward_module(self.generator.net)):
            return self.critic_loss(micro.sample, b.cond, micro.gen, b.real, b.real_cond)

    def critic_loss(self, x: torch.Tensor, cond, gen: torch.Generator,
                    real: torch.Tensor | None = None, real_cond=None) -> tuple[torch.Tensor, dict[str, float]]:
        """Fake-score denoising loss on the generator's samples (detached) [+ the GAN discriminator loss]."""
        cfg = self.cfg
        x = x.detach()
        b = x.shape[0]
        t = self.fake_timesteps(b, gen).to(x.device)
        eps = torch.randn(x.shape, generator=gen).to(x)
        loss_fake = denoising_loss(lambda x_t, tt: self.fake.pred(x_t, tt, cond), self.path, x, eps, t)
        loss = loss_fake
        logs = {"critic/fake_loss": loss_fake.item()}
        if cfg.gan_weight > 0:
            if real is None:
                raise ValueError("the GAN needs real images")
            both = torch.cat([x, real.to(x)])
            both_cond = torch.cat([cond, real_cond if real_cond is not None else cond])
            t_g = _uniform(both.shape[0], 0.0, cfg.gan_max_t, gen).float().to(x.device)
            noised = self.path.add_noise(both, torch.randn(both.shape, generator=gen).to(x), t_g).to(x.dtype)
            logits = self.gan_head(score_features(self.fake.net, noised, t_g, both_cond, cfg.gan_feature))
            logits_fake, logits_real = logits[:b], logits[b:]
            loss_d = gan_discriminator_loss(logits_fake, logits_real)
            loss = loss + cfg.gan_disc_weight * loss_d
            acc = 0.5 * ((logits_fake < 0).float().mean() + (logits_real > 0).float().mean())
            logs.update({"critic/gan_d_loss": loss_d.item(), "gan/logits_fake": logits_fake.mean().item(),
                         "gan/logits_real": logits_real.mean().item(), "gan/accuracy": acc.item()})
        logs["critic/loss"] = loss.item()
        return loss, logs
