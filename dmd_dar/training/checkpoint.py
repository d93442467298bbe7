"""Atomic, complete training checkpoints.

A checkpoint is a directory ``<run>/checkpoints/step_0000500/`` holding

    <net>.safetensors        one per network (generator, fake_score, ema, ...), safetensors
    optim_<name>.pt          optimizer / scheduler state dicts (plain tensors and numbers; loaded weights_only)
    state.json               step, config digest and anything else the trainer needs to resume
    process_state/rank_N.pt  FSDP runs only: each process's own optimizer and EMA pieces (loaded weights_only)

It is written into a temporary sibling directory and renamed into place, and only then is ``latest`` updated,
so a crash or a full disk during a save leaves the previous checkpoint intact and ``latest`` pointing at it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dmd_dar.errors import UserError
from dmd_dar.utils.io import atomic_write_text, load_safetensors

PROCESS_STATE = "process_state"


class Checkpointer:
    def __init__(self, run_dir: str | os.PathLike, keep: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def save(self, step: int, networks: dict[str, dict[str, torch.Tensor]],
             optimizers: dict[str, dict[str, Any]], state: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f".tmp_step_{step:07d}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            staged = self._stage_dir(step)
            if staged.is_dir():  # every process's sharded state, staged by ``stage_process_state``
                os.replace(staged, tmp / PROCESS_STATE)
            for name, tensors in networks.items():
                flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
                save_file(flat, str(tmp / f"{name}.safetensors"))
            for name, opt_state in optimizers.items():
                torch.save(opt_state, tmp / f"optim_{name}.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise UserError(f"{self.root}: disk full while saving step {step}; the previous checkpoint "
                                f"({self.latest()}) is intact — free space and resume") from exc
            raise
        atomic_write_text(final.name + "\n", self.root / "latest")
        self._prune()
        return final

    def stage_process_state(self, step: int, rank: int, state: dict[str, Any]) -> None:
        """Write this process's own state for checkpoint ``step`` (FSDP: optimizer and EMA pieces). Every process
        stages, then (after a barrier) the main process's ``save`` of the same step moves them all into place."""
        stage = self._stage_dir(step)
        stage.mkdir(parents=True, exist_ok=True)
        target = stage / f"rank_{rank:05d}.pt"
        part = target.with_suffix(".part")
        try:
            torch.save(state, part)
            with open(part, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(part, target)
        except OSError as exc:
            part.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise UserError(f"{self.root}: disk full while saving step {step}; the previous checkpoint "
                                f"({self.latest()}) is intact — free space and resume") from exc
            raise

    def _stage_dir(self, step: int) -> Path:
        return self.root / f".staged_step_{step:07d}"

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if path.is_dir():
                return path
        done = sorted(self.root.glob("step_*")) if self.root.is_dir() else []
        return done[-1] if done else None

    def _prune(self) -> None:
        done = sorted(self.root.glob("step_*"))
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict]:
    """Load (networks, optimizer states, state) from a checkpoint directory, never executing code."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise UserError(f"{path}: not a dmd-dar checkpoint directory (no state.json); pass a "
                        f"<run>/checkpoints/step_XXXXXXX folder or the run folder to resume from")
    networks = {f.stem: load_safetensors(f) for f in sorted(path.glob("*.safetensors"))}
    optimizers = {}
    for f in sorted(path.glob("optim_*.pt")):
        try:
            optimizers[f.stem[len("optim_"):]] = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"{f}: unreadable optimizer state ({exc}); the checkpoint is damaged, "
                            f"resume from an earlier one") from exc
    state = json.loads((path / "state.json").read_text())
    return networks, optimizers, state


def load_process_state(path: str | os.PathLike, rank: int, num_processes: int) -> dict[str, Any]:
    """Process ``rank``'s own state from a checkpoint written by ``num_processes`` processes (FSDP runs)."""
    folder = Path(path) / PROCESS_STATE
    found = sorted(folder.glob("rank_*.pt")) if folder.is_dir() else []
    if len(found) != num_processes:
        raise UserError(f"{path}: holds the sharded state of {len(found)} processes, this run has {num_processes}; "
                        f"resume an FSDP run with the same number of processes (or start a new run from its export)")
    f = folder / f"rank_{rank:05d}.pt"
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{f}: unreadable process state ({exc}); the checkpoint is damaged, "
                        f"resume from an earlier one") from exc
