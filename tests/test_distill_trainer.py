"""The distill trainer end to end on a tiny teacher: phases, resume, bad input, 2-process DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmd_dar.artifact import ArtifactMeta, DiffusionConfig, save_artifact
from dmd_dar.cli import main
from dmd_dar.config import build_config
from dmd_dar.distill.config import DistillConfig
from dmd_dar.distill.method import DMD2
from dmd_dar.distill.trainer import build_task
from dmd_dar.models import build_model, preset_config
from dmd_dar.routing import RoutingConfig, routing_parameters

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", num_classes=8))  # 16x16 RGB, the procedural dataset's 8 classes
    with torch.no_grad():  # non-trivial outputs (adaLN-Zero and the head start at zero)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("teacher")
    meta = ArtifactMeta(role="teacher", diffusion=DiffusionConfig(sample_steps=2),
                        class_names=list("abcdefgh"))
    return save_artifact(folder, model.eval(), meta)


def _overrides(teacher: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [f"networks.teacher={teacher}", f"run.out_dir={out}", f"run.steps={steps}", "data.image_size=16",
            "run.batch_size=4", "run.log_every=1", "run.sample_every=0", "run.ckpt_every=2", "run.progress=false",
            "run.log_with=none", "debug_grid_every=0", "method.ttur=2", "method.regression_weight=0", *extra]


def _read_logs(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec for rec in map(json.loads, lines)}


def test_each_phase_updates_only_its_networks(tiny_teacher):
    cfg = build_config(DistillConfig, [], _overrides(tiny_teacher, Path("unused"), 1, "method.gan_weight=0.1"))
    task = build_task(cfg, "cpu")
    from dmd_dar.distill.denoiser import Denoiser
    from dmd_dar.distill.gan import GANHead
    from dmd_dar.distill.method import frozen

    student = task.build_network(cfg.networks.student_routing, False)
    fake = task.build_network(RoutingConfig(kind="dar", query="dynamic"), False)
    head = GANHead(task.feature_dim)
    path, null = task.teacher.path, task.teacher.null_cond
    method = DMD2(cfg.method, Denoiser(student, path, null), Denoiser(fake, path, null), task.teacher,
                  task.student_times, gan_head=head)
    gen = torch.Generator().manual_seed(0)
    batch = task.draw(4, gen, "cpu", need_real=True)
    x = method.generate(batch.noise, torch.ones(4), batch.cond)
    loss, _, _ = method.generator_step(x, batch.cond, gen)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in routing_parameters(student))
    assert all(p.grad is None for p in fake.parameters()), "the generator step must not train the fake score"
    assert all(p.grad is None for p in head.parameters()), "the generator step must not train the GAN head"
    assert all(p.grad is None for p in task.net.parameters()), "the teacher never gets a gradient"
    student.zero_grad(set_to_none=True)
    with frozen(student):
        c_loss, _ = method.critic_step(x.detach(), batch.cond, gen, batch.real, batch.real_cond)
    c_loss.backward()
    assert all(p.grad is None for p in student.parameters()), "the critic step must not train the generator"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())
    assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad is None for p in task.net.parameters())


def test_student_starts_equal_to_teacher(tiny_teacher):
    cfg = build_config(DistillConfig, [], _overrides(tiny_teacher, Path("unused"), 1))
    task = build_task(cfg, "cpu")
    student = task.build_network(RoutingConfig(kind="dar", query="static_t", chunk_size=2), False).eval()
    x, t, y = torch.randn(3, 3, 16, 16), torch.rand(3), torch.tensor([0, 1, 2])
    torch.testing.assert_close(student(x, t, y), task.net(x, t, y), atol=1e-5, rtol=1e-5)


def test_resume_continues_exactly(tiny_teacher, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["distill", *_overrides(tiny_teacher, full, 4)]) == 0
    assert main(["distill", *_overrides(tiny_teacher, split, 2)]) == 0
    assert main(["distill", *_overrides(tiny_teacher, split, 4)]) == 0  # resumes from step 2
    a, b = _read_logs(full), _read_logs(split)
    for step in (3, 4):
        for key in ("critic/fake_loss", "gen/dm_loss"):
            if key in b[step]:
                assert a[step][key] == b[step][key], (step, key)
    assert "critic/fake_loss" in b[4]


def test_resume_with_changed_config_names_the_keys(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *_overrides(tiny_teacher, out, 2)]) == 0
    assert main(["distill", *_overrides(tiny_teacher, out, 4, "method.guidance_scale=3.0")]) == 2
    assert "method.guidance_scale" in capsys.readouterr().err


def test_teacher_shape_mismatch_is_a_clear_error(tiny_teacher, tmp_path, capsys):
    args = _overrides(tiny_teacher, tmp_path / "run", 1)
    args[args.index("data.image_size=16")] = "data.image_size=32"
    assert main(["distill", *args]) == 2
    assert "data.image_size=16" in capsys.readouterr().err


def test_student_export_is_sampled_by_the_sample_command(tiny_teacher, tmp_path):
    out = tmp_path / "run"
    assert main(["distill", *_overrides(tiny_teacher, out, 2, "method.student_steps=2")]) == 0
    assert main(["sample", f"checkpoint={out / 'export'}", "num_per_class=2", f"out_dir={tmp_path / 's'}"]) == 0
    records = [json.loads(line) for line in (tmp_path / "s" / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 16 and (tmp_path / "s" / "grid.png").is_file()
    assert json.loads((out / "export" / "dmd_dar.json").read_text())["student_timesteps"] == [1.0, 0.5]


def test_regression_pairs_are_cached_and_shared(tiny_teacher, tmp_path):
    cache = tmp_path / "pairs"
    extra = ("method.regression_weight=0.5", "method.regression_pairs=8", "method.regression_steps=2",
             f"method.regression_cache={cache}")
    assert main(["distill", *_overrides(tiny_teacher, tmp_path / "a", 2, *extra)]) == 0
    (pairs,) = cache.glob("regression_pairs_*_n8_s2.safetensors")
    stamp = pairs.stat().st_mtime_ns
    assert main(["distill", *_overrides(tiny_teacher, tmp_path / "b", 2, *extra)]) == 0
    assert pairs.stat().st_mtime_ns == stamp  # the second run reused the first run's teacher ODE pairs
    assert "gen/regression_loss" in _read_logs(tmp_path / "b")[1]


@pytest.mark.slow
def test_two_process_ddp_keeps_identical_replicas(tiny_teacher, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "dmd_dar.cli", "distill", *_overrides(tiny_teacher, out, 3, "run.cpu=true")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["replicas_identical"] is True
