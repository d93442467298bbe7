"""``DistillConfig``: everything ``dmd-dar distill`` needs. Each DMD2 variant is one flag here."""

from __future__ import annotations

from dataclasses import dataclass, field

from dmd_dar.diffusion.samplers import check_guidance_interval
from dmd_dar.errors import UserError
from dmd_dar.routing import RoutingConfig
from dmd_dar.training.batches import DataConfig
from dmd_dar.training.ema import check_decay
from dmd_dar.training.optim import OptimConfig
from dmd_dar.training.run import RunConfig

REGRESSION_KINDS = ("mse", "lpips")
GAN_FEATURES = ("final", "mid")
TEACHER_KINDS = ("native", "diffusers")
OBJECTIVES = ("dmd2", "decoupled")
REGULARIZERS = ("dm", "meanvar", "gan")
CA_TIMESTEPS = ("capped", "full")
SCHEDULES = ("fixed", "random")


@dataclass
class MethodConfig:
    """DMD2 as in the official code (reference/dmd_anchors.md §2.1), with every deviation behind a flag; and
    Decoupled DMD (``objective=decoupled``: the ``ca_*``, ``norm_floor``, ``regularizer`` and ``meanvar_*`` keys)
    and CDM's random few-step schedule (``schedule=random``: ``k_min``, ``k_max``, ``schedule_t_*``), for either."""

    guidance_scale: float = 2.0  # CFG of the real score (teacher), applied in x0 space
    guidance_interval: list[float] | None = None  # [lo, hi]: the real score is guided only where lo <= t <= hi
    #                                               (Kynkaanniemi et al. 2024); null = every t, as in DMD2
    fake_guidance_scale: float = 1.0  # CFG of the fake score; 1 = off (DMD2 asserts it)
    t_min: float = 0.02  # DM timestep range, fraction of [0, 1] before the teacher's shift
    t_max: float = 0.98
    fake_t_min: float = 0.0  # fake-score denoising timesteps (the full range)
    fake_t_max: float = 1.0
    ttur: int = 5  # fake-score updates per generator update (official DMD2: 5 or 10)
    student_steps: int = 1  # 1 = one-step generator; 2, 4 ... = few-step with the schedule below
    backward_simulation: bool = True  # few-step: feed the student its own earlier outputs (DMD2 SDXL)
    dm_weight: float = 1.0
    gan_weight: float = 0.0  # generator GAN weight; 0 disables the GAN head (DMD2 stage 1)
    gan_disc_weight: float = 1e-2  # discriminator loss weight inside the critic loss
    gan_feature: str = "final"  # fake-score tokens fed to the GAN head: final (head input) | mid (middle sublayer)
    gan_max_t: float = 1.0  # diffusion-GAN: real and fake images noised with t ~ U[0, gan_max_t]
    regression_weight: float = 0.0  # DMD1 regression onto teacher ODE pairs; 0 disables (pure DMD2)
    regression_loss: str = "mse"  # mse | lpips
    regression_pairs: int = 128  # number of cached (noise, label, teacher sample) pairs
    regression_steps: int = 25  # teacher ODE steps for the pairs
    regression_cache: str | None = None  # folder for the cached pairs (default: the run directory); runs that share
    #                                      a teacher may share it
    warm_start_steps: int = 0  # the first N iterations: a generator update on the regression loss alone at every
    #                            iteration, no critic (DMD1 / DMD2-SDXL's regression warm start on the cached pairs)
    warm_start_lr: float | None = None  # the generator's learning rate in the warm start (null: generator_optim.lr;
    #                                     its routing_lr scales alike); generator_optim.lr then applies to DMD
    # Decoupled DMD (Liu et al. 2025, arXiv 2511.22677): DMD2's update split into CA and DM, each on its own x_t
    objective: str = "dmd2"  # dmd2 (one coupled update) | decoupled (CA + regulariser terms; method.DecoupledDMD)
    ca_weight: float = 1.0  # decoupled: weight of CA, -(w - 1)(x0_c - x0_u); 0 = pure distribution matching
    ca_guidance_scale: float | None = None  # decoupled: CA's scale w (default: method.guidance_scale)
    ca_timesteps: str = "capped"  # decoupled: capped (tau_CA <= the student's input time t_k) | full (the DM range)
    ca_t_min: float = 0.02  # decoupled: CA timestep range, fraction of [0, 1] before the teacher's shift
    ca_t_max: float = 0.98
    norm_floor: float = 1e-3  # decoupled: floor of each term's per-sample normaliser mean|x - x0_c| (data units)
    regularizer: str = "dm"  # decoupled: dm (fake score, weight dm_weight) | meanvar (per-image mean/var KL to the
    #                          teacher's statistics, meanvar_weight) | gan (the GAN head on teacher features alone)
    meanvar_weight: float = 1.0
    meanvar_target: list[float] | None = None  # [mean, var] of every channel; null = measured from teacher samples
    schedule: str = "fixed"  # fixed (student_steps) | random (CDM: K in [k_min, k_max] steps per generator update)
    k_min: int = 1
    k_max: int = 4
    schedule_t_min: float = 0.25  # random: intermediate student times drawn in this range before the shift (CDM)
    schedule_t_max: float = 0.95

    def __post_init__(self) -> None:
        check_guidance_interval(self.guidance_interval, "method.guidance_interval")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise UserError(f"method.t_min={self.t_min}, method.t_max={self.t_max}: need 0 <= t_min < t_max <= 1")
        if not 0.0 <= self.fake_t_min < self.fake_t_max <= 1.0:
            raise UserError(f"method.fake_t_min={self.fake_t_min}, method.fake_t_max={self.fake_t_max}: need "
                            f"0 <= fake_t_min < fake_t_max <= 1")
        if not 0.0 < self.gan_max_t <= 1.0:
            raise UserError(f"method.gan_max_t={self.gan_max_t} must lie in (0, 1]")
        for key in ("dm_weight", "gan_weight", "gan_disc_weight", "regression_weight"):
            if getattr(self, key) < 0:  # a negative weight turns its loss into one to maximise
                raise UserError(f"method.{key}={getattr(self, key)} must be >= 0 (0 disables the term)")
        if self.ttur < 1:
            raise UserError(f"method.ttur={self.ttur} must be >= 1 (fake updates per generator update)")
        for key in ("student_steps", "regression_pairs", "regression_steps"):
            if getattr(self, key) < 1:
                raise UserError(f"method.{key}={getattr(self, key)} must be >= 1")
        if self.warm_start_steps < 0:
            raise UserError(f"method.warm_start_steps={self.warm_start_steps} must be >= 0 (0: no warm start)")
        if self.warm_start_lr is not None and self.warm_start_lr <= 0:
            raise UserError(f"method.warm_start_lr={self.warm_start_lr} must be > 0, or null for generator_optim.lr")
        if self.regression_loss not in REGRESSION_KINDS:
            raise UserError(f"method.regression_loss={self.regression_loss!r}; choose one of mse, lpips")
        if self.gan_feature not in GAN_FEATURES:
            raise UserError(f"method.gan_feature={self.gan_feature!r}; choose one of final, mid")
        self._check_decoupled()

    def _check_decoupled(self) -> None:
        for key, allowed in (("objective", OBJECTIVES), ("regularizer", REGULARIZERS),
                             ("ca_timesteps", CA_TIMESTEPS), ("schedule", SCHEDULES)):
            if getattr(self, key) not in allowed:
                raise UserError(f"method.{key}={getattr(self, key)!r}; choose one of {', '.join(allowed)}")
        for key in ("ca_weight", "meanvar_weight", "norm_floor"):
            if getattr(self, key) < 0:
                raise UserError(f"method.{key}={getattr(self, key)} must be >= 0")
        if not 0.0 <= self.ca_t_min < self.ca_t_max <= 1.0:
            raise UserError(f"method.ca_t_min={self.ca_t_min}, method.ca_t_max={self.ca_t_max}: need "
                            f"0 <= ca_t_min < ca_t_max <= 1")
        if self.objective == "dmd2" and self.regularizer != "dm":
            raise UserError(f"method.regularizer={self.regularizer} needs method.objective=decoupled (DMD2's "
                            f"coupled update always contains DM); set method.objective=decoupled")
        if self.regularizer == "gan" and self.gan_weight <= 0:
            raise UserError("method.regularizer=gan needs method.gan_weight > 0 (the GAN is then the only "
                            "regulariser); set method.gan_weight=0.1, or method.regularizer=dm")
        if self.meanvar_target is not None and (len(self.meanvar_target) != 2 or self.meanvar_target[1] <= 0):
            raise UserError(f"method.meanvar_target={list(self.meanvar_target)} must be [mean, var] with var > 0, "
                            f"or null to measure it from teacher samples")
        if self.k_min < 1 or self.k_min > self.k_max:
            raise UserError(f"method.k_min={self.k_min}, method.k_max={self.k_max}: need 1 <= k_min <= k_max "
                            f"(the random schedule's student step counts)")
        if not 0.0 < self.schedule_t_min < self.schedule_t_max < 1.0:
            raise UserError(f"method.schedule_t_min={self.schedule_t_min}, method.schedule_t_max="
                            f"{self.schedule_t_max}: need 0 < schedule_t_min < schedule_t_max < 1")

    @property
    def needs_regression_pairs(self) -> bool:
        """Whether cached teacher ODE pairs are needed: for the regression term or the warm start on them."""
        return self.regression_weight > 0 or self.warm_start_steps > 0

    @property
    def needs_fake_score(self) -> bool:
        """Whether a fake score is built and trained: DMD2 always; Decoupled DMD only with regularizer=dm."""
        return self.objective == "dmd2" or self.regularizer == "dm"


@dataclass
class NetworksConfig:
    """Which networks are built from the teacher, and how each one routes."""

    teacher_kind: str = "native"  # native: an exported dmd-dar teacher | diffusers: a diffusers T2I pipeline
    teacher: str = "assets/teacher"  # exported teacher folder (the embedded teacher by default)
    student_routing: RoutingConfig = field(
        default_factory=lambda: RoutingConfig(kind="dar", query="static_t", chunk_size=4))  # the paper's default
    fake_routing: RoutingConfig = field(default_factory=RoutingConfig)  # residual: a plain copy of the teacher
    gradient_checkpointing: bool = False
    # Where the fake score starts: teacher (DMD2: the teacher's function, fresh LoRA) | student (every tensor
    # the two networks share by name and shape is copied from the student, e.g. to continue from a student
    # that already differs from the teacher).
    fake_init: str = "teacher"
    # > 0: after every fake-score update, fake <- d * fake + (1 - d) * student on the tensors they share (CDM's
    # fake score EMA-merged from the student, d = 0.999 there); 0: off (DMD2).
    fake_track_student: float = 0.0

    def __post_init__(self) -> None:
        # The trainer picks the diffusers path for anything that is not "native": a typo must not select it.
        if self.teacher_kind not in TEACHER_KINDS:
            raise UserError(f"networks.teacher_kind={self.teacher_kind!r}; choose one of {', '.join(TEACHER_KINDS)}")
        if self.fake_init not in ("teacher", "student"):
            raise UserError(f"networks.fake_init={self.fake_init!r}; choose teacher or student")
        if not 0.0 <= self.fake_track_student < 1.0:
            raise UserError(f"networks.fake_track_student={self.fake_track_student} must lie in [0, 1) (0: off)")


@dataclass
class T2IConfig:
    """Distilling a diffusers text-to-image teacher (``networks.teacher_kind=diffusers``); see dmd_dar.t2i.task."""

    model: str = ""  # a local diffusers pipeline folder (model_index.json) or a hub id
    revision: str | None = None
    local_files_only: bool = False  # never download (also implied by HF_HUB_OFFLINE=1)
    cache_dir: str | None = None  # Hugging Face cache to load a hub id from (default: the HF default)
    dtype: str = "bfloat16"  # frozen weights (teacher, LoRA base, VAE): float32 | bfloat16 | float16
    train_dtype: str = "float32"  # trainable parameters (LoRA, routers, or the whole net without LoRA)
    height: int = 1024
    width: int = 1024
    prompts: list[str] = field(default_factory=lambda: ["detail"])  # .txt / .csv / .jsonl files or prompt sets
    caption_key: str = "caption"  # column / key of the caption in .csv / .jsonl prompt files
    negative_prompt: str = ""  # the null condition of classic CFG
    max_sequence_length: int | None = None  # text tokens (default: the family's pipeline default)
    embed_cache_dir: str | None = None  # default: $DMD_DAR_TEXT_CACHE or ~/.cache/dmd_dar/text_embeds
    encode_batch_size: int = 16
    guidance: str = "auto"  # auto (embedded for guidance-distilled Flux, else cfg) | cfg | embedded
    embedded_guidance: float | None = None  # Flux: guidance input of student and fake score (default: guidance_scale)
    shift: float | None = None  # flow shift; default: the teacher scheduler's (static, or exp(mu) at this resolution)
    route_text: bool = False  # also DAR-route the text stream of SD3 / Flux / Qwen-Image
    lora_rank: int = 0  # 0: train every weight; > 0: peft LoRA on student and fake score (routers train fully)
    lora_alpha: float | None = None  # default: lora_rank
    lora_targets: list[str] | None = None  # default: the family's attention and MLP linears
    offload_teacher: bool = False  # keep the frozen teacher in CPU memory, streamed to the GPU per use
    # LoRA runs: one frozen base serves teacher (adapters off), student and fake score (their own adapters);
    # false: three copies of the base (the student's and the fake score's trainable). Full fine-tuning always copies.
    shared_base: bool = True
    student_adapter: str = "student"  # peft adapter names on the shared base (must not exist in the pipeline)
    fake_adapter: str = "fake"
    teacher_steps: int = 28  # teacher ODE steps (drift reference samples)
    reference_samples: int = 16  # teacher samples for the output-drift reference; 0 skips it
    grid_prompts: int = 2  # prompts in the periodic sample grids
    sample_batch_size: int = 8  # images per student / teacher / VAE batch when sampling and decoding

    def __post_init__(self) -> None:
        if self.guidance not in ("auto", "cfg", "embedded"):
            raise UserError(f"t2i.guidance={self.guidance!r}; choose one of auto, cfg, embedded")
        if self.lora_rank < 0:
            raise UserError(f"t2i.lora_rank={self.lora_rank} must be >= 0 (0 disables LoRA)")
        for key in ("height", "width", "encode_batch_size", "grid_prompts", "sample_batch_size", "teacher_steps"):
            if getattr(self, key) < 1:
                raise UserError(f"t2i.{key}={getattr(self, key)} must be >= 1")
        if self.reference_samples < 0:
            raise UserError(f"t2i.reference_samples={self.reference_samples} must be >= 0 (0 skips the reference)")
        if self.student_adapter == self.fake_adapter or not self.student_adapter or not self.fake_adapter:
            raise UserError(f"t2i.student_adapter={self.student_adapter!r} and t2i.fake_adapter="
                            f"{self.fake_adapter!r} must be two different non-empty names")
        if self.lora_rank > 0 and self.shared_base and self.offload_teacher:
            raise UserError("t2i.offload_teacher=true with t2i.shared_base=true: the shared base is also the "
                            "student's and the fake score's (nothing left to offload alone); set "
                            "t2i.offload_teacher=false, or t2i.shared_base=false for three copies")
        for key in ("shift", "lora_alpha", "max_sequence_length"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise UserError(f"t2i.{key}={getattr(self, key)} must be > 0, or null for the default")


@dataclass
class ExportConfig:
    """What ``<run>/export`` holds beyond the student itself (diffusers teachers)."""

    # LoRA runs: also write the transformer with the adapter merged (a full copy of the base: 41 GB for
    # Qwen-Image in bf16); the adapter and the routers are always written.
    merge: bool = False


@dataclass
class DistillConfig:
    """Library defaults: plain DMD2 (``MethodConfig``) with a DAR student and the generic optimiser and run settings.

    The main job's recipe is not here: ``dmd-dar distill`` starts from ``configs/distill_embedded.yaml`` (its
    command's default layer, see ``dmd_dar.cli``), the only place that recipe is written. Code that wants what the
    command runs resolves through ``dmd_dar.cli.resolve``; ``build_config(DistillConfig, ...)`` starts from these.
    """

    networks: NetworksConfig = field(default_factory=NetworksConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)  # real images: GAN and no-backsim few-step inputs
    generator_optim: OptimConfig = field(default_factory=OptimConfig)
    fake_optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/distill"))
    ema_decay: float = 0.99  # 0: no EMA, grids and export use the raw student (FSDP: per-shard EMA)
    debug_grid_every: int = 300  # dump generator / real-score / fake-score x0 grids; 0 disables
    max_bad_steps: int = 10  # consecutive non-finite steps before stopping
    variance_drift_factor: float = 2.0  # health: flag per-image variance beyond x factor (or below / factor) of the
    #                                     teacher samples' (CA's failure signature: variance that keeps growing)
    t2i: T2IConfig = field(default_factory=T2IConfig)  # networks.teacher_kind=diffusers only
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        try:
            check_decay(self.ema_decay)
        except ValueError:
            raise UserError(f"ema_decay={self.ema_decay} must lie in [0, 1) (0: no EMA)") from None
        if self.debug_grid_every < 0:
            raise UserError(f"debug_grid_every={self.debug_grid_every} must be >= 0 (0 disables the grids)")
        if self.max_bad_steps < 1:
            raise UserError(f"max_bad_steps={self.max_bad_steps} must be >= 1")
        if self.variance_drift_factor <= 1:
            raise UserError(f"variance_drift_factor={self.variance_drift_factor} must be > 1 (a ratio to the "
                            f"teacher samples' per-image variance)")
