"""Text embeddings: computed once per (model, prompt), cached on disk as safetensors, text encoders freed after.

Layout: ``<cache_dir>/<key[:2]>/<key>.safetensors`` with ``key = sha256(model identity, prompt)``; one file per
prompt holds that prompt's condition tensors without a batch dimension (e.g. ``prompt_embeds`` [S, D],
``pooled_prompt_embeds`` [P]). The model identity covers the source (path or hub id + revision), the family, the
maximum sequence length and a fingerprint of the text encoders' and tokenizers' files, so a changed encoder never
reuses stale embeddings.

Conditions are batched by :func:`stack_conditions`: families whose encoders return variable-length, masked
embeddings (PixArt, Qwen-Image) are padded to the longest prompt in the batch with a zero mask.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from dmd_dar.t2i.families import Family
from dmd_dar.utils.io import atomic_save_safetensors, load_safetensors

DEFAULT_CACHE = "~/.cache/dmd_dar/text_embeds"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DMD_DAR_TEXT_CACHE", DEFAULT_CACHE)).expanduser()


def encoder_fingerprint(source: str, components: list[str]) -> str:
    """Hash of the text encoder / tokenizer files of a local pipeline folder (names, sizes, small files' bytes)."""
    root = Path(source)
    h = hashlib.sha256()
    if not root.is_dir():
        return ""
    for comp in sorted(components):
        folder = root / comp
        if not folder.is_dir():
            continue
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                size = f.stat().st_size
                h.update(f"{f.relative_to(root)}:{size}".encode())
                if size < 1 << 20:
                    h.update(f.read_bytes())
    return h.hexdigest()[:16]


class EmbeddingCache:
    """Per-prompt condition tensors on disk, keyed by ``sha256(identity, prompt)``."""

    def __init__(self, cache_dir: str | Path, identity: dict) -> None:
        self.root = Path(cache_dir).expanduser()
        self.identity = json.dumps(identity, sort_keys=True)
        self.hits = 0
        self.misses = 0

    def key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.identity}\0{prompt}".encode()).hexdigest()[:40]

    def path(self, prompt: str) -> Path:
        k = self.key(prompt)
        return self.root / k[:2] / f"{k}.safetensors"

    def missing(self, prompts: list[str]) -> list[str]:
        return [p for p in dict.fromkeys(prompts) if not self.path(p).is_file()]

    def get(self, prompt: str) -> dict[str, torch.Tensor]:
        return load_safetensors(self.path(prompt))

    def fill(self, prompts: list[str], encode: Callable[[list[str]], list[dict[str, torch.Tensor]]],
             batch_size: int = 16) -> int:
        """Encode and store every prompt not cached yet; returns how many were computed."""
        todo = self.missing(prompts)
        self.hits += len(dict.fromkeys(prompts)) - len(todo)
        self.misses += len(todo)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            for prompt, tensors in zip(chunk, encode(chunk), strict=True):
                path = self.path(prompt)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
        return len(todo)


@torch.no_grad()
def encode_with_pipeline(pipe, family: Family, prompts: list[str], max_sequence_length: int,
                         device) -> list[dict[str, torch.Tensor]]:
    """Per-prompt condition dicts computed by the pipeline's own ``encode_prompt`` (no batch dimension)."""
    name = family.name
    if name == "sd3":
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
        return [{"prompt_embeds": pe[i], "pooled_prompt_embeds": pooled[i]} for i in range(len(prompts))]
    if name == "flux":
        pe, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                           max_sequence_length=max_sequence_length)
        return [{"prompt_embeds": pe[i], "pooled_prompt_embeds": pooled[i]} for i in range(len(prompts))]
    if name == "qwenimage":
        out = []
        for p in prompts:  # one at a time: the encoder trims to the batch's longest prompt
            pe, mask = pipe.encode_prompt(prompt=[p], device=device, max_sequence_length=max_sequence_length)
            n = pe.shape[1] if mask is None else int(mask[0].sum())
            out.append({"prompt_embeds": pe[0, :n], "prompt_embeds_mask": torch.ones(n, dtype=torch.long)})
        return out
    if name == "pixart":
        pe, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                            clean_caption=False, max_sequence_length=max_sequence_length)
        out = []
        for i in range(len(prompts)):
            n = max(int(mask[i].sum()), 1)  # keep the padded length short; batching pads again
            out.append({"prompt_embeds": pe[i, :n], "attention_mask": mask[i, :n].long()})
        return out
    raise AssertionError(f"{name} has no text encoder")


def stack_conditions(conds: list[dict[str, torch.Tensor]], family: Family,
                     length: int | None = None) -> dict[str, torch.Tensor]:
    """Batch per-prompt conditions; masked families are padded (zero mask) to the longest, or to ``length``."""
    if family.mask_key is None:
        return {k: torch.stack([c[k] for c in conds]) for k in conds[0]}
    n = max([c["prompt_embeds"].shape[0] for c in conds] + [length or 0])
    pe = torch.zeros(len(conds), n, conds[0]["prompt_embeds"].shape[-1], dtype=conds[0]["prompt_embeds"].dtype)
    mask = torch.zeros(len(conds), n, dtype=torch.long)
    for i, c in enumerate(conds):
        s = c["prompt_embeds"].shape[0]
        pe[i, :s] = c["prompt_embeds"]
        mask[i, :s] = c[family.mask_key][:s]
    return {"prompt_embeds": pe, family.mask_key: mask}  # [B, S, D], [B, S]


def pad_condition(cond: dict[str, torch.Tensor], family: Family, length: int) -> dict[str, torch.Tensor]:
    """Pad a batched masked condition to sequence ``length`` (for concatenating cond and null in one CFG pass)."""
    if family.mask_key is None or cond["prompt_embeds"].shape[1] >= length:
        return cond
    pe, mask = cond["prompt_embeds"], cond[family.mask_key]
    extra = length - pe.shape[1]
    return {"prompt_embeds": torch.nn.functional.pad(pe, (0, 0, 0, extra)),
            family.mask_key: torch.nn.functional.pad(mask, (0, extra))}
