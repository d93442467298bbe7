"""``dmd-dar train-clip``: a small open_clip CLIP trained contrastively on the embedded procedural dataset.

No pretrained CLIP can be downloaded on our machines, so CLIP score / CLIP features on the embedded data come from
this in-domain model. It is an ordinary ``open_clip.CLIP`` saved as an open_clip ``local-dir:`` folder:

    <out_dir>/model.safetensors      weights (fp16 by default; loaded into an fp32 model)
    <out_dir>/open_clip_config.json  {"model_cfg": ..., "preprocess_cfg": ..., "dmd_dar": training record}
    <out_dir>/metrics.json           held-out zero-shot class accuracy and caption retrieval

Load it with :func:`load_embedded_clip` (an :class:`~dmd_dar.metrics.clip_score.OpenClipModel` built with
``model_config=<out_dir>/open_clip_config.json``), or directly with
``open_clip.create_model_and_transforms("local-dir:<out_dir>")`` (open_clip finds ``model.safetensors`` there).

Batches are composed so that every negative is informative and no negative is a false one: a batch is
``pairs_per_batch`` distinct (foreground, background) colour pairs x all 8 classes, so each caption in it is
unique, every class appears with many colour pairs and every colour pair with every class. A fraction of the texts
are class-only prompts ("a photo of <class phrase>"); those match every image of their class, which the loss
handles with multi-positive (row-normalised) targets instead of treating same-class images as negatives.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dmd_dar.data.procedural import CLASS_NAMES, CLASS_PHRASES, COLOR_NAMES, ProceduralImages
from dmd_dar.errors import UserError
from dmd_dar.metrics.clip_config import ClipArchConfig
from dmd_dar.metrics.clip_score import OpenClipModel
from dmd_dar.training.seeding import derive_seed
from dmd_dar.utils.io import atomic_save_safetensors, atomic_write_json

PACKAGED_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "open_clip_config.json"
METRICS_FILE = "metrics.json"
CLASS_PROMPT = "a photo of {}"
DEPICTS_PREFIX = "A photo depicts "  # the DMD2 CLIP-score prefix (dmd_dar.metrics.clip_score.DMD2_PREFIX)
REPRODUCE = "dmd-dar train-clip -c clip_embedded.yaml"


@dataclass
class TrainClipConfig:
    """``dmd-dar train-clip`` settings.

    out_dir:          output folder; None = the packaged ``dmd_dar/assets/clip``.
    steps, batch_size: optimisation length; batch_size must be a multiple of the number of classes (8).
    p_prefixed:       fraction of texts written "A photo depicts <caption>" (the DMD2 CLIP-score prefix).
    p_class_prompt:   fraction of texts that are class-only prompts "a photo of <class phrase>" (zero-shot).
    pool_size:        train-split items scanned once to group indices by (colour pair, class).
    eval_size:        held-out images for the metrics (retrieval pool size).
    storage_dtype:    fp16 | fp32 for model.safetensors.
    threads:          torch intra-op threads (0 = leave torch's default).
    """

    out_dir: str | None = None
    seed: int = 0
    steps: int = 800
    batch_size: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.1
    warmup_steps: int = 50
    grad_clip: float = 1.0
    p_prefixed: float = 0.2
    p_class_prompt: float = 0.2
    pool_size: int = 100_000
    eval_size: int = 1000
    eval_seed: int = 0
    storage_dtype: str = "fp16"
    threads: int = 0
    log_every: int = 25
    clip: ClipArchConfig = field(default_factory=ClipArchConfig)

    def __post_init__(self) -> None:
        if isinstance(self.clip, dict):
            self.clip = ClipArchConfig(**self.clip)
        n = len(CLASS_NAMES)
        if self.batch_size < n or self.batch_size % n:
            raise UserError(f"batch_size={self.batch_size} must be a positive multiple of the {n} classes")
        if self.storage_dtype not in ("fp16", "fp32"):
            raise UserError(f"storage_dtype={self.storage_dtype!r}: choose fp16 or fp32")
        if not (0 <= self.p_prefixed and 0 <= self.p_class_prompt and self.p_prefixed + self.p_class_prompt <= 1):
            raise UserError("p_prefixed and p_class_prompt must be >= 0 and sum to at most 1")
        if self.steps < 1 or self.eval_size < 2 or self.pool_size < 8 * len(CLASS_NAMES):
            raise UserError("steps must be >= 1, eval_size >= 2 and pool_size >= 64")


# ---- model ------------------------------------------------------------------------------------------------------
def build_clip(arch: ClipArchConfig, seed: int = 0):
    """A freshly initialised ``open_clip.CLIP`` for ``arch`` (deterministic in ``seed``)."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(**arch.model_cfg())


def normalize_images(images: torch.Tensor, arch: ClipArchConfig) -> torch.Tensor:
    """[-1, 1] images at the model's resolution -> the tensor open_clip's eval transform would produce.

    Quantises to uint8 as :func:`~dmd_dar.metrics.clip_score.to_pil` does (training sees what evaluation sees).
    """
    if images.shape[-1] != arch.image_size or images.shape[-2] != arch.image_size:
        raise UserError(f"train-clip renders {arch.image_size}px images, got {tuple(images.shape[-2:])}")
    x = ((images.clamp(-1, 1) + 1) * 127.5).round() / 255.0  # [B, 3, H, W] in [0, 1]
    mean = torch.tensor(arch.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(arch.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def save_clip(model, arch: ClipArchConfig, out_dir: str | Path, storage_dtype: str = "fp16",
              record: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``open_clip_config.json`` atomically; returns the folder."""
    out = Path(out_dir)
    dtype = torch.float16 if storage_dtype == "fp16" else torch.float32
    sd = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}
    atomic_save_safetensors(sd, out / WEIGHTS_FILE, metadata={"format": "pt", "storage_dtype": storage_dtype})
    atomic_write_json({"model_cfg": arch.model_cfg(), "preprocess_cfg": arch.preprocess_cfg(),
                       "dmd_dar": record or {}}, out / CONFIG_FILE)
    return out


def load_embedded_clip(folder: str | Path | None = None, device: str | torch.device = "cpu"):
    """The in-domain CLIP as an :class:`OpenClipModel` (no pre-resize: images go straight to open_clip's eval
    transform, which is the identity resize for 32 x 32 inputs). ``folder`` defaults to the packaged asset."""
    folder = Path(folder) if folder is not None else PACKAGED_DIR
    return OpenClipModel(pretrained=None, weights_file=folder / WEIGHTS_FILE, model_config=folder / CONFIG_FILE,
                         pre_resize=None, device=device)


# ---- data -------------------------------------------------------------------------------------------------------
class BatchComposer:
    """Index batches of ``pairs`` distinct colour pairs x every class, from a scanned pool of train indices."""

    def __init__(self, data: ProceduralImages, pool_size: int) -> None:
        self.data = data
        n_cls = len(data.class_ids)
        cells: dict[tuple[int, int, int], list[int]] = {}
        for i in range(pool_size):
            d = data.describe(i)
            key = (COLOR_NAMES.index(d["fg"]), COLOR_NAMES.index(d["bg"]), d["class_id"])
            cells.setdefault(key, []).append(i)
        self.cells = {k: np.asarray(v) for k, v in cells.items()}
        pairs = sorted({(fg, bg) for fg, bg, _ in cells})
        # Only pairs seen with every class in the pool, so each batch row block is complete.
        self.pairs = [p for p in pairs if all((*p, c) in self.cells for c in data.class_ids)]
        self.num_classes = n_cls

    def batch(self, rng: np.random.Generator, pairs_per_batch: int) -> list[int]:
        if pairs_per_batch > len(self.pairs):
            raise UserError(f"batch_size needs {pairs_per_batch} distinct colour pairs but the pool has "
                            f"{len(self.pairs)} complete ones; lower batch_size or raise pool_size")
        chosen = rng.choice(len(self.pairs), size=pairs_per_batch, replace=False)
        out = []
        for p in chosen:
            for c in self.data.class_ids:
                cell = self.cells[(*self.pairs[p], c)]
                out.append(int(cell[rng.integers(len(cell))]))
        return out


def make_texts(data: ProceduralImages, indices: list[int], rng: np.random.Generator, p_prefixed: float,
               p_class_prompt: float) -> tuple[list[str], torch.Tensor]:
    """Texts for a batch and the [B, B] compatibility matrix M[i, j] = text j truly describes image i."""
    desc = [data.describe(i) for i in indices]
    u = rng.random(len(indices))
    texts, class_only = [], []
    for d, r in zip(desc, u):
        if r < p_class_prompt:
            texts.append(CLASS_PROMPT.format(CLASS_PHRASES[d["class_name"]]))
            class_only.append(True)
        else:
            texts.append((DEPICTS_PREFIX if r < p_class_prompt + p_prefixed else "") + d["caption"])
            class_only.append(False)
    cls = torch.tensor([d["class_id"] for d in desc])
    col = torch.tensor([COLOR_NAMES.index(d["fg"]) * 64 + COLOR_NAMES.index(d["bg"]) for d in desc])
    same_cls = cls[:, None] == cls[None, :]  # [B, B]
    same_col = col[:, None] == col[None, :]
    compat = same_cls & (same_col | torch.tensor(class_only)[None, :])
    return texts, compat


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                             compat: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: each image's target is uniform over the texts that describe it, and
    each text's over the images it describes (equals the CLIP loss when ``compat`` is the identity)."""
    img = F.normalize(img, dim=-1)
    txt = F.normalize(txt, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.t()  # [B, B]
    m = compat.float()
    loss_i = -(m / m.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(m / m.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return 0.5 * (loss_i + loss_t)


# ---- evaluation -------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_clip(clip_model, n: int = 1000, seed: int = 0, size: int = 32) -> dict[str, Any]:
    """Held-out zero-shot class accuracy and caption retrieval of an :class:`OpenClipModel`.

    zero-shot: argmax over the 8 prompts "a photo of <class phrase>". Retrieval in a pool of ``n`` held-out
    (image, caption) pairs, R@1/R@5; a retrieved caption counts as correct when it is the same string (the pool
    can hold duplicate captions); ``*_colour_order_free`` also accepts the caption with fg/bg swapped. Also
    reported: the matched / mismatched cosine (the CLIP-score scale).
    """
    data = ProceduralImages("heldout", length=n, size=size, seed=seed)
    images, labels, captions = data.render(range(n))
    img = clip_model.encode_images(images)  # [N, D] float64, normalised
    prompts = [CLASS_PROMPT.format(CLASS_PHRASES[c]) for c in CLASS_NAMES]
    cls_emb = clip_model.encode_texts(prompts, prefix="")
    zs_pred = (img @ cls_emb.t()).argmax(1)
    per_class = {CLASS_NAMES[c]: float((zs_pred[labels == c] == c).double().mean()) for c in range(len(CLASS_NAMES))
                 if bool((labels == c).any())}
    out: dict[str, Any] = {"n": n, "split": "heldout", "seed": seed,
                           "zero_shot": {"prompt": CLASS_PROMPT, "accuracy": float((zs_pred == labels).double().mean()),
                                         "chance": 1 / len(CLASS_NAMES), "per_class": per_class}}
    # caption identity classes: equal strings are interchangeable
    ids = {c: k for k, c in enumerate(dict.fromkeys(captions))}
    cap_id = torch.tensor([ids[c] for c in captions])
    # the same class and colour set, ignoring which colour is foreground (ambiguous for symmetric patterns)
    descs = [data.describe(i) for i in range(n)]
    loose = {key: k for k, key in enumerate(dict.fromkeys((d["class_id"], frozenset((d["fg"], d["bg"])))
                                                           for d in descs))}
    loose_id = torch.tensor([loose[(d["class_id"], frozenset((d["fg"], d["bg"])))] for d in descs])
    for name, prefix in (("retrieval", ""), ("retrieval_depicts_prefix", DEPICTS_PREFIX)):
        txt = clip_model.encode_texts(captions, prefix=prefix)
        sim = img @ txt.t()  # [N, N]
        top5_t = sim.topk(5, dim=1).indices  # image -> text
        top5_i = sim.topk(5, dim=0).indices.t()  # text -> image
        hit_t = cap_id[top5_t] == cap_id[:, None]
        hit_i = cap_id[top5_i] == cap_id[:, None]
        loose_t = loose_id[top5_t[:, 0]] == loose_id
        diag = sim.diagonal()
        off = (sim.sum() - diag.sum()) / (n * n - n)
        out[name] = {"prefix": prefix, "image_to_text_r1": float(hit_t[:, 0].double().mean()),
                     "image_to_text_r5": float(hit_t.any(1).double().mean()),
                     "text_to_image_r1": float(hit_i[:, 0].double().mean()),
                     "text_to_image_r5": float(hit_i.any(1).double().mean()),
                     "image_to_text_r1_colour_order_free": float(loose_t.double().mean()),
                     "distinct_captions": len(ids), "chance_r1": 1 / n,
                     "matched_cos": float(diag.mean()), "mismatched_cos": float(off)}
    out["protocol"] = clip_model.protocol()
    return out


# ---- training ---------------------------------------------------------------------------------------------------
def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # open_clip's rule: no decay on gains, biases, logit scale, embeddings with ndim < 2
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, cfg: TrainClipConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(cfg: TrainClipConfig, progress: bool = True) -> tuple[Any, list[float]]:
    """Train a CLIP for ``cfg`` -> (model in eval mode, per-step losses). Deterministic in ``cfg.seed``."""
    import open_clip

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    arch = cfg.clip
    data = ProceduralImages("train", length=max(cfg.pool_size, 1), size=arch.image_size, seed=cfg.seed)
    composer = BatchComposer(data, cfg.pool_size)
    tokenizer = open_clip.tokenize  # open_clip's bundled BPE (SimpleTokenizer)
    model = build_clip(arch, cfg.seed).train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    pairs_per_batch = cfg.batch_size // len(CLASS_NAMES)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="train-clip", unit="step", disable=not progress)
    for step in bar:
        rng = np.random.default_rng(derive_seed(cfg.seed, "train-clip", step))
        torch.manual_seed(derive_seed(cfg.seed, "train-clip-torch", step))
        idx = composer.batch(rng, pairs_per_batch)
        images, _, _ = data.render(idx)
        texts, compat = make_texts(data, idx, rng, cfg.p_prefixed, cfg.p_class_prompt)
        tokens = tokenizer(texts, context_length=arch.context_length)  # [B, ctx]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        img_f = model.encode_image(normalize_images(images, arch))
        txt_f = model.encode_text(tokens)
        loss = multi_positive_clip_loss(img_f, txt_f, model.logit_scale, compat)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-cfg.log_every:]):.3f}", scale=f"{model.logit_scale.exp():.1f}")
    return model.eval(), losses


def run(cfg: TrainClipConfig) -> Path:
    """Train, save (weights + open_clip config), reload through :func:`load_embedded_clip`, evaluate, write
    metrics.json; returns the output folder."""
    out = Path(cfg.out_dir) if cfg.out_dir is not None else PACKAGED_DIR
    t0 = time.time()
    model, losses = train(cfg)
    minutes = (time.time() - t0) / 60
    record = {"reproduce": REPRODUCE, "config": _plain(asdict(cfg)), "train_minutes": round(minutes, 2),
              "final_loss_mean_last50": float(np.mean(losses[-50:])), "first_loss": losses[0],
              "torch": torch.__version__}
    save_clip(model, cfg.clip, out, cfg.storage_dtype, record)
    metrics = evaluate_clip(load_embedded_clip(out), n=cfg.eval_size, seed=cfg.eval_seed, size=cfg.clip.image_size)
    metrics["training"] = record
    atomic_write_json(metrics, out / METRICS_FILE)
    zs, rt = metrics["zero_shot"]["accuracy"], metrics["retrieval"]
    print(f"train-clip: {out} | zero-shot class acc {zs:.3f} | caption R@1 i->t {rt['image_to_text_r1']:.3f} "
          f"t->i {rt['text_to_image_r1']:.3f} (pool {cfg.eval_size}) | {minutes:.1f} min")
    return out


def _plain(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, tuple | list):
        return [_plain(v) for v in d]
    return d
