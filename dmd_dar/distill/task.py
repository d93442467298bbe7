"""What the DMD2 trainer needs from a family of teachers, behind one interface.

The trainer (plumbing) and the method (maths) are the same for every teacher; a ``DistillTask`` supplies the rest:
the frozen teacher as a ``Denoiser``, how to build the trainable student / fake-score copies, how to draw a batch
of noise and conditions, how to turn samples into images, and how to export the student. ``NativeTask`` serves the
project's own SiT/DiT teachers (class-conditional, pixels or latents); the diffusers text-to-image teachers live in
``dmd_dar.t2i.task``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dmd_dar.artifact import ArtifactMeta, generate, load_artifact, resolve_checkpoint, save_artifact
from dmd_dar.diffusion.noise import make_noise
from dmd_dar.diffusion.samplers import student_timesteps
from dmd_dar.distill.denoiser import Denoiser, class_null_cond
from dmd_dar.distill.losses import image_moments
from dmd_dar.distill.method import Batch, RegressionPairs
from dmd_dar.errors import UserError
from dmd_dar.models import param_groups, to_dar
from dmd_dar.routing import RoutingConfig
from dmd_dar.training.batches import draw_batch, make_dataset
from dmd_dar.training.seeding import derive_seed
from dmd_dar.utils.io import atomic_save_safetensors, file_digest, load_safetensors


class DistillTask:
    """Interface; see ``NativeTask`` for the reference implementation."""

    teacher: Denoiser
    shift: float
    student_times: list[float]
    feature_dim: int

    def build_network(self, routing: RoutingConfig, gradient_checkpointing: bool, role: str = "student"
                      ) -> nn.Module:
        """A trainable network of ``role``: ``student`` (built first; later builds are fresh students for
        gathered weights) or ``fake`` (the fake score)."""
        raise NotImplementedError

    def param_groups(self, net: nn.Module, lr: float, routing_lr: float | None, weight_decay: float) -> list[dict]:
        raise NotImplementedError

    def draw(self, batch_size: int, gen: torch.Generator, device, need_real: bool) -> Batch:
        raise NotImplementedError

    def grid_batch(self, n_per_cond: int) -> tuple[Any, list[int]]:
        """Conditions and noise seeds of the periodic sample grids."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples -> images in [-1, 1] (identity for pixel models; the VAE for latent ones)."""
        return x

    def reference(self, run_dir: Path) -> dict[str, torch.Tensor]:
        """Per-channel mean/std of teacher samples (the drift reference) [and ``image_var``: their mean per-image,
        per-channel variance, the meanvar regulariser's target and the variance-drift reference]."""
        raise NotImplementedError

    def teacher_identity(self) -> str | None:
        """A string that changes when the teacher's weights change (recorded in checkpoints and checked on resume,
        since a run that resumes against another teacher would silently mix two objectives); None = not tracked."""
        return None

    def export(self, net: nn.Module, folder: Path) -> Path:
        raise NotImplementedError


# Every torch layer that zeroes activations at random in .train() and is the identity in .eval().
DROPOUT_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def disable_dropout(net: nn.Module) -> nn.Module:
    """Zero, in place, every dropout probability of a distillation network (student or fake score), so that its
    ``.train()`` forward is its ``.eval()`` forward; returns ``net``.

    Label dropout is a teacher-pretraining device for classifier-free guidance. In DMD2 the real score applies CFG
    explicitly and the fake score runs without it, so neither distilled network should replace a condition by the
    null one: a dropped label makes that sample be generated, denoised or scored unconditionally while the teacher,
    the DM gradient and the regression target treat it as its class (a wrong signal for ~1 sample in 10 at the
    usual 0.1). What is switched off:

    - label embedders (any module with a ``dropout_prob``): the native ``LabelEmbedder`` and diffusers'
      ``LabelEmbedding``, of which ``DiTTransformer2DModel`` has one per block (each dropping labels on its own);
    - dropout layers (``DROPOUT_LAYERS``): diffusers' attention / feed-forward dropout and peft's ``lora_dropout``,
      all p = 0 in the published configs, zeroed all the same so that no checkpoint brings one in.

    The probabilities are set to zero rather than the modules put in ``.eval()`` because the trainer switches the
    whole network back to ``.train()`` every step. The teacher is not touched (``train-teacher`` keeps its label
    dropout); the tasks' tests check train == eval for each network they build.
    """
    for module in net.modules():
        if isinstance(module, DROPOUT_LAYERS):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout_prob", None), (int, float)):
            module.dropout_prob = 0.0
    return net


def native_teacher_digest(folder: str | Path) -> str:
    """sha256 of an exported teacher's weights (``folder``: as ``networks.teacher`` names it): what checkpoints, run
    summaries and the regression-pair cache record, so results of another teacher are never taken for this one's."""
    return file_digest(resolve_checkpoint(str(folder)) / "model.safetensors")


class NativeTask(DistillTask):
    """Distill an exported dmd-dar SiT/DiT teacher (class-conditional or unconditional)."""

    def __init__(self, teacher_folder: str | Path, student_steps: int, data_cfg, device) -> None:
        self.folder = resolve_checkpoint(str(teacher_folder))
        net, meta = load_artifact(self.folder)
        if meta.role != "teacher":
            raise UserError(f"{self.folder} holds a {meta.role}; networks.teacher must be an exported teacher")
        if data_cfg.image_size != net.cfg.image_size:
            raise UserError(f"data.image_size={data_cfg.image_size} but the teacher takes {net.cfg.image_size}x"
                            f"{net.cfg.image_size} inputs; set data.image_size={net.cfg.image_size}")
        self.net = net.requires_grad_(False).eval().to(device)
        self.meta = meta
        self.path = meta.diffusion.make_path()
        self.num_classes = net.cfg.num_classes
        self.null = class_null_cond(self.num_classes) if self.num_classes else None
        self.teacher = Denoiser(self.net, self.path, self.null)
        self.shift = meta.diffusion.shift
        self.student_times = student_timesteps(student_steps, shift=self.shift)
        self.feature_dim = net.cfg.hidden_size
        self.data_cfg = data_cfg
        self._dataset = None

    def build_network(self, routing: RoutingConfig, gradient_checkpointing: bool, role: str = "student"
                      ) -> nn.Module:
        """A trainable copy of the teacher (either role): a function-preserving DAR retrofit, or a plain residual
        copy, without the teacher's label dropout (``disable_dropout`` says why)."""
        net = to_dar(self.net, routing) if routing.is_dar else copy.deepcopy(self.net)
        net.cfg.gradient_checkpointing = gradient_checkpointing
        net.cfg.class_dropout_prob = 0.0  # the copy's own config, so the export records what was trained
        return disable_dropout(net).train().requires_grad_(True)

    def param_groups(self, net, lr, routing_lr, weight_decay):
        return param_groups(net, lr, routing_lr, weight_decay)

    def draw(self, batch_size, gen, device, need_real) -> Batch:
        c = self.net.cfg
        labels = (torch.randint(self.num_classes, (batch_size,), generator=gen) if self.num_classes
                  else torch.zeros(batch_size, dtype=torch.long))
        noise = torch.randn(batch_size, c.in_channels, c.image_size, c.image_size, generator=gen)
        batch = Batch(noise.to(device), labels.to(device))
        if need_real:
            if self._dataset is None:
                self._dataset = make_dataset(self.data_cfg)
                n_data = len(getattr(self._dataset, "class_names", []) or [])
                if self.num_classes and n_data != self.num_classes:
                    raise UserError(f"the real-image dataset ({self.data_cfg.source}) has {n_data} classes but the "
                                    f"teacher has {self.num_classes}; use data that matches the teacher's classes")
            real, real_labels, _ = draw_batch(self._dataset, batch_size, gen)
            batch.real, batch.real_cond = real.to(device), real_labels.to(device)
        return batch

    def grid_batch(self, n_per_cond):
        k = max(self.num_classes, 1)
        labels = torch.arange(k).repeat_interleave(n_per_cond)
        return labels, [derive_seed("grid", i) for i in range(len(labels))]

    def student_meta(self) -> ArtifactMeta:
        return ArtifactMeta(role="student", diffusion=self.meta.diffusion, class_names=self.meta.class_names,
                            student_timesteps=self.student_times, note=f"DMD2 student of {self.folder}")

    @torch.no_grad()
    def sample(self, net: nn.Module, cond, seeds: list[int], as_teacher: bool = False) -> torch.Tensor:
        meta = self.meta if as_teacher else self.student_meta()
        return generate(net, meta, cond, seeds, steps=25 if as_teacher else None)

    def reference(self, run_dir: Path, n: int = 64) -> dict[str, torch.Tensor]:
        path = run_dir / "teacher_reference.safetensors"
        if path.is_file():
            ref = load_safetensors(path)
            if "image_var" in ref:  # files of earlier versions lack it: measured again below
                return ref
        labels = torch.arange(n) % max(self.num_classes, 1)
        x = self.sample(self.net, labels, [derive_seed("teacher-ref", i) for i in range(n)], as_teacher=True)
        ref = {"mean": x.mean(dim=(0, 2, 3)), "std": x.std(dim=(0, 2, 3)), "samples": x[:16],
               "image_var": image_moments(x)[1].mean(0)}  # mean per-image variance [C]: meanvar's target
        atomic_save_safetensors(ref, path)
        return ref

    def teacher_identity(self) -> str:
        if not hasattr(self, "_identity"):  # hashed once per run, on first use
            self._identity = native_teacher_digest(self.folder)
        return self._identity

    def regression_pairs(self, cache_dir: Path, n: int, steps: int):
        """DMD1 regression pairs (noise, label, teacher ODE sample), generated once and cached in ``cache_dir``."""
        # The file name says what the pairs are, so a shared cache never hands out pairs of another teacher.
        tag = f"{self.teacher_identity()[:12]}_n{n}_s{steps}"
        path = Path(cache_dir) / f"regression_pairs_{tag}.safetensors"
        if not path.is_file():
            labels = torch.arange(n) % max(self.num_classes, 1)
            seeds = [derive_seed("regression", i) for i in range(n)]
            c = self.net.cfg
            noise = make_noise(seeds, (c.in_channels, c.image_size, c.image_size))
            target = torch.cat([generate(self.net, self.meta, labels[i:i + 64], seeds[i:i + 64], steps=steps)
                                for i in tqdm(range(0, n, 64), desc="teacher ODE pairs")])
            atomic_save_safetensors({"noise": noise, "cond": labels, "target": target}, path)
        d = load_safetensors(path)
        return RegressionPairs(d["noise"], d["cond"], d["target"])

    def export(self, net: nn.Module, folder: Path) -> Path:
        return save_artifact(folder, net, self.student_meta())
