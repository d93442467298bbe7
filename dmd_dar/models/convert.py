"""Residual <-> DAR conversion of trained models, and safetensors checkpoints that carry their ModelConfig."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from dmd_dar.errors import UserError
from dmd_dar.models.config import ModelConfig
from dmd_dar.models.sit import SiT
from dmd_dar.routing import RoutingConfig, build_router
from dmd_dar.utils.io import atomic_save_safetensors, load_safetensors

FORMAT = "dmd_dar.sit"
FORMAT_VERSION = "1"


def _with_router(model: SiT, routing: RoutingConfig) -> SiT:
    """A deep copy of ``model`` with a fresh router for ``routing`` (same device and dtype), all else equal."""
    new = copy.deepcopy(model)
    new.cfg = replace(model.cfg, routing=routing)
    ref = next(model.parameters())
    new.router = build_router(routing, model.cfg.num_sublayers, model.cfg.hidden_size).to(ref.device, ref.dtype)
    return new


def to_dar(model: SiT, routing_cfg: RoutingConfig, *, function_preserving: bool = True) -> SiT:
    """A DAR copy of a trained residual ``model``: same weights, new zero-query routers, t-embedder untouched.

    With ``function_preserving`` (default) ``routing_cfg.for_retrofit()`` is applied: count scaling, "sum" chunk
    summaries and a learned zero time gain, so the copy computes the same function as ``model`` at step 0
    (up to float rounding). ``function_preserving=False`` keeps ``routing_cfg`` as given (e.g. the paper's convex
    weights and "last" summaries), which is a warm start rather than an equivalent model.
    """
    if not routing_cfg.is_dar:
        raise UserError("to_dar needs routing.kind='dar'; use to_residual for the other direction")
    if model.cfg.routing.is_dar:
        raise UserError("model already uses DAR routing; to_dar converts residual models only")
    return _with_router(model, routing_cfg.for_retrofit() if function_preserving else routing_cfg)


def is_identity_router(model: SiT) -> bool:
    """Whether the model's DAR router provably computes the residual stream (so ``to_residual`` is exact)."""
    rc = model.cfg.routing
    if not rc.is_dar:
        return True
    if rc.scale != "count" or (rc.query == "static_t" and rc.time_gain == "fixed"):
        return False
    if rc.chunk_size > 1 and rc.summary == "last" and model.cfg.num_sublayers > rc.chunk_size:
        return False
    return all(not p.any() for name, p in model.router.named_parameters() if not name.endswith("norm_gain"))


def to_residual(model: SiT, *, force: bool = False) -> SiT:
    """A residual copy of a DAR ``model`` (same weights, router dropped).

    Exact only while the router is still the identity (zero queries, count scaling, complete summaries), e.g. a
    ``to_dar`` copy before training; otherwise a ``UserError`` unless ``force=True``, which discards the learned
    routing and therefore changes the function.
    """
    if not model.cfg.routing.is_dar:
        raise UserError("model already uses residual routing")
    if not force and not is_identity_router(model):
        raise UserError("the model's DAR routing is not the identity (trained queries, convex scale, 'last' "
                        "summaries or a fixed e(t) query), so dropping it changes the function; pass force=True "
                        "to convert anyway")
    return _with_router(model, RoutingConfig(kind="residual"))


# --------------------------------------------------------------------------------------------------------------
def save_model(model: SiT, path: str | os.PathLike) -> Path:
    """Write the weights as safetensors with the ModelConfig as JSON metadata, atomically."""
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": json.dumps(model.cfg.to_dict())}
    return atomic_save_safetensors(model.state_dict(), path, metadata=metadata)


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in a ``save_model`` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; pass the path of a checkpoint written by save_model")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc}); re-export it") from exc
    if metadata.get("format") != FORMAT or "model_config" not in metadata:
        raise UserError(f"{path}: no dmd_dar model config in the metadata (format={metadata.get('format')!r}); "
                        "build the model yourself and use load_weights(model, path)")
    try:
        data = json.loads(metadata["model_config"])
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: model_config metadata is not valid JSON ({exc}); re-export the checkpoint") from exc
    try:
        return ModelConfig.from_dict(data)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from exc


def _describe_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], limit: int = 4) -> str:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{k} {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(got)) if got[k].shape != expected[k].shape]

    def few(items: list[str]) -> str:
        more = f", ... (+{len(items) - limit})" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {few(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {few(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {few(shapes)}")
    return "; ".join(parts)


def load_weights(model: SiT, path: str | os.PathLike) -> SiT:
    """Load a checkpoint's weights into ``model`` (in place; cast to its dtype). Keys and shapes must match."""
    tensors = load_safetensors(path)
    expected = model.state_dict()
    problem = _describe_mismatch(expected, tensors)
    if problem:
        raise UserError(f"{path}: checkpoint does not match the model architecture ({problem}); "
                        "check the model config (depth, hidden_size, routing, ...) used to build the model")
    model.load_state_dict(tensors, strict=True)
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> SiT:
    """Rebuild the model from a ``save_model`` checkpoint (config from its metadata, then its weights).

    Returned in eval mode (no label dropout); call ``.train()`` to fine-tune.
    """
    model = SiT(read_config(path))
    load_weights(model, path)
    return model.to(device).eval()
