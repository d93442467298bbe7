"""Test worker: ``dmd-dar distill <overrides>`` (a LoRA run on the shared base) that also records, at every
gradient clip (after a phase's backward, before its optimizer step), which tensors hold a gradient: whether any
frozen base weight does, and whether the network the phase does not train holds a non-zero one. Written to
``<run.out_dir>/grads_rank<rank>.json``. Run under torchrun (DDP) or ``fsdp_cpu.py shared_base_worker`` (FSDP)."""

import gc
import json
import os
import sys
import traceback
from pathlib import Path

from dmd_dar.cli import find_command, resolve
from dmd_dar.distill import trainer

seen: dict = {"task": None, "clips": []}
_build_task, _clip = trainer.build_task, trainer.clip_grad_norm


def _record_task(cfg, device):
    seen["task"] = _build_task(cfg, device)
    return seen["task"]


def _record_clip(accelerator, params, max_norm):
    task = seen["task"]
    student, fake = task._built[:2]
    ids = {id(p) for p in params}
    trained, other = (student, fake) if all(id(p) in ids for p in student.parameters()) else (fake, student)
    seen["clips"].append({
        "phase": "generator" if trained is student else "critic",
        "base_grads": sum(p.grad is not None for n, p in task.transformer.named_parameters() if "lora_" not in n),
        "other_nonzero": sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in other.parameters()),
        "trained_with_grad": sum(p.grad is not None for p in trained.parameters()),
    })
    return _clip(accelerator, params, max_norm)


trainer.build_task, trainer.clip_grad_norm = _record_task, _record_clip
cfg = resolve(find_command("distill"), [], sys.argv[1:])
try:
    trainer.run(cfg)
except BaseException:
    traceback.print_exc()  # fsdp_cpu.py's exit check would hide it
    raise
finally:
    seen["task"] = None
    gc.collect()  # the run's FSDP wrappers sit in reference cycles: none may be left for fsdp_cpu.py's exit check
rank = os.environ.get("RANK", "0")
(Path(cfg.run.out_dir) / f"grads_rank{rank}.json").write_text(json.dumps(seen["clips"]))
