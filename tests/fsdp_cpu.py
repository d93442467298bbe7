"""Test harness: run a module under accelerate's FSDP on CPU processes (gloo), so CI exercises the FSDP code path.

accelerate sets FSDP up only on accelerator devices; on a CPU-only machine an FSDP launch becomes plain DDP
(``Accelerator(cpu=True)``). torch's FSDP (version 1) itself runs on CPU over gloo, so this shim lets accelerate's
state say FSDP after its own set-up on CPU. Everything else (the wrapping, sharded parameters, collectives,
``get_state_dict``, ``no_sync``) is the real accelerate + torch code. Used as

    accelerate launch --use_fsdp --num_processes 2 ... tests/fsdp_cpu.py dmd_dar.cli distill ... run.cpu=true

with ``--fsdp_sync_module_states false --fsdp_cpu_ram_efficient_loading false`` (both look for a GPU).

When the module exits, the shim also checks that it left no FSDP module alive for the interpreter's shutdown to
collect (exit status 3 otherwise): such leftovers hold the gloo process group and made runs abort at exit now and
then.
"""

import gc
import os
import runpy
import sys

import accelerate.state
import torch
from accelerate.utils import DistributedType

_init = accelerate.state.AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" \
            and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if fsdp_plugin is not None:  # the state is a shared singleton, re-initialised without a plugin later
            self.fsdp_plugin = fsdp_plugin
        self.device = torch.device("cpu")  # FSDP compares it with the parameters' device (``cpu``, not ``cpu:0``)


accelerate.state.AcceleratorState.__init__ = _init_fsdp_on_cpu


def _surviving_fsdp_modules() -> int:
    """FSDP modules still allocated, counted without running the cyclic collector (which would free them)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return sum(isinstance(o, FullyShardedDataParallel) for o in gc.get_objects())


if __name__ == "__main__":
    module, sys.argv = sys.argv[1], sys.argv[1:]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        left = _surviving_fsdp_modules()
        if left:
            print(f"fsdp_cpu.py: {module} exited with {left} FSDP modules still alive", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
