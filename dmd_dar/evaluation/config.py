"""``dmd-dar eval`` settings: which folders, which metrics, which metric backbones (all local files)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dmd_dar.errors import UserError

METRICS = ("spectral", "lpips_fidelity", "lpips_diversity", "clip_score", "fd", "cmmd")
RESIZE_FILTERS = ("lanczos", "bicubic", "bilinear", "box")


@dataclass
class ClipSettings:
    """open_clip backbone for CLIP score (and for FD/CMMD when ``features.space=clip``)."""

    model: str = "ViT-g-14"
    pretrained: str | None = "laion2b_s12b_b42k"  # tag: decides preprocessing; None with weights_file + model_config
    weights_file: str | None = None  # local checkpoint (.safetensors or weights-only .bin/.pt)
    model_config: str | None = None  # local architecture JSON (open_clip_config.json); replaces `model`
    cache_dir: str | None = None  # a pre-filled Hugging Face cache (HF_HUB_OFFLINE=1)
    prefix: str = "A photo depicts "  # DMD2 convention; "" for an in-domain model trained on raw captions
    pre_resize: int | None = 256  # DMD2: centre square crop + LANCZOS to 256 before open_clip's transform
    class_template: str = "{phrase}"  # caption of a class-conditional sample: {phrase} or {class_name}
    text_source: str = "caption"  # caption: the manifest caption, else the class template | class: the reverse
    hint: str | None = None  # the command that creates missing weights, shown in the 'needs' record
    random_init: bool = False  # tests and benchmarks only: random weights, recorded as such


LPIPS_NETS = ("auto", "alex", "vgg", "stlpips_alex", "alexnet", "vgg16")  # the last two: aliases


@dataclass
class LpipsSettings:
    """Perceptual distance of LPIPS fidelity / diversity.

    ``net``: ``alex`` | ``vgg`` (standard LPIPS v0.1, needs the torchvision ImageNet trunk file), ``stlpips_alex``
    (ST-LPIPS, weights bundled in the ``stlpips-pytorch`` wheel) or ``auto``: standard LPIPS alex when its trunk
    file is here, else ST-LPIPS (only when ``backbone_weights`` is unset: a configured file that is missing stays an
    'unavailable' record). Which one ran is in metrics.json (``protocol.models.lpips``, each result's ``model``);
    ST-LPIPS values are not comparable with LPIPS values.
    """

    net: str = "auto"  # auto | alex | vgg | stlpips_alex
    backbone_weights: str | None = None  # torchvision ImageNet trunk; default: the torch hub cache file
    random_backbone: bool = False  # tests and benchmarks only (standard LPIPS with a random trunk)


@dataclass
class FeatureSettings:
    """Feature space of FD and CMMD."""

    space: str = "clip"  # clip (the `clip` backbone) | inception (torchvision Inception-v3, `inception_weights`)
    inception_weights: str | None = None
    cmmd_sigma: float = 10.0
    cmmd_estimator: str = "unbiased"  # unbiased (U-statistic) | biased (google-research/cmmd's code)


@dataclass
class EvalConfig:
    """Evaluate sample folders (PNG + manifest.jsonl) against each other and against a reference folder."""

    samples: list[str] = field(default_factory=list)  # sample folders; with `suite`, generated ones are added
    names: list[str] | None = None  # one per folder; default: the folder names
    reference: str | None = None  # a reference folder (data or teacher samples); any resolution handling below
    reference_name: str = "reference"
    baseline: str | None = None  # sample set the others pair with (teacher); default: the first of >= 2 sets
    out_dir: str | None = None  # default: the suite's out_dir, else runs/eval
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    clip: ClipSettings = field(default_factory=ClipSettings)
    lpips: LpipsSettings = field(default_factory=LpipsSettings)
    features: FeatureSettings = field(default_factory=FeatureSettings)
    spectral_bins: int = 64
    hf_cutoff: float = 0.5  # rho cutoff of the HF gap and of the paired log hf ratio
    diversity_max_per_group: int = 8  # LPIPS diversity uses the first K images of each class / prompt
    bootstrap: int = 1000  # resamples for every CI
    bootstrap_fd: int = 200  # resamples for FD (one matrix square root each)
    confidence: float = 0.95
    seed: int = 0
    strict: bool = False  # a metric whose backbone is missing is an error instead of an 'available: false' record
    resize_reference: bool = False  # resize a reference at another resolution to the samples' resolution
    resize_filter: str = "lanczos"
    suite: str | None = None  # a protocol YAML (eval/suites/*.yaml): generate what is missing, then evaluate
    batch_size: int = 32
    device: str = "auto"  # auto | cpu | cuda
    report: bool = True  # write report.html (+ plot PNGs) next to metrics.json
    grid_per_group: int = 4  # images per class / prompt in the report's grids
    bench_json: str | None = None  # output of eval/bench_metrics.py, copied into metrics.json and the report

    def __post_init__(self) -> None:
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise UserError(f"eval metrics {bad} are unknown; choose from {list(METRICS)}")
        if self.names is not None and len(self.names) != len(self.samples):
            raise UserError(f"eval names has {len(self.names)} entries for {len(self.samples)} sample folders; "
                            "give one name per folder or omit names")
        if self.resize_filter not in RESIZE_FILTERS:
            raise UserError(f"resize_filter={self.resize_filter!r} is not one of {list(RESIZE_FILTERS)}")
        if self.lpips.net not in LPIPS_NETS:
            raise UserError(f"lpips.net={self.lpips.net!r} must be one of {list(LPIPS_NETS)}")
        if self.clip.text_source not in ("caption", "class"):
            raise UserError(f"clip.text_source={self.clip.text_source!r} must be 'caption' or 'class'")
        if self.features.space not in ("clip", "inception"):
            raise UserError(f"features.space={self.features.space!r} must be 'clip' or 'inception'")
        if self.bootstrap < 1 or self.bootstrap_fd < 1 or not 0 < self.confidence < 1:
            raise UserError("bootstrap and bootstrap_fd must be >= 1 and 0 < confidence < 1")
        if not 0 < self.hf_cutoff < 1:
            raise UserError(f"hf_cutoff={self.hf_cutoff} must lie in (0, 1) (a fraction of Nyquist)")
        for key, least in (("batch_size", 1), ("spectral_bins", 1), ("grid_per_group", 1),
                           ("diversity_max_per_group", 2)):  # diversity averages over pairs within a group
            if getattr(self, key) < least:
                raise UserError(f"{key}={getattr(self, key)} must be >= {least}")
