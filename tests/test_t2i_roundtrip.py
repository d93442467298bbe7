"""End to end on tiny random pipelines: ``dmd-dar distill`` (diffusers teacher) -> export -> ``dmd-dar sample
prompt=...`` -> ``dmd-dar eval``, for an SD3-like (CFG, 2-step student, full fine-tuning) and a Flux-like
(embedded guidance, 1-step, LoRA) teacher; and the same tiny distill in two processes (gloo): DDP with identical
replicas, FSDP with the same training."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmd_dar.cli import main
from dmd_dar.data.manifest import read_manifest
from dmd_dar.t2i.tiny import build_tiny_pipeline
from dmd_dar.utils.io import load_safetensors

PROMPTS = ["a cat on a mat", "a red fox in the snow", "macro photo of a bee"]
ROOT = Path(__file__).resolve().parent.parent


def distill_args(root: Path, family: str, out: Path, *extra: str) -> list[str]:
    return ["networks.teacher_kind=diffusers", f"t2i.model={root / family}", "t2i.dtype=float32", "t2i.height=16",
            "t2i.width=16", f"t2i.prompts=[{root / 'prompts.txt'}]", "t2i.max_sequence_length=8",
            f"t2i.embed_cache_dir={root / 'cache'}", "t2i.reference_samples=2", "t2i.teacher_steps=2",
            "t2i.grid_prompts=1", f"run.out_dir={out}", "run.steps=2", "run.batch_size=2", "run.cpu=true",
            "run.log_every=1", "run.sample_every=0", "run.ckpt_every=0", "run.log_with=none", "run.progress=false",
            "method.ttur=1", "method.regression_weight=0", "debug_grid_every=0", *extra]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_rt")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    for family in ("sd3", "flux"):
        build_tiny_pipeline(family, root / family)
    return root


@pytest.mark.parametrize("family, extra", [
    ("sd3", ["method.student_steps=2", "t2i.route_text=true"]),
    ("flux", ["t2i.lora_rank=4", "networks.fake_routing.kind=dar", "export.merge=true"]),  # LoRA: merged on request
])
def test_distill_export_sample_eval(root, family, extra):
    out = root / f"run_{family}"
    assert main(["distill", *distill_args(root, family, out, *extra)]) == 0
    export = out / "export"
    info = json.loads((export / "dmd_dar_t2i.json").read_text())
    assert info["family"] == family and (export / "transformer" / "config.json").is_file()
    assert (export / "lora" / "adapter_model.safetensors").is_file() == (family == "flux")
    routers = load_safetensors(export / "dar_router.safetensors")
    assert routers and all(k.startswith(("router.", "text_router.")) for k in routers)
    assert any(k.startswith("text_router.") for k in routers) == (family == "sd3")  # route_text
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(r["gen/dm_loss"])) for r in logs)

    samples = root / f"samples_{family}"
    assert main(["sample", f"checkpoint={out}", "prompt=a red fox in the snow", f"prompts_file={root / 'prompts.txt'}",
                 "num_per_class=2", f"out_dir={samples}", "device=cpu"]) == 0
    records = read_manifest(samples)
    assert len(records) == 2 * (1 + len(PROMPTS)) and records[0]["caption"] == "a red fox in the snow"
    again = root / f"samples_{family}_again"
    assert main(["sample", f"checkpoint={export}", "prompt=a red fox in the snow", "num_per_class=2",
                 f"out_dir={again}", "device=cpu"]) == 0
    a, b = (samples / records[0]["file"]).read_bytes(), (again / records[0]["file"]).read_bytes()
    assert a == b  # same prompt + seed -> same image, whatever else is in the batch

    report = root / f"eval_{family}"
    assert main(["eval", f"samples=[{samples}]", "metrics=[spectral]", "report=false", "bootstrap=20",
                 f"out_dir={report}", "device=cpu"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert "spectral" in json.dumps(metrics)


def test_sample_prompt_needs_a_t2i_student(root):
    assert main(["sample", "checkpoint=assets/teacher", "prompt=a cat", "device=cpu"]) == 2


_WORKER = r"""
import os, sys
from safetensors.torch import save_file
from dmd_dar.cli import find_command, resolve
from dmd_dar.distill import trainer
from dmd_dar.t2i import task as t2i

built = []
orig = t2i.DiffusersT2ITask.build_network
def record(self, *a, **k):
    net = orig(self, *a, **k)
    built.append(net)
    return net
t2i.DiffusersT2ITask.build_network = record
trainer.run(resolve(find_command("distill"), [], sys.argv[2:]))  # the config `dmd-dar distill` runs (FSDP twin)
rank = os.environ.get("RANK", "0")
assert os.environ.get("WORLD_SIZE") == "2", os.environ.get("WORLD_SIZE")
save_file({k: v.contiguous() for k, v in built[0].state_dict().items()}, f"{sys.argv[1]}/student_rank{rank}.safetensors")
"""


def _two_process_args(root: Path, out: Path) -> list[str]:
    return distill_args(root, "sd3", out, "t2i.lora_rank=2", "t2i.reference_samples=0")


@pytest.fixture(scope="module")
def ddp_run(root, tmp_path_factory) -> Path:
    """Two CPU processes (torchrun + gloo), each saving its student: the folder holds the run and both students."""
    folder = tmp_path_factory.mktemp("t2i_ddp")
    worker = folder / "worker.py"
    worker.write_text(_WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # torchrun, as `accelerate launch --multi_gpu` does; run.cpu=true makes accelerate pick gloo (MULTI_CPU)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(worker), str(folder), *_two_process_args(root, folder / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


@pytest.mark.slow
def test_two_process_distill_gives_identical_replicas(ddp_run):
    a = load_safetensors(ddp_run / "student_rank0.safetensors")
    b = load_safetensors(ddp_run / "student_rank1.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    trained = [k for k in a if "lora_B" in k]
    assert trained and any(a[k].abs().sum() > 0 for k in trained)  # the replicas did train (LoRA B left zero)
    assert (ddp_run / "run" / "export" / "dmd_dar_t2i.json").is_file()


@pytest.mark.slow
def test_two_process_shared_base_trains_what_three_copies_train(root, ddp_run, tmp_path):
    """The DDP run above holds one shared base per process; the same launch with three copies of the base
    (t2i.shared_base=false) logs the same losses (to 1e-6) and exports the same adapter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    worker = ddp_run / "worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           str(worker), str(tmp_path), *_two_process_args(root, tmp_path / "run"), "t2i.shared_base=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for want, got in zip(read(tmp_path / "run"), read(ddp_run / "run"), strict=True):
        for key in ("gen/dm_loss", "critic/fake_loss", "gen/grad_norm", "critic/grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-8), (got["step"], key)
    lora = "export/lora/adapter_model.safetensors"
    want, got = load_safetensors(tmp_path / "run" / lora), load_safetensors(ddp_run / "run" / lora)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_fsdp_lora_distill_trains_what_ddp_trains(root, ddp_run, tmp_path):
    """The same run under accelerate's FSDP (tests/fsdp_cpu.py; attention and feed-forward modules as units, as
    configs/accelerate/fsdp_8gpu.yaml): the same losses, and the same exported LoRA."""
    from test_distill_fsdp import FSDP_FLAGS

    flags = [f if f != "Attention,Mlp" else "Attention,FeedForward" for f in FSDP_FLAGS]
    out = tmp_path / "fsdp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29520",
           str(ROOT / "tests" / "fsdp_cpu.py"), "dmd_dar.cli", "distill", *_two_process_args(root, out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["sharded"] is True
    read = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for want, got in zip(read(ddp_run / "run"), read(out), strict=True):
        for key in ("gen/dm_loss", "critic/fake_loss", "critic/grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)
    lora = "lora/adapter_model.safetensors"
    want, got = load_safetensors(ddp_run / "run" / "export" / lora), load_safetensors(out / "export" / lora)
    assert want.keys() == got.keys() and any("lora_B" in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
