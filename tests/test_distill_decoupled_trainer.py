"""Decoupled DMD and the random schedule through `dmd-dar distill` on a tiny teacher: resume, networks, sampling."""

import json

import pytest
import torch
from test_distill_fsdp import _launch
from test_distill_trainer import _overrides, _read_logs, tiny_teacher  # noqa: F401  (the tiny teacher fixture)

from dmd_dar.cli import main
from dmd_dar.config import build_config
from dmd_dar.distill.config import DistillConfig
from dmd_dar.distill.state import TrainingState
from dmd_dar.distill.trainer import build_task
from dmd_dar.training.run import make_accelerator
from dmd_dar.training.strategy import make_strategy
from dmd_dar.utils.io import load_safetensors

DECOUPLED = ("method.objective=decoupled", "method.ca_guidance_scale=3.0", "method.norm_floor=0.01",
             "method.ca_t_min=0.05", "method.schedule=random", "method.k_min=1", "method.k_max=3")
OPTIONS = {
    "dm_gan": (*DECOUPLED, "method.gan_weight=0.1"),
    "meanvar": (*DECOUPLED, "method.regularizer=meanvar", "method.meanvar_weight=0.5"),
    "gan": (*DECOUPLED, "method.regularizer=gan", "method.gan_weight=0.1"),
}


@pytest.mark.parametrize("variant", sorted(OPTIONS))
def test_resume_is_exact_with_the_decoupled_options(tiny_teacher, tmp_path, variant):  # noqa: F811
    """Stopped at step 2 and resumed to 4: the same logs, networks and export as an uninterrupted run."""
    extra = OPTIONS[variant]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["distill", *_overrides(tiny_teacher, full, 4, *extra)]) == 0
    assert main(["distill", *_overrides(tiny_teacher, split, 2, *extra)]) == 0
    assert main(["distill", *_overrides(tiny_teacher, split, 4, *extra)]) == 0
    a, b = _read_logs(full), _read_logs(split)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    # (a log line carries the latest value of every key seen so far in that process: compare the shared ones)
    for step in (3, 4):
        shared = a[step].keys() & b[step].keys()
        assert {"gen/proxy_loss", "gen/ca_norm", "drift/image_var_ratio", "gen/loss"} <= shared
        assert all(a[step][k] == b[step][k] for k in shared), step
    last = full / "checkpoints" / "step_0000004"
    names = {f.stem for f in last.glob("*.safetensors")}
    assert ("fake_score" in names) == (variant == "dm_gan")  # meanvar / gan: no fake score is built
    for name in names:
        want, got = (load_safetensors(run / "checkpoints" / "step_0000004" / f"{name}.safetensors")
                     for run in (full, split))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    want, got = (load_safetensors(run / "export" / "model.safetensors") for run in (full, split))
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_meanvar_builds_and_trains_no_fake_score(tiny_teacher, tmp_path, monkeypatch):  # noqa: F811
    """regularizer=meanvar: only the student is built from the teacher, and no critic phase runs."""
    cfg = build_config(DistillConfig, [], _overrides(tiny_teacher, tmp_path / "run", 2, *OPTIONS["meanvar"]))
    task = build_task(cfg, "cpu")
    built = []
    build = type(task).build_network
    monkeypatch.setattr(type(task), "build_network",
                        lambda self, *a, **kw: built.append(a) or build(self, *a, **kw))
    state = TrainingState.build(cfg, task, make_strategy(make_accelerator(cfg.run, "distill")))
    assert len(built) == 1 and state.fake is None and state.f_opt is None and not state.critic_networks
    assert main(["distill", *_overrides(tiny_teacher, tmp_path / "run", 2, *OPTIONS["meanvar"])]) == 0
    logs = _read_logs(tmp_path / "run")
    assert not any(k.startswith("critic/") for rec in logs.values() for k in rec)
    assert "gen/meanvar_kl" in logs[1] and logs[1]["gen/meanvar_kl"] > 0


def test_a_random_schedule_student_samples_at_1_2_and_4_steps(tiny_teacher, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert main(["distill", *_overrides(tiny_teacher, out, 2, *DECOUPLED)]) == 0
    grids = {}
    for k in (1, 2, 4):
        folder = tmp_path / f"s{k}"
        assert main(["sample", f"checkpoint={out / 'export'}", "num_per_class=1", f"steps={k}",
                     f"out_dir={folder}"]) == 0
        assert len((folder / "manifest.jsonl").read_text().splitlines()) == 8
        grids[k] = (folder / "grid.png").read_bytes()
    assert len(set(grids.values())) == 3  # three different samplers, not the training schedule three times
    assert json.loads((out / "export" / "dmd_dar.json").read_text())["student_timesteps"] == [1.0]
    # An evaluation suite takes the student steps per entry.
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""
name: steps
out_dir: {tmp_path / "eval"}
models:
  - {{name: student_1, checkpoint: {out}, steps: 1}}
  - {{name: student_4, checkpoint: {out}, steps: 4}}
num_per_class: 1
device: cpu
metrics: [spectral]
eval: {{bootstrap: 20, report: false}}
""")
    assert main(["eval", f"suite={suite}"]) == 0
    stamps = [json.loads((tmp_path / "eval" / "samples" / n / "suite_stamp.json").read_text())
              for n in ("student_1", "student_4")]
    assert [st["steps"] for st in stamps] == [1, 4]
    pngs = [(tmp_path / "eval" / "samples" / n / "00000.png").read_bytes() for n in ("student_1", "student_4")]
    assert pngs[0] != pngs[1]


@pytest.mark.parametrize("extra, key", [
    (("method.schedule=random", "method.k_min=3", "method.k_max=2"), "method.k_min=3"),
    (("method.objective=decoupled", "method.student_steps=4", "method.ca_t_min=0.3"), "method.ca_t_min"),
    (("method.regularizer=meanvar",), "method.objective=decoupled"),
    (("method.objective=decoupled", "method.regularizer=gan"), "method.gan_weight"),
    (("variance_drift_factor=1.0",), "variance_drift_factor"),
])
def test_bad_decoupled_input_is_one_line_naming_the_key(tiny_teacher, tmp_path, capsys, extra, key):  # noqa: F811
    assert main(["distill", *_overrides(tiny_teacher, tmp_path / "run", 1, *extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and len(err.splitlines()) == 1, err


def test_meanvar_without_target_statistics_is_refused(tiny_teacher, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A task with no teacher statistics (as a T2I run with t2i.reference_samples=0) and no meanvar_target."""
    from dmd_dar.distill.task import NativeTask

    monkeypatch.setattr(NativeTask, "reference", lambda self, run_dir: {"mean": torch.zeros(3),
                                                                        "std": torch.ones(3)})
    assert main(["distill", *_overrides(tiny_teacher, tmp_path / "run", 1, *OPTIONS["meanvar"])]) == 2
    assert "method.meanvar_target" in capsys.readouterr().err
    assert main(["distill", *_overrides(tiny_teacher, tmp_path / "run2", 1, *OPTIONS["meanvar"],
                                        "method.meanvar_target=[0.0,0.3]")]) == 0


@pytest.mark.slow
def test_two_process_decoupled_run_keeps_identical_replicas(tiny_teacher, tmp_path):  # noqa: F811
    """Two DDP processes with the random schedule and meanvar (no critic phase; the target statistics measured by
    the main process and read from its cache by the other) run through and keep identical replicas. (That both
    draw the same schedules is the shared stream's property, tested above without processes.)"""
    out = tmp_path / "run"
    extra = ("run.cpu=true", *OPTIONS["meanvar"], "method.k_min=2", "method.k_max=4")
    _launch(["--multi_gpu"], ["-m", "dmd_dar.cli"], _overrides(tiny_teacher, out, 3, *extra), 29521)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["replicas_identical"] is True
