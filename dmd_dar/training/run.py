"""Run-level settings and the accelerate set-up shared by every trainer."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dmd_dar.errors import UserError
from dmd_dar.training.compile import check_compile_mode
from dmd_dar.utils.cpu_memory import retain_freed_memory

log = logging.getLogger("dmd_dar")

MIXED_PRECISION = ("no", "bf16", "fp16")
TRACKERS = ("tensorboard", "wandb", "none")


@dataclass
class RunConfig:
    """Where a run writes, how long it runs, how it logs and checkpoints."""

    out_dir: str = "runs/run"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 64  # per process
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate autocast)
    cpu: bool = False  # force CPU even where CUDA is available
    log_every: int = 25
    sample_every: int = 250  # sample grids; 0 disables
    ckpt_every: int = 250  # 0 disables periodic checkpoints (the final state is always saved)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the run directory's latest checkpoint when one exists
    log_with: str = "tensorboard"  # tensorboard | wandb | none
    progress: bool = True
    num_workers: int = 0  # data-rendering worker processes (0 = in the training process; use 4+ on GPU machines)
    compile: str = "false"  # false | default | max-autotune: torch.compile the networks' forwards (training.compile)

    def __post_init__(self) -> None:
        if self.mixed_precision in ("False", "false"):
            # YAML 1.1 reads a bare `no` (also `off`, `false`) as the boolean false, which reaches this str field
            # as "False": `run.mixed_precision=no` means what it says.
            self.mixed_precision = "no"
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(f"run.mixed_precision={self.mixed_precision!r}; choose one of {', '.join(MIXED_PRECISION)}")
        self.compile = check_compile_mode(self.compile)
        if self.log_with not in TRACKERS:
            raise UserError(f"run.log_with={self.log_with!r}; choose one of {', '.join(TRACKERS)}")
        for key in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, key) < 1:
                raise UserError(f"run.{key}={getattr(self, key)} must be >= 1")


def make_accelerator(run: RunConfig, project: str):
    """An ``accelerate.Accelerator`` for this run (DDP/FSDP come from ``accelerate launch``'s config)."""
    # lazy: the config schemas import this module for RunConfig, and the DMD method (through its config) must
    # not import accelerate
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    Path(run.out_dir).mkdir(parents=True, exist_ok=True)
    log_with = None if run.log_with == "none" else run.log_with
    if log_with == "wandb":
        try:
            import wandb  # noqa: F401  # lazy: an optional extra, only probed when asked for
        except ImportError as exc:
            raise UserError("run.log_with=wandb needs the wandb package: pip install 'dmd-dar[wandb]'") from exc
    _release_accelerator_state(run.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=run.grad_accum,
        cpu=run.cpu,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=run.out_dir, logging_dir=os.path.join(run.out_dir, "logs")),
    )
    if accelerator.device.type == "cpu":  # activations live in host memory: stop handing them back to the OS
        retain_freed_memory()
    return accelerator


def _release_accelerator_state(mixed_precision: str) -> None:
    """Let this process start a run with another mixed precision than its previous run.

    accelerate keeps one process-global ``AcceleratorState`` and refuses a second ``Accelerator`` with a different
    ``mixed_precision``; runs made one after another in one process (``dmd-dar study``: fp32 distillation, then
    teacher pretraining in the teacher config's bf16) must each get their own. Only that state is reset; the
    ``PartialState`` (process group, device) is kept.
    """
    from accelerate.state import AcceleratorState  # lazy: as in make_accelerator

    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous is not None and previous != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
