"""CLIP score with open_clip, loaded only from local files, plus CLIP image features for FD / CMMD.

Defaults follow DMD2 / GigaGAN: ``ViT-g-14`` / ``laion2b_s12b_b42k``, captions prefixed with ``"A photo depicts "``,
images centre-cropped to a square and LANCZOS-resized to 256 before open_clip's own eval preprocessing, fp32,
score = raw mean cosine (x1, no clamp). ``compute()`` also reports, from the same per-sample cosines:

- ``x100``: ``100 * mean(cos)``, unclamped;
- ``torchmetrics_x100``: ``max(100 * mean(cos), 0)``: torchmetrics clamps the *mean*, not each sample;
- ``hessel``: ``2.5 * mean(max(cos, 0))``: Hessel et al.'s CLIP-S clamps each sample.

Never silently wrong:

- Weights come from ``weights_file=`` (``.safetensors``; ``.bin``/``.pt`` via ``torch.load(weights_only=True)``)
  or from a pre-filled Hugging Face / open_clip cache for the tag; nothing is ever downloaded. If neither exists,
  :class:`MetricUnavailable` names the file to provide.
- With a file, the *tag's* preprocessing (mean/std, interpolation, resize mode) and activation are applied
  explicitly; open_clip alone would fall back to the architecture defaults.
- Tags trained with QuickGELU (OpenAI's) force QuickGELU (the ``-quickgelu`` architecture), since the weights
  load into either activation without any error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from dmd_dar.errors import UserError
from dmd_dar.metrics._accum import SampleAccumulator
from dmd_dar.metrics.availability import MetricUnavailable
from dmd_dar.metrics.pairing import group_summary
from dmd_dar.metrics.protocol import file_fingerprint, package_versions

DEFAULT_MODEL = "ViT-g-14"
DEFAULT_TAG = "laion2b_s12b_b42k"
DMD2_PREFIX = "A photo depicts "
DMD2_PRE_RESIZE = 256
_HF_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _tag_cfg(model_name: str, tag: str | None) -> dict[str, Any]:
    import open_clip

    if tag is None:
        return {}
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        raise UserError(f"open_clip has no pretrained tag '{tag}' for model '{model_name}' (known: {known}); "
                        "pass weights_file= with pretrained=None, or a known tag")
    return cfg


def cached_weights_path(model_name: str, tag: str, cache_dir: str | None = None) -> tuple[str | None, str]:
    """(local file for ``model_name``/``tag`` if it is already cached, else None; a description of where it
    would be). Looks only at the disk: the Hugging Face cache (``cache_dir`` or ``HF_HUB_CACHE``) or, for URL
    tags, open_clip's ``~/.cache/clip``."""
    cfg = _tag_cfg(model_name, tag)
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, fname = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = [fname] if fname else list(_HF_NAMES)
        if fname.endswith((".bin", ".pth")):
            names.insert(0, fname[:-4] + ".safetensors")
        for name in names:
            p = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(p, str) and os.path.isfile(p):
                return p, p
        where = cache_dir or constants.HF_HUB_CACHE
        return None, f"Hugging Face cache file '{names[0]}' of repo '{repo}' under {where} (HF_HUB_OFFLINE=1)"
    url = cfg.get("url", "")
    target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
    return (target if os.path.isfile(target) else None), target


_LOCAL_CONFIG_DIR: str | None = None


def register_model_config(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """Register a local open_clip architecture JSON (flat, or ``open_clip_config.json`` style with ``model_cfg``
    and ``preprocess_cfg``) under a name derived from its path; returns ``(name, preprocess_cfg)``."""
    import open_clip

    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise MetricUnavailable("clip_score", path, "open_clip model config JSON not found")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable open_clip config JSON ({err}); fix or regenerate it") from err
    cfg = raw.get("model_cfg", raw) if isinstance(raw, dict) else None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UserError(f"{path}: an open_clip config needs 'embed_dim', 'vision_cfg' and 'text_cfg' "
                        "(top level or under 'model_cfg')")
    global _LOCAL_CONFIG_DIR
    if _LOCAL_CONFIG_DIR is None:  # open_clip registers configs from files named <model name>.json
        _LOCAL_CONFIG_DIR = tempfile.mkdtemp(prefix="dmd_dar_open_clip_")
    name = "local-" + hashlib.sha1(path.encode()).hexdigest()[:10]
    cfg_file = os.path.join(_LOCAL_CONFIG_DIR, f"{name}.json")
    with open(cfg_file, "w", encoding="utf-8") as fh:
        json.dump(cfg, fh)
    open_clip.add_model_config(cfg_file)
    return name, dict(raw.get("preprocess_cfg", {})) if "model_cfg" in raw else {}


def _center_crop_square(img: Any) -> Any:
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def to_pil(images: torch.Tensor) -> list[Any]:
    """Images ``[N, 3, H, W]`` in [-1, 1] -> uint8 RGB PIL images (rounded, as when saved to PNG)."""
    from PIL import Image

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [N, 3, H, W]
    return [Image.fromarray(i.permute(1, 2, 0).numpy(), "RGB") for i in x]


class OpenClipModel:
    """An open_clip model + tokenizer + eval transform, loaded from local files only.

    ``pretrained`` is the tag (it decides preprocessing and QuickGELU, and locates cached weights);
    ``weights_file`` a local checkpoint (overrides the cache). ``random_init=True`` (tests only) builds the
    architecture with random weights. ``pre_resize`` (DMD2: 256) centre-crops to a square and LANCZOS-resizes
    before open_clip's transform; ``None`` skips it. ``image_resize_mode`` overrides the tag's resize mode
    (``"squash"`` for CMMD). ``model_config`` is a local architecture JSON (e.g. the in-domain model's
    ``open_clip_config.json``) that replaces ``model_name``; its ``preprocess_cfg`` applies when no tag does.
    """

    def __init__(self, model_name: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_TAG,
                 weights_file: str | os.PathLike | None = None, cache_dir: str | None = None,
                 pre_resize: int | None = DMD2_PRE_RESIZE, image_resize_mode: str | None = None,
                 quick_gelu: bool | None = None, device: str | torch.device = "cpu",
                 random_init: bool = False, model_config: str | os.PathLike | None = None) -> None:
        import open_clip

        file_pp: dict[str, Any] = {}
        self._config_file = None
        if model_config is not None:
            model_name, file_pp = register_model_config(model_config)
            self._config_file = file_fingerprint(model_config)
        self.model_name = model_name
        self.tag = pretrained
        tag_cfg = _tag_cfg(model_name, pretrained)
        arch_cfg = open_clip.get_model_config(model_name)
        if arch_cfg is None:
            raise UserError(f"unknown open_clip model '{model_name}'; register a config with "
                            "open_clip.add_model_config(path) or use one of open_clip.list_models()")
        if random_init:
            path = None
            self._weights: dict[str, Any] = {"random_init": True, "note": "tests only"}
        else:
            if weights_file is not None:
                path = os.fspath(weights_file)
                if not os.path.isfile(path):
                    raise MetricUnavailable("clip_score", path, "open_clip weights file not found")
            elif pretrained is not None:
                path, where = cached_weights_path(model_name, pretrained, cache_dir)
                if path is None:
                    raise MetricUnavailable("clip_score", f"weights_file=<{model_name} {pretrained} checkpoint> "
                                            f"or {where}", "no downloads are made")
            else:
                raise UserError("OpenClipModel needs weights_file= or a pretrained tag (or random_init=True)")
            self._weights = {**file_fingerprint(path), "tag": pretrained}
        arch_quick = bool(arch_cfg.get("quick_gelu", False))
        want_quick = bool(tag_cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
        if arch_quick and quick_gelu is False:
            raise UserError(f"'{model_name}' is a QuickGELU architecture but quick_gelu=False was asked; "
                            "use the model name without '-quickgelu'")
        pp = {k: v for k, v in file_pp.items() if k in ("mean", "std", "interpolation", "resize_mode")}
        pp.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg})
        if image_resize_mode is not None:
            pp["resize_mode"] = image_resize_mode
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=path, device=device, precision="fp32", force_quick_gelu=want_quick,
            image_mean=pp.get("mean"), image_std=pp.get("std"), image_interpolation=pp.get("interpolation"),
            image_resize_mode=pp.get("resize_mode"), weights_only=True)
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)
        self.pre_resize = pre_resize
        self.quick_gelu = arch_quick or want_quick
        self._pp_cfg = dict(getattr(model.visual, "preprocess_cfg", {}))

    @property
    def name(self) -> str:
        return f"open_clip:{self.model_name}" + (f"/{self.tag}" if self.tag else "")

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] tensors -> uint8 PIL -> (DMD2 square crop + LANCZOS ``pre_resize``) -> open_clip eval
        transform -> ``[N, 3, S, S]`` normalised float32."""
        from PIL import Image

        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"CLIP metrics take RGB images [N, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        pils = to_pil(images)
        if self.pre_resize is not None:
            pils = [_center_crop_square(p).resize((self.pre_resize, self.pre_resize), Image.LANCZOS) for p in pils]
        return torch.stack([self.preprocess(p) for p in pils])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """L2-normalised image embeddings ``[N, D]`` (float64) of images in [-1, 1]."""
        out = []
        for i in range(0, images.shape[0], batch_size):
            x = self.prepare_images(images[i:i + batch_size]).to(self.device)
            out.append(self.model.encode_image(x).double().cpu())
        e = torch.cat(out)
        return e / e.norm(dim=-1, keepdim=True)

    def tokenize(self, captions: Sequence[str], prefix: str = DMD2_PREFIX) -> torch.Tensor:
        """Token ids ``[N, context]`` of ``prefix + caption`` (truncated, EOT kept last, as DMD2 does)."""
        return self.tokenizer([prefix + c for c in captions])

    @torch.no_grad()
    def encode_texts(self, captions: Sequence[str], prefix: str = DMD2_PREFIX, batch_size: int = 64) -> torch.Tensor:
        """L2-normalised text embeddings ``[N, D]`` (float64) of ``prefix + caption``."""
        out = []
        for i in range(0, len(captions), batch_size):
            tok = self.tokenize(captions[i:i + batch_size], prefix).to(self.device)
            out.append(self.model.encode_text(tok).double().cpu())
        e = torch.cat(out)
        return e / e.norm(dim=-1, keepdim=True)

    def protocol(self) -> dict[str, Any]:
        return {
            "model": self.model_name, "model_config": self._config_file, "pretrained_tag": self.tag,
            "weights": self._weights,
            "activation": "QuickGELU" if self.quick_gelu else "GELU", "precision": "fp32",
            "preprocess": {"input": "[-1, 1] float -> uint8 RGB (rounded)",
                           "pre_resize": None if self.pre_resize is None else
                           {"size": self.pre_resize, "crop": "centre square", "filter": "PIL LANCZOS"},
                           "open_clip": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._pp_cfg.items()},
                           "transform": repr(self.preprocess)},
            "versions": package_versions(),
        }


def clip_cosines(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine ``[N]`` between paired image and text embeddings (normalised here, float64)."""
    a, b = image_emb.double(), text_emb.double()
    if a.shape != b.shape:
        raise UserError(f"CLIP score needs one caption per image, got {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a / a.norm(dim=-1, keepdim=True) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)


def summarize_cosines(cos: torch.Tensor) -> dict[str, Any]:
    """All CLIP-score conventions from per-sample cosines (see the module docstring)."""
    c = torch.as_tensor(cos, dtype=torch.float64)
    mean = float(c.mean())
    return {"n": c.numel(), "mean_cos": mean, "std_cos": float(c.std()) if c.numel() > 1 else math.nan,
            "x100": 100.0 * mean, "torchmetrics_x100": max(100.0 * mean, 0.0),
            "hessel": 2.5 * float(c.clamp_min(0).mean()),
            "conventions": {"mean_cos": "raw mean cosine, x1, no clamp (DMD2/GigaGAN)",
                            "x100": "100 * mean cosine, no clamp",
                            "torchmetrics_x100": "max(100 * mean cosine, 0): clamp of the mean (torchmetrics 1.9)",
                            "hessel": "2.5 * mean(max(cos, 0)): per-sample clamp (Hessel et al. 2021)"}}


def clip_score(model: OpenClipModel, images: torch.Tensor, captions: Sequence[str],
               prefix: str = DMD2_PREFIX) -> torch.Tensor:
    """Per-sample CLIP cosines ``[N]`` between images (in [-1, 1]) and ``prefix + caption``."""
    if len(captions) != images.shape[0]:
        raise UserError(f"CLIP score got {images.shape[0]} images but {len(captions)} captions")
    return clip_cosines(model.encode_images(images), model.encode_texts(list(captions), prefix))


class ClipScore(SampleAccumulator):
    """Accumulates per-sample CLIP cosines; ``compute()`` -> every convention, per-group means and protocol."""

    def __init__(self, model: OpenClipModel, prefix: str = DMD2_PREFIX) -> None:
        super().__init__({"metric": "clip_score", "model": model.name, "prefix": prefix})
        self.model = model
        self.prefix = prefix

    def update(self, images: torch.Tensor, captions: Sequence[str], keys: Sequence[Hashable] | None = None,
               groups: Sequence[Hashable] | None = None) -> None:
        self._append({"cos": clip_score(self.model, images, captions, self.prefix)}, keys, groups)

    def compute(self) -> dict[str, Any]:
        cos = self.values("cos")
        if cos.numel() == 0:
            raise UserError("ClipScore.compute() called before any update()")
        out = summarize_cosines(cos)
        if any(g is not None for g in self.groups):
            out["per_group"] = group_summary(cos, self.groups)
        out["protocol"] = {**self.model.protocol(), "prefix": self.prefix}
        return out


class ClipImageFeatures:
    """:class:`~dmd_dar.metrics.distribution.FeatureExtractor` of L2-normalised open_clip image embeddings
    (for CMMD use ``ViT-L-14-336`` / ``openai``, ``image_resize_mode="squash"``, ``pre_resize=None``)."""

    def __init__(self, model: OpenClipModel) -> None:
        self.model = model
        self.name = f"{model.name}:image_embeds_l2"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(images)

    def protocol(self) -> dict[str, Any]:
        return {"name": self.name, "normalized": True, **self.model.protocol()}


def cmmd_clip_model(weights_file: str | os.PathLike | None = None, cache_dir: str | None = None,
                    device: str | torch.device = "cpu") -> OpenClipModel:
    """The CMMD paper's embedding model: CLIP ViT-L/14@336 (OpenAI, QuickGELU), bicubic squash to 336."""
    return OpenClipModel("ViT-L-14-336", "openai", weights_file=weights_file, cache_dir=cache_dir, pre_resize=None,
                         image_resize_mode="squash", device=device)
