"""A LoRA run on the shared base under FSDP (``t2i.shared_base``, two CPU processes over gloo through
``fsdp_cpu.py``): the one base is sharded once and trains exactly what the DDP shared-base run trains, no base
weight ever gets a gradient, checkpoints and the per-process EMA / optimizer pieces hold only the trained
tensors, and an interrupted run resumes exactly. Activation checkpointing is on: its recomputation in the
backward runs through the sharded units after other networks' forwards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distill_fsdp import FSDP_FLAGS

from dmd_dar.t2i.tiny import build_tiny_pipeline
from dmd_dar.training.checkpoint import load_checkpoint, load_process_state
from dmd_dar.utils.io import load_safetensors

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a cat on a mat", "a red fox in the snow", "macro photo of a bee"]
TRAINED = ("adapter.", "model.router.", "model.text_router.")  # what an AdapterNet's state_dict holds
# FSDP units as configs/accelerate/fsdp_8gpu.yaml names them for SD3
FLAGS = [f if f != "Attention,Mlp" else "Attention,FeedForward" for f in FSDP_FLAGS]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_shared_fsdp")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    build_tiny_pipeline("sd3", root / "sd3")
    return root


def _args(root: Path, out: Path, steps: int) -> list[str]:
    return ["networks.teacher_kind=diffusers", f"t2i.model={root / 'sd3'}", "t2i.dtype=float32", "t2i.height=16",
            "t2i.width=16", f"t2i.prompts=[{root / 'prompts.txt'}]", "t2i.max_sequence_length=8",
            f"t2i.embed_cache_dir={root / 'cache'}", "t2i.reference_samples=0", "t2i.teacher_steps=2",
            "t2i.grid_prompts=1", "t2i.lora_rank=2", f"run.out_dir={out}", f"run.steps={steps}", "run.batch_size=2",
            "run.cpu=true", "run.log_every=1", "run.sample_every=0", "run.ckpt_every=2", "run.log_with=none",
            "run.progress=false", "method.ttur=1", "method.regression_weight=0", "debug_grid_every=0",
            "ema_decay=0.5", "networks.gradient_checkpointing=true"]


def _run(launcher: list[str], root: Path, out: Path, steps: int) -> Path:
    """``tests/shared_base_worker.py`` (the distill run, plus a record of the gradients at every clip)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", *launcher, *_args(root, out, steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _fsdp(root: Path, out: Path, steps: int) -> Path:
    launcher = ["accelerate.commands.launch", *FLAGS, "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541",
                str(ROOT / "tests" / "fsdp_cpu.py"), "shared_base_worker"]
    return _run(launcher, root, out, steps)


def _ddp(root: Path, out: Path, steps: int) -> Path:
    # torchrun, as `accelerate launch --multi_gpu` does; run.cpu=true makes accelerate pick gloo (MULTI_CPU)
    launcher = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29542",
                str(ROOT / "tests" / "shared_base_worker.py")]
    return _run(launcher, root, out, steps)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fsdp_run(root, tmp_path_factory) -> Path:
    return _fsdp(root, tmp_path_factory.mktemp("fsdp") / "run", 3)


@pytest.mark.slow
def test_fsdp_shared_base_trains_what_ddp_trains(root, fsdp_run, tmp_path):
    """Same losses and gradient norms at every step (to 1e-6), the same checkpointed and exported tensors; the
    checkpoint holds no base tensor; at every clip no base weight holds a gradient and the network the phase
    does not train holds none that is non-zero."""
    ddp = _ddp(root, tmp_path / "ddp", 3)
    assert json.loads((fsdp_run / "summary.json").read_text())["sharded"] is True
    want, got = _metrics(ddp), _metrics(fsdp_run)
    assert len(want) == len(got) == 3
    for w, g in zip(want, got):
        for key in ("gen/dm_loss", "critic/fake_loss", "gen/grad_norm", "critic/grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-9), (g["step"], key)
    nets_want, nets_got = load_checkpoint(ddp / "checkpoints" / "step_0000003")[0], \
        load_checkpoint(fsdp_run / "checkpoints" / "step_0000003")[0]
    for part in ("generator", "fake_score"):
        assert nets_got[part].keys() == nets_want[part].keys()
        assert nets_got[part] and all(k.startswith(TRAINED) for k in nets_got[part]), part
        for k in nets_want[part]:
            torch.testing.assert_close(nets_got[part][k], nets_want[part][k], rtol=1e-6, atol=1e-8)
    lora = "export/lora/adapter_model.safetensors"
    a, b = load_safetensors(ddp / lora), load_safetensors(fsdp_run / lora)
    assert a.keys() == b.keys() and any("lora_B" in k and v.abs().sum() > 0 for k, v in b.items())
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-8)
    for rank in (0, 1):
        clips = json.loads((fsdp_run / f"grads_rank{rank}.json").read_text())
        assert [c["phase"] for c in clips] == ["generator", "critic"] * 3
        assert all(c["base_grads"] == 0 and c["other_nonzero"] == 0 for c in clips), clips


@pytest.mark.slow
def test_fsdp_shared_base_resumes_exactly(root, fsdp_run, tmp_path):
    """2 steps, stop, resume to 3: the per-process optimizer and EMA pieces (of the trained tensors only) come
    back, and step 3, its checkpoint and the export equal the uninterrupted run's."""
    split = _fsdp(root, tmp_path / "split", 2)
    own = load_process_state(split / "checkpoints" / "step_0000002", 1, 2)
    assert own["ema"] and all(k.startswith(TRAINED) for k in own["ema"])
    _fsdp(root, split, 3)
    assert _metrics(split)[2] == _metrics(fsdp_run)[2]
    a, b = load_checkpoint(fsdp_run / "checkpoints" / "step_0000003")[0], \
        load_checkpoint(split / "checkpoints" / "step_0000003")[0]
    for part in ("generator", "fake_score"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    lora = "export/lora/adapter_model.safetensors"
    x, y = load_safetensors(fsdp_run / lora), load_safetensors(split / lora)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
