"""routing.kernel: the fused Triton kernel (tested under Triton's interpreter in a subprocess) and its selection.

The kernel tests proper live in ``kernel_interpreted.py``: Triton's interpreter is chosen when a kernel is
defined, so they run in a fresh process with ``TRITON_INTERPRET=1``.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmd_dar.config import build_config
from dmd_dar.distill.config import DistillConfig
from dmd_dar.errors import UserError
from dmd_dar.models.config import routing_from_dict
from dmd_dar.routing import DARRouter, RoutingConfig, kernel

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED_TESTS = 33  # kernel_interpreted.py's test count: a run that collects fewer has lost some


@pytest.mark.skipif(not kernel.triton_importable(), reason="this torch build ships without Triton")
def test_fused_kernel_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "kernel_interpreted.py"),
                           "-o", "addopts=", "-q", "-p", "no:cacheprovider"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.match(rf"{INTERPRETED_TESTS} passed in ", summary), summary


def test_triton_kernel_without_cuda_names_the_key_and_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^routing\.kernel=triton needs Triton and a CUDA device, but no CUDA "
                                        r"device is available; set routing\.kernel=torch"):
        RoutingConfig(kind="dar", kernel="triton")
    with pytest.raises(UserError, match=r"networks\.student_routing\.kernel=triton .*"
                                        r"networks\.student_routing\.kernel=torch"):
        build_config(DistillConfig, [], ["networks.student_routing.kernel=triton"])
    monkeypatch.setattr(kernel, "triton", None)
    with pytest.raises(UserError, match="Triton is not installed.*routing.kernel=torch"):
        RoutingConfig(kind="dar", kernel="triton")
    RoutingConfig(kind="residual", kernel="triton")  # no aggregation, nothing to run the kernel on
    with pytest.raises(UserError, match="routing.kernel='cuda' is not valid; choose one of auto, triton, torch"):
        RoutingConfig(kind="dar", kernel="cuda")


def test_triton_kernel_on_cpu_tensors_is_a_user_error(monkeypatch):
    """run.cpu=true on a CUDA machine: the config passes, the first aggregation says what to change."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if not kernel.triton_importable():
        monkeypatch.setattr(kernel, "triton", object())
    router = DARRouter(2, 4, RoutingConfig(kind="dar", query="static", kernel="triton"))
    state = router.begin(torch.randn(1, 2, 4))
    router.push(state, router.input_for(1, state))
    with pytest.raises(UserError, match="tensors are on cpu, not CUDA; set routing.kernel=torch"):
        router.input_for(2, state)


def test_auto_uses_the_torch_path_for_cpu_tensors(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the fused kernel ran on CPU tensors under kernel=auto")

    monkeypatch.setattr("dmd_dar.routing.router.aggregate_fused", fail)
    router = DARRouter(3, 4, RoutingConfig(kind="dar", query="static", kernel="auto"))
    state = router.begin(torch.randn(1, 2, 4))
    for l in range(1, 4):
        router.push(state, router.input_for(l, state))
    assert router.output(state).shape == (1, 2, 4)


def test_saved_models_load_with_the_kernel_their_machine_has():
    """An export trained with kernel=triton loads on a machine without CUDA (same results: kernel=auto)."""
    assert routing_from_dict(dict(kind="dar", kernel="triton")).kernel == "auto"
    assert routing_from_dict(dict(kind="dar", kernel="torch")).kernel == "torch"
