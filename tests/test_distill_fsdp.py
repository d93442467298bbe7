"""Multi-process distillation on CPU (gloo): DDP keeps identical replicas; FSDP (through accelerate, see
``fsdp_cpu.py``) trains exactly what DDP trains and resumes exactly from its per-process checkpoint state."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from test_distill_trainer import ROOT, _overrides, _read_logs, tiny_teacher  # noqa: F401 (tiny_teacher: fixture)

from dmd_dar.errors import UserError
from dmd_dar.training.checkpoint import Checkpointer, load_checkpoint, load_process_state
from dmd_dar.training.ema import EMA
from dmd_dar.training.sharding import ShardedEMA, check_distribution
from dmd_dar.utils.io import load_safetensors

# GAN on and two micro-batches: the paths where DDP and FSDP differ most (a backward through the fake score in
# the generator step, no_sync, a clip over two prepared models).
EXTRA = ("run.cpu=true", "run.grad_accum=2", "run.batch_size=2", "method.gan_weight=0.1")
FSDP_FLAGS = ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
              "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
              "Attention,Mlp", "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_use_orig_params", "true",
              "--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false"]


def _launch(flags: list[str], target: list[str], overrides: list[str], port: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *target,
           "distill", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _ddp(teacher: Path, out: Path, steps: int) -> Path:
    _launch(["--multi_gpu"], ["-m", "dmd_dar.cli"], _overrides(teacher, out, steps, *EXTRA), 29518)
    return out


def _fsdp(teacher: Path, out: Path, steps: int) -> Path:
    _launch(FSDP_FLAGS, [str(ROOT / "tests" / "fsdp_cpu.py"), "dmd_dar.cli"], _overrides(teacher, out, steps, *EXTRA),
            29519)
    return out


@pytest.fixture(scope="module")
def ddp_run(tiny_teacher, tmp_path_factory) -> Path:  # noqa: F811
    return _ddp(tiny_teacher, tmp_path_factory.mktemp("ddp") / "run", 3)


@pytest.mark.slow
def test_two_process_ddp_keeps_identical_replicas(ddp_run):
    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["sharded"] is False
    assert summary["replicas_identical"] is True
    assert (ddp_run / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_fsdp_trains_what_ddp_trains_and_resumes_exactly(ddp_run, tiny_teacher, tmp_path):  # noqa: F811
    full = _fsdp(tiny_teacher, tmp_path / "full", 3)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["sharded"] is True and summary["num_processes"] == 2 and summary["replicas_identical"] is None
    ddp_logs, fsdp_logs = _read_logs(ddp_run), _read_logs(full)
    for step in (1, 2, 3):  # same losses; the gradient norms are sums in a different order
        for key in ("gen/dm_loss", "gen/gan_loss", "critic/fake_loss", "critic/grad_norm", "gen/grad_norm",
                    "gen/gan_to_dm_grad_ratio"):
            if key in ddp_logs[step]:
                assert fsdp_logs[step][key] == pytest.approx(ddp_logs[step][key], rel=1e-5), (step, key)
    assert "gen/gan_loss" in fsdp_logs[3] and "critic/grad_norm" in fsdp_logs[3]
    ckpt = full / "checkpoints" / "step_0000003"
    for name in ("generator", "fake_score", "gan_head"):  # the full weights, gathered from the shards
        want, got = load_safetensors(ddp_run / ckpt.relative_to(full) / f"{name}.safetensors"), load_safetensors(
            ckpt / f"{name}.safetensors")
        assert want.keys() == got.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    want, got = load_safetensors(ddp_run / "export" / "model.safetensors"), load_safetensors(
        full / "export" / "model.safetensors")  # the EMA: averaged per shard, gathered for export
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    _, opts, state = load_checkpoint(ckpt)
    assert state["sharded"] and set(opts) == {"generator_sched", "fake_sched"}
    assert set(load_process_state(ckpt, 1, 2)) == {"generator", "fake", "ema"}

    split = _fsdp(tiny_teacher, tmp_path / "split", 2)
    _fsdp(tiny_teacher, split, 3)  # resumes from step 2: optimizer and EMA pieces come back per process
    assert _read_logs(split)[3] == fsdp_logs[3]
    a, b = load_safetensors(full / "export" / "model.safetensors"), load_safetensors(
        split / "export" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_fsdp_launch_that_accelerate_did_not_honour_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for kind in (DistributedType.MULTI_CPU, DistributedType.NO):
        with pytest.raises(UserError, match="FSDP only on GPUs"):
            check_distribution(SimpleNamespace(distributed_type=kind, device=torch.device("cpu")), "distill")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    check_distribution(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, device="cpu"), "distill")


@pytest.mark.parametrize("plugin, message", [
    (dict(fsdp_version=2), "fsdp_version"),
    (dict(use_orig_params=False), "use_orig_params"),
    (dict(sharding_strategy=SimpleNamespace(name="HYBRID_SHARD")), "HYBRID_SHARD"),
])
def test_unsupported_fsdp_settings_are_named(plugin, message):
    settings = {"fsdp_version": 1, "use_orig_params": True, "sharding_strategy": SimpleNamespace(name="FULL_SHARD"),
                **plugin}
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, device="cuda:0",
                                  state=SimpleNamespace(fsdp_plugin=SimpleNamespace(**settings)))
    with pytest.raises(UserError, match=message):
        check_distribution(accelerator, "distill")
    with pytest.raises(UserError, match="DDP"):
        check_distribution(accelerator, "train-teacher", fsdp_supported=False)


def test_sharded_ema_averages_like_the_ema_and_swaps_back():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema, sharded = EMA(net, 0.9), ShardedEMA(net, 0.9)
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        sharded.update(net)
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    with sharded.swapped_into(net):
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v, ema.state_dict()[k])
    assert all(torch.equal(v, raw[k]) for k, v in net.state_dict().items())
    with pytest.raises(UserError, match="same number of processes"):
        sharded.load_state_dict({"weight": torch.zeros(5), "bias": torch.zeros(2)}, 3)


def test_process_state_is_staged_into_the_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path)
    for rank in range(2):
        ckpt.stage_process_state(7, rank, {"generator": {"rank": torch.tensor(rank)}})
    path = ckpt.save(7, {"generator": {"w": torch.ones(2)}}, {}, {"sharded": True})
    assert not list(ckpt.root.glob(".staged_*"))
    assert int(load_process_state(path, 1, 2)["generator"]["rank"]) == 1
    with pytest.raises(UserError, match="same number of processes"):
        load_process_state(path, 0, 4)
