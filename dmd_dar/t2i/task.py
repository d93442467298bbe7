"""``DiffusersT2ITask``: DMD2 from a diffusers text-to-image teacher (SD3/SD3.5, Flux, Qwen-Image, PixArt, DiT).

Selected with ``networks.teacher_kind=diffusers``; settings under ``t2i.*`` (``T2IConfig``). What it does:

- loads the pipeline from ``t2i.model`` (a local folder, or a hub id from the local cache; offline-aware, see
  ``dmd_dar.t2i.loading``); the frozen teacher is the pipeline's transformer;
- reads the prompts (``dmd_dar.t2i.prompts``), computes their text embeddings once with the pipeline's own
  ``encode_prompt`` and caches them on disk (``dmd_dar.t2i.embeddings``); the text encoders are then dropped,
  and on a later run with every prompt cached they are not even loaded;
- student and fake score: ``wrap_with_dar(transformer, routing)`` (the residual twin when
  ``routing.kind=residual``). Full fine-tuning (``t2i.lora_rank=0``) trains copies of the transformer. LoRA
  (``t2i.lora_rank > 0``, peft) runs, by default (``t2i.shared_base``), on one frozen base: the student is the
  base with adapter ``t2i.student_adapter`` bound and active (``AdapterNet``, its DAR routers beside it), the fake
  score the same base with ``t2i.fake_adapter``, the teacher the base with adapters off (``dmd_dar.t2i.lora.
  SharedBase``); no base weight exists twice, and each network's parameters (what its optimizer, DDP, the EMA and
  the checkpoints see) are its own LoRA matrices and routers only. DAR routers train fully, in their own
  optimizer group. Under FSDP the one base is sharded once (``SharedBase.root``, prepared by the training
  strategy in place of the two networks), and the main process's sample grids and export run on a standalone
  base read again from ``t2i.model``;
- the real score's guidance in the model's own form: two-pass CFG against ``t2i.negative_prompt`` for SD3,
  PixArt, DiT and Qwen-Image; Flux-dev's embedded guidance (the scale is a model input, one pass, no null
  condition); the student and fake score of Flux-dev get the fixed ``t2i.embedded_guidance``;
- the teacher's flow shift (static, or dynamic ``exp(mu)`` at the training resolution) for the DM / fake-score
  timesteps and the few-step student schedule;
- ``decode``: the VAE with its scaling / shift factors (Qwen-Image: per-channel latent mean / std);
- ``export``: the adapter (peft and diffusers formats), the DAR routers and the few-step schedule, plus a merged
  transformer when asked (``export.merge``; always for full fine-tuning) (``dmd_dar.t2i.export``), sampled by
  ``dmd-dar sample checkpoint=<export> prompt="..."``.

Not available here (UserError at start): the GAN head and few-step training on real latents (both need real
images; DMD2 on prompts is data-free), and the DMD1 regression loss (it needs cached teacher ODE pairs).
"""

from __future__ import annotations

import contextlib
import copy
import gc
from pathlib import Path

import torch
from accelerate import PartialState, cpu_offload
from torch import nn

from dmd_dar.backbones import wrap_with_dar
from dmd_dar.diffusion.noise import make_noise
from dmd_dar.diffusion.paths import make_path
from dmd_dar.diffusion.samplers import few_step_sample, guided, network_x0_fn, sample_ode, student_timesteps
from dmd_dar.distill.denoiser import Denoiser
from dmd_dar.distill.losses import image_moments
from dmd_dar.distill.method import Batch
from dmd_dar.distill.task import DistillTask, disable_dropout
from dmd_dar.errors import UserError
from dmd_dar.models import param_groups
from dmd_dar.routing import RoutingConfig
from dmd_dar.t2i import embeddings as E
from dmd_dar.t2i import loading as L
from dmd_dar.t2i import memory as M
from dmd_dar.t2i.export import export_student
from dmd_dar.t2i.families import T2INet
from dmd_dar.t2i.lora import SharedBase, add_lora, weights_digest
from dmd_dar.t2i.prompts import load_prompt_sources
from dmd_dar.training.seeding import derive_seed
from dmd_dar.training.sharding import fsdp_requested
from dmd_dar.utils.io import atomic_save_safetensors, load_safetensors


class EmbeddedGuidanceDenoiser(Denoiser):
    """A guidance-distilled teacher (Flux-dev): the guidance scale is an input of one forward pass, not CFG."""

    guidance_input = True

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond, guidance: float = 1.0, interval=None) -> torch.Tensor:
        if interval is not None:  # DistillTask refuses the combination up front; this guards direct use
            raise UserError("a guidance interval needs two-pass CFG; Flux-dev's embedded guidance has no unguided pass")
        g = torch.full((x_t.shape[0],), float(guidance), device=x_t.device)  # [B]
        return self.path.pred_to_x0(self.pred(x_t, t, {**cond, "guidance": g}), x_t, t)


class TeacherNet(T2INet):
    """The teacher's ``T2INet``; on a shared base (``base``) every forward first switches the adapters off."""

    def __init__(self, model, family, embedded_guidance, base: SharedBase | None) -> None:
        super().__init__(model, family, embedded_guidance)
        self._base = base

    def forward(self, x_t, t, cond):
        if self._base is None:
            return super().forward(x_t, t, cond)
        return self._base.run(self._on_base, x_t, t, cond)

    def _on_base(self, x_t, t, cond):
        self._base.use(None, None)
        return T2INet.forward(self, x_t, t, cond)


class _Teacher(TeacherNet):
    """The frozen teacher, placed on first use: on the device, or (``offload_teacher``) kept in CPU memory and
    streamed to the device layer by layer through accelerate's ``cpu_offload``. Placing it late lets the
    student / fake copies be made from the untouched CPU weights."""

    def __init__(self, model, family, embedded_guidance, device, offload: bool, base: SharedBase | None) -> None:
        super().__init__(model, family, embedded_guidance, base)
        # a shared base is on the device already (and may be FSDP-wrapped by now: nothing to move)
        self._device, self._offload, self._placed = torch.device(device), offload, base is not None

    def forward(self, x_t, t, cond):
        if not self._placed:
            if self._offload and self._device.type != "cpu":
                cpu_offload(self.model, execution_device=self._device)
            else:
                self.model.to(self._device)
            self._placed = True
        return super().forward(x_t, t, cond)


class AdapterNet(T2INet):
    """A network on the shared frozen base (module docstring): the DAR wrapper of the base (routers registered,
    the base itself not) and this network's own LoRA matrices (``adapter``), bound into adapter slot ``slot``
    before every forward. ``copy.deepcopy`` (the EMA) copies the matrices and routers and shares the base."""

    def __init__(self, wrapped: nn.Module, family, embedded_guidance, base: SharedBase, slot: str,
                 adapter: nn.ModuleDict) -> None:
        super().__init__(wrapped, family, embedded_guidance)
        self.adapter = adapter
        self.slot = slot
        self._base = base

    def __deepcopy__(self, memo):
        memo[id(self._base.transformer)] = self._base.transformer  # the base stays shared; all else is copied
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    @property
    def shared_owner(self) -> SharedBase:
        """What owns this network's parameters together with the other networks' (``training.sharding``): under
        FSDP its ``root`` is prepared once, in place of the networks."""
        return self._base

    def no_sync(self):
        """The gradient-sync pause of the prepared root (accelerate's ``no_sync`` looks it up on the network;
        under FSDP the network itself is not wrapped)."""
        return getattr(self._base.root, "no_sync", contextlib.nullcontext)()

    def bind(self) -> None:
        """Make the base compute this network (its matrices in its slot, the only active adapter)."""
        self._base.use(self.adapter, self.slot)

    def forward(self, x_t, t, cond):
        return self._base.run(self._on_base, x_t, t, cond)

    def _on_base(self, x_t, t, cond):
        self.bind()
        return super().forward(x_t, t, cond)


def _unregister_base(wrapped: nn.Module) -> nn.Module:
    """Keep the wrapper's ``transformer`` reachable as an attribute but out of its module tree (parameters,
    state_dict, ``.to()``, ``.train()``), so that only the routers belong to the wrapper."""
    base = wrapped._modules.pop("transformer")
    wrapped.__dict__["transformer"] = base
    return wrapped


def copied_network(transformer: nn.Module, routing: RoutingConfig, tc, family, embedded_guidance,
                   train_dtype: torch.dtype, gradient_checkpointing: bool) -> T2INet:
    """A trainable copy of ``transformer``: DAR retrofit (or residual twin) [+ LoRA named ``lora.ADAPTER``, every
    other weight frozen]; trainable tensors in ``train_dtype``. ``tc``: the ``T2IConfig``."""
    model = copy.deepcopy(transformer)
    wrapped = wrap_with_dar(model, routing, route_text=tc.route_text)
    if tc.lora_rank > 0:
        add_lora(model, tc.lora_rank, tc.lora_alpha, tc.lora_targets or family.lora_targets)
        for p in wrapped.parameters():
            if p.requires_grad:
                p.data = p.data.to(train_dtype)
        for p in list(wrapped.router.parameters()) + list(getattr(wrapped.text_router, "parameters", list)()):
            p.requires_grad_(True)
            p.data = p.data.to(train_dtype)
    else:
        for p in wrapped.parameters():  # per tensor: ModelMixin.to() warns about fp32-pinned modules
            p.data = p.data.to(train_dtype)
        wrapped.requires_grad_(True)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return T2INet(wrapped, family, embedded_guidance)


def network_on_base(base: SharedBase, role: str, routing: RoutingConfig, tc, family, embedded_guidance,
                    train_dtype: torch.dtype, device, gradient_checkpointing: bool) -> AdapterNet:
    """The ``role`` (student | fake) network on the shared base: its adapter (``t2i.student_adapter`` /
    ``t2i.fake_adapter``) is injected on the role's first build (in the order student, fake: the same LoRA initial
    draws as the copies get); a later build of a role gets copies of that adapter's current matrices (bound into
    the same slot when it runs). LoRA and routers train in ``train_dtype``. ``tc``: the ``T2IConfig``."""
    slot, key = (tc.student_adapter, "t2i.student_adapter") if role == "student" else \
        (tc.fake_adapter, "t2i.fake_adapter")
    wrapped = _unregister_base(wrap_with_dar(base.transformer, routing, route_text=tc.route_text))
    if slot in base.slots:
        adapter = copy.deepcopy(base.slots[slot])
    else:
        adapter = base.add_adapter(slot, tc.lora_rank, tc.lora_alpha, tc.lora_targets or family.lora_targets, key)
        base.register(slot, wrapped)  # the trained network's routers: part of what FSDP wraps once
    for p in list(adapter.parameters()) + list(wrapped.parameters()):
        p.requires_grad_(True)
        p.data = p.data.to(device=device, dtype=train_dtype)
    if gradient_checkpointing:  # a property of the one base: on for every network once any asks for it
        base.transformer.enable_gradient_checkpointing()
    return AdapterNet(wrapped, family, embedded_guidance, base, slot, adapter)


def _slice(cond: dict, i: int, j: int) -> dict:
    return {k: v[i:j] for k, v in cond.items()}


class DiffusersT2ITask(DistillTask):
    """The DistillTask of diffusers T2I teachers (module docstring)."""

    def __init__(self, cfg, device) -> None:
        tc = cfg.t2i
        m = cfg.method
        if m.gan_weight > 0:
            raise UserError("method.gan_weight > 0: the GAN head needs real images, which text-to-image DMD2 "
                            "here does not load (prompt-only distillation); set method.gan_weight=0")
        if m.needs_regression_pairs:
            key = "regression_weight" if m.regression_weight > 0 else "warm_start_steps"
            raise UserError(f"method.{key} > 0 is not available for diffusers teachers (no cached teacher ODE "
                            f"pairs); set method.{key}=0")
        if m.student_steps > 1 and not m.backward_simulation:
            raise UserError("method.backward_simulation=false needs real images; diffusers teachers train "
                            "few-step students with backward simulation (set method.backward_simulation=true)")
        self.cfg, self.tc, self.device = cfg, tc, torch.device(device)
        self.dtype, self.train_dtype = L.torch_dtype(tc.dtype), L.torch_dtype(tc.train_dtype)
        self.source, self.local_only = L.resolve_source(tc.model, tc.local_files_only)
        index = L.pipeline_index(self.source, self.local_only, tc.revision, tc.cache_dir)
        self.family, self.class_name = L.family_from_index(index)
        fam = self.family
        self.prompts = load_prompt_sources(tc.prompts, tc.caption_key)
        self.max_sequence_length = tc.max_sequence_length or fam.default_max_sequence_length

        # Text embeddings first: when every prompt is cached the text encoders are never loaded.
        text_parts = L.text_components(index)
        self.cache = E.EmbeddingCache(tc.embed_cache_dir or E.default_cache_dir(), self._identity(text_parts))
        wanted = self.prompts + [tc.negative_prompt]
        need_text = fam.has_text and bool(self.cache.missing(wanted))
        pipe = L.load_pipeline(self.source, self.local_only, self.dtype, tc.revision, tc.cache_dir,
                               skip=() if need_text or not fam.has_text else text_parts)
        if need_text:
            self._encode(pipe, wanted, text_parts)
        elif fam.has_text:
            self.cache.hits += len(dict.fromkeys(wanted))
        self.labels = self._class_labels(pipe) if not fam.has_text else None

        self.transformer = pipe.transformer.requires_grad_(False).eval()
        self.pipeline_class = type(pipe)
        self.vae = pipe.vae.to(self.device).requires_grad_(False).eval()
        self.vae_factor = L.vae_scale_factor(pipe)
        self.scheduler_config = dict(pipe.scheduler.config)
        del pipe
        gc.collect()
        config = self.transformer.config
        channels = config.in_channels // (4 if fam.packed else 1)
        self.latent_shape = L.latent_geometry(fam, config, self.vae_factor, tc.height, tc.width, channels)
        _, h, w = self.latent_shape
        self.vp_schedule = None
        if fam.path == "flow":
            self.path = make_path("flow", "velocity")
            patch = 2 if fam.packed else int(getattr(config, "patch_size", 1) or 1)
            self.image_tokens = (h // patch) * (w // patch)
            self.shift = float(tc.shift) if tc.shift is not None else L.scheduler_shift(self.scheduler_config,
                                                                                          self.image_tokens)
        else:
            if tc.shift not in (None, 1.0):
                raise UserError(f"t2i.shift={tc.shift}: {fam.name} is a VP (DDPM) teacher; the flow shift does "
                                f"not apply, leave t2i.shift unset")
            self.vp_schedule = L.vp_schedule(self.scheduler_config, fam.name)
            self.path = make_path("vp", "eps", **self.vp_schedule)
            self.image_tokens = (h // config.patch_size) * (w // config.patch_size)
            self.shift = 1.0

        self.guidance_form = self._guidance_form()
        self.embedded_guidance = None
        if self.guidance_form == "embedded" and m.guidance_interval is not None:
            raise UserError(f"method.guidance_interval={list(m.guidance_interval)}: {self.class_name} uses embedded "
                            f"guidance (one pass, no unguided prediction to fall back to); unset "
                            f"method.guidance_interval or use t2i.guidance=cfg")
        if self.guidance_form == "embedded":
            self.embedded_guidance = float(tc.embedded_guidance if tc.embedded_guidance is not None
                                           else m.guidance_scale)
        # One frozen base for teacher, student and fake score (module docstring), sharded once under FSDP.
        self.base = None
        if tc.lora_rank > 0 and tc.shared_base:
            self.base = SharedBase(self.transformer.to(self.device))
            if fsdp_requested():  # the trainer's check_distribution makes this the launch's FSDP
                _print("t2i.shared_base: FSDP launch: the one base (teacher, student and fake score) is sharded "
                       "once; sample grids and the export run on the main process on the base read again")
        teacher_net = _Teacher(self.transformer, fam, self.embedded_guidance, self.device, tc.offload_teacher,
                               self.base)
        teacher_net.vae_scale_factor = self.vae_factor
        if self.guidance_form == "embedded":
            self.teacher = EmbeddedGuidanceDenoiser(teacher_net, self.path, None)
        else:
            self.teacher = Denoiser(teacher_net, self.path, self.null_cond)
        self.student_times = student_timesteps(m.student_steps, shift=self.shift)
        self.feature_dim = int(getattr(self.transformer, "inner_dim", 0) or 0)
        self._null = self.condition([tc.negative_prompt]) if fam.has_text else None
        self._built: list[nn.Module] = []

    # -- set-up helpers -----------------------------------------------------------------------------------------
    def _identity(self, text_parts: list[str]) -> dict:
        tc = self.tc
        return {"source": self.source, "revision": tc.revision, "family": self.family.name,
                "max_sequence_length": self.max_sequence_length, "dtype": str(self.dtype),
                "encoders": E.encoder_fingerprint(self.source, text_parts)}

    def _encode(self, pipe, prompts: list[str], text_parts: list[str]) -> None:
        """Encode the missing prompts on the device, then free the text encoders."""
        for name in text_parts:
            module = getattr(pipe, name, None)
            if isinstance(module, nn.Module):
                module.to(self.device)
        n = self.cache.fill(prompts, lambda chunk: E.encode_with_pipeline(pipe, self.family, chunk,
                                                                          self.max_sequence_length, self.device),
                            batch_size=self.tc.encode_batch_size)
        _print(f"text embeddings: {n} computed, cached in {self.cache.root}")
        for name in text_parts:
            setattr(pipe, name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _class_labels(self, pipe) -> torch.Tensor:
        """DiT: prompts are ImageNet class names (``pipe.id2label`` spellings) or integer class ids."""
        ids = []
        for n, p in enumerate(self.prompts, 1):
            if p.strip().isdigit():
                ids.append(int(p))
                continue
            try:
                ids.extend(pipe.get_label_ids(p))
            except (ValueError, KeyError, AttributeError) as exc:
                raise UserError(f"t2i.prompts entry {n} ({p!r}) is not a class name of this DiT pipeline; use "
                                f"names from its id2label or integer class ids") from exc
        return torch.tensor(ids, dtype=torch.long)

    def _guidance_form(self) -> str:
        form = self.tc.guidance
        embeds = bool(getattr(self.transformer.config, "guidance_embeds", False))
        if form == "auto":
            return "embedded" if embeds else "cfg"
        if form == "embedded" and not embeds:
            raise UserError(f"t2i.guidance=embedded, but {self.class_name} has no guidance embedding "
                            f"(only guidance-distilled Flux-dev does); use t2i.guidance=cfg")
        return form

    # -- conditions ---------------------------------------------------------------------------------------------
    def condition(self, prompts: list[str], indices: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Batched condition dict on the device for ``prompts`` (DiT: class labels by prompt index)."""
        if not self.family.has_text:
            idx = indices if indices is not None else [self.prompts.index(p) for p in prompts]
            return {"class_labels": self.labels[idx].to(self.device)}
        null_len = 0 if getattr(self, "_null", None) is None else self._null["prompt_embeds"].shape[1]
        cond = E.stack_conditions([self.cache.get(p) for p in prompts], self.family, length=null_len)
        return {k: v.to(self.device) for k, v in cond.items()}

    def null_cond(self, cond: dict) -> dict:
        """The unconditional condition (negative prompt; DiT: the null class), batch 1 or matching ``cond``."""
        if not self.family.has_text:
            return {"class_labels": torch.full_like(cond["class_labels"], self.transformer.config.num_embeds_ada_norm)}
        length = cond["prompt_embeds"].shape[1]
        return E.pad_condition(self._null, self.family, length)

    # -- DistillTask --------------------------------------------------------------------------------------------
    def build_network(self, routing: RoutingConfig, gradient_checkpointing: bool, role: str = "student"
                      ) -> nn.Module:
        """A trainable network of ``role`` (student | fake): on the shared base (``AdapterNet``) or a copy of the
        teacher; DAR retrofit (or residual twin) [+ LoRA], with every dropout probability zeroed
        (``disable_dropout``: DiT's per-block label dropout, any attention / FF / LoRA dropout), so it runs in
        ``.train()`` as in ``.eval()``; the second call (the fake score, after the student) prints the memory
        estimate."""
        if self.base is not None:
            if role not in ("student", "fake"):
                raise ValueError(f"role {role!r}: student or fake")
            # A network built after the base was sharded (the main process's sampling copy) cannot run on it.
            base = self._standalone_base() if self.base.sharded else self.base
            net = network_on_base(base, role, routing, self.tc, self.family, self.embedded_guidance,
                                  self.train_dtype, self.device, gradient_checkpointing)
        else:
            net = copied_network(self.transformer, routing, self.tc, self.family, self.embedded_guidance,
                                 self.train_dtype, gradient_checkpointing)
        net = disable_dropout(net).to(self.device).train()
        net.vae_scale_factor = self.vae_factor
        self._built.append(net)
        if len(self._built) == 2:
            self.print_memory_estimate(*self._built, gradient_checkpointing)
        return net

    def _standalone_base(self) -> SharedBase:
        """A base of its own, the teacher's weights read again from ``t2i.model``: for a network that runs on
        one process while the shared base is sharded over all of them."""
        tc = self.tc
        transformer = type(self.transformer).from_pretrained(self.source, subfolder="transformer",
                                                             revision=tc.revision, cache_dir=tc.cache_dir,
                                                             local_files_only=self.local_only, dtype=self.dtype)
        return SharedBase(transformer.to(self.device))

    def teacher_identity(self) -> str:
        """The digest of the frozen base weights (``weights_digest``), so a resume against another base
        (another ``t2i.model`` or revision) is refused."""
        if getattr(self, "_base_digest", None) is None:  # hashed once per run, on first use
            self._base_digest = weights_digest(self.transformer)
        return self._base_digest

    def param_groups(self, net, lr, routing_lr, weight_decay):
        return param_groups(net, lr, routing_lr, weight_decay)

    def draw(self, batch_size, gen, device, need_real) -> Batch:
        if need_real:
            raise UserError("this configuration needs real images; diffusers T2I distillation is prompt-only")
        idx = torch.randint(len(self.prompts), (batch_size,), generator=gen).tolist()
        cond = self.condition([self.prompts[i] for i in idx], idx)
        noise = torch.randn(batch_size, *self.latent_shape, generator=gen)  # [B, C, h, w]
        return Batch(noise.to(device), cond)

    def grid_batch(self, n_per_cond):
        k = min(self.tc.grid_prompts, len(self.prompts))
        idx = [i for i in range(k) for _ in range(n_per_cond)]
        return self.condition([self.prompts[i] for i in idx], idx), [derive_seed("grid", i) for i in range(len(idx))]

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1] (float32)."""
        out = []
        for i in range(0, x.shape[0], self.tc.sample_batch_size):
            out.append(self.family.decode_latents(self.vae, x[i:i + self.tc.sample_batch_size]))
        return torch.cat(out)

    @torch.no_grad()
    def sample(self, net: nn.Module, cond, seeds: list[int], as_teacher: bool = False) -> torch.Tensor:
        """Latents: the student's few-step samples, or (``as_teacher``) teacher ODE samples with guidance."""
        out = []
        bs = self.tc.sample_batch_size
        for i in range(0, len(seeds), bs):
            c = _slice(cond, i, i + bs)
            z = make_noise(seeds[i:i + bs], self.latent_shape, self.device)
            if as_teacher:
                out.append(self._teacher_sample(c, z))
            else:
                gen = torch.Generator(device=self.device).manual_seed(derive_seed("renoise", seeds[i]))
                out.append(few_step_sample(network_x0_fn(net, self.path, c), self.path, z, self.student_times,
                                           generator=gen))
        return torch.cat(out)

    def _teacher_sample(self, cond: dict, z: torch.Tensor) -> torch.Tensor:
        scale = self.cfg.method.guidance_scale
        net = self.teacher.net
        if self.guidance_form == "embedded":
            g = torch.full((z.shape[0],), float(scale), device=z.device)
            denoise = lambda x, t: net(x, t, {**cond, "guidance": g})  # noqa: E731
        else:
            denoise = guided(lambda x, t, c: net(x, t, c), scale, cond, self.null_cond(cond),
                             interval=self.cfg.method.guidance_interval)
        method = "euler" if self.path.kind == "flow" else "ddim"
        return sample_ode(method, denoise, self.path, z, self.tc.teacher_steps, shift=self.shift)

    def reference(self, run_dir: Path) -> dict[str, torch.Tensor]:
        """Per-channel mean/std of ``t2i.reference_samples`` teacher latents (cached in the run folder)."""
        path = Path(run_dir) / "teacher_reference.safetensors"
        if path.is_file():
            return load_safetensors(path)
        n = self.tc.reference_samples
        if n == 0:
            c = self.latent_shape[0]
            return {"mean": torch.zeros(c), "std": torch.ones(c)}
        idx = [i % len(self.prompts) for i in range(n)]
        cond = self.condition([self.prompts[i] for i in idx], idx)
        x = self.sample(self.teacher.net, cond, [derive_seed("teacher-ref", i) for i in range(n)], as_teacher=True)
        x = x.float().cpu()
        ref = {"mean": x.mean(dim=(0, 2, 3)), "std": x.std(dim=(0, 2, 3)), "samples": x[:16],
               "image_var": image_moments(x)[1].mean(0)}  # Decoupled DMD's meanvar target
        atomic_save_safetensors(ref, path)
        return ref

    def export(self, net: nn.Module, folder: Path) -> Path:
        return export_student(net, Path(folder), self)

    # -- memory ---------------------------------------------------------------------------------------------------
    def print_memory_estimate(self, student: nn.Module, fake: nn.Module, checkpointing: bool) -> dict[str, float]:
        """Print (main process) and return ``memory.estimate_for`` of this run, per process."""
        cfg = self.cfg
        try:
            world = PartialState().num_processes
        except Exception:  # no accelerate state: a plain script
            world = 1
        sharded = fsdp_requested()
        est = M.estimate_for(self.transformer, student, fake, storage_dtype=self.dtype, train_dtype=self.train_dtype,
                             mixed_precision=cfg.run.mixed_precision, tokens=self.image_tokens +
                             self.max_sequence_length, batch=cfg.run.batch_size, checkpointing=checkpointing,
                             ema=cfg.ema_decay > 0, offload_teacher=self.tc.offload_teacher, world_size=world,
                             sharded=sharded)
        base = ("shared base, sharded once" if sharded else "shared base") if self.base is not None else \
            ("3 copies" if self.tc.lora_rank else "full fine-tuning")
        _print(M.format_estimate(est, f"memory estimate per process ({self.class_name}, "
                                      f"{self.tc.height}x{self.tc.width}, batch {cfg.run.batch_size}, "
                                      f"LoRA rank {self.tc.lora_rank or 'off'} ({base}), checkpointing "
                                      f"{checkpointing}, {world} process(es){', FSDP' if sharded else ''}):"))
        self.memory_estimate = est
        return est


def _print(msg: str) -> None:
    """Print on the main process only (the task is built on every rank)."""
    try:
        if not PartialState().is_main_process:
            return
    except Exception:  # no accelerate state yet: a plain script
        pass
    print(msg, flush=True)
