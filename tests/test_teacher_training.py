"""Teacher pretraining: runs, checkpoints atomically, resumes exactly, exports a sampleable model."""

import json
from pathlib import Path

import pytest
import torch

from dmd_dar.cli import main
from dmd_dar.errors import UserError
from dmd_dar.sampling import resolve_classes
from dmd_dar.training.checkpoint import Checkpointer
from dmd_dar.training.optim import OptimConfig


def _args(out: Path, steps: int, *extra: str) -> list[str]:
    return ["train-teacher", "model.image_size=16", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
            "data.image_size=16", f"run.out_dir={out}", f"run.steps={steps}", "run.batch_size=4", "run.log_every=1",
            "run.ckpt_every=2", "run.sample_every=0", "run.log_with=none", "run.progress=false",
            "diffusion.sample_steps=2", *extra]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_resume_gives_the_same_next_loss(tmp_path):
    assert main(_args(tmp_path / "full", 4)) == 0
    assert main(_args(tmp_path / "split", 2)) == 0
    assert main(_args(tmp_path / "split", 4)) == 0
    full, split = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert full[3] == split[3] and full[4] == split[4]
    assert (tmp_path / "split" / "export" / "model.safetensors").is_file()
    assert main(["sample", f"checkpoint={tmp_path / 'split' / 'export'}", "num_per_class=1", "steps=2",
                 f"out_dir={tmp_path / 's'}"]) == 0
    assert len((tmp_path / "s" / "manifest.jsonl").read_text().splitlines()) == 8
    assert main(["sample", f"checkpoint={tmp_path / 'split' / 'export'}", "num_per_class=1", "steps=2",
                 "classes=[rings,4]", f"out_dir={tmp_path / 's2'}"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "s2" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["class_id"], r["class_name"]) for r in recs] == [(5, "rings"), (4, "checkers")]


def test_init_from_fine_tunes_an_export_and_refuses_another_architecture(tmp_path, capsys):
    from dmd_dar.models import load_model

    assert main(_args(tmp_path / "base", 2)) == 0
    base = tmp_path / "base" / "export"
    # lr 1e-12: a fine-tuning run that starts from the export and barely moves exports the same weights
    for name, extra in (("tuned", [f"init_from={base}"]), ("scratch", [])):
        assert main(_args(tmp_path / name, 1, "optim.lr=1e-12", "optim.warmup_steps=0", "run.seed=7", *extra)) == 0
    want = load_model(base / "model.safetensors").state_dict()
    tuned = load_model(tmp_path / "tuned" / "export" / "model.safetensors").state_dict()
    scratch = load_model(tmp_path / "scratch" / "export" / "model.safetensors").state_dict()
    for k in want:
        torch.testing.assert_close(tuned[k], want[k], rtol=0, atol=1e-9)
    assert max((scratch[k] - want[k]).abs().max().item() for k in want) > 1e-2
    assert "initial weights from" in capsys.readouterr().out
    assert main(_args(tmp_path / "deeper", 1, f"init_from={base}", "model.depth=3")) == 2
    assert "model.depth (export 2, here 3)" in capsys.readouterr().err
    assert main(_args(tmp_path / "x0", 1, f"init_from={base}", "diffusion.prediction=x0")) == 2
    assert "diffusion.prediction='velocity'" in capsys.readouterr().err
    assert main(_args(tmp_path / "none", 1, f"init_from={tmp_path / 'missing'}")) == 2
    assert "no exported model here" in capsys.readouterr().err


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"net": {"w": torch.ones(2)}}, {}, {})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("dmd_dar.training.checkpoint.save_file", no_space)
    from dmd_dar.errors import UserError

    with pytest.raises(UserError, match="disk full"):
        ckpt.save(2, {"net": {"w": torch.zeros(2)}}, {}, {})
    assert ckpt.latest().name == "step_0000001"
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))
    from dmd_dar.training.checkpoint import load_checkpoint

    nets, _, state = load_checkpoint(ckpt.latest())
    assert state["step"] == 1 and nets["net"]["w"].tolist() == [1.0, 1.0]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "dmd_dar.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["sample", f"checkpoint={folder}"]) == 2
    assert str(folder) in capsys.readouterr().err


def test_cosine_schedule_warms_up_then_decays_towards_zero_at_the_last_update():
    import math

    from dmd_dar.training.optim import OptimConfig, build_optimizer, lr_schedule

    def lrs(decay: str) -> list[float]:
        cfg = OptimConfig(lr=1.0, warmup_steps=4, decay=decay)
        opt = build_optimizer([{"params": [torch.zeros(1, requires_grad=True)]}], cfg)
        sched, out = lr_schedule(opt, cfg, total_updates=12), []
        for _ in range(12):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    cosine, constant = lrs("cosine"), lrs("constant")
    assert cosine[:4] == constant[:4] == [0.25, 0.5, 0.75, 1.0]
    assert constant[4:] == [1.0] * 8
    # update k >= 4 uses 0.5 (1 + cos(pi (k - 4) / 8)): the full rate right after the warm-up, then strictly
    # decreasing; the last update still gets a small positive rate (0 would be one wasted update)
    assert cosine[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (k - 4) / 8)) for k in range(4, 12)])
    assert all(a > b for a, b in zip(cosine[4:], cosine[5:])) and 0 < cosine[-1] < 0.05


def test_a_first_phase_runs_at_its_own_scale_of_the_schedule():
    """``first_updates`` / ``first_scale`` (the distill warm start's rate): those updates at ``first_scale`` times
    the warm-up / decay factor, the rest at the plain schedule."""
    from dmd_dar.training.optim import OptimConfig, build_optimizer, lr_schedule

    cfg = OptimConfig(lr=1.0, warmup_steps=4)
    opt = build_optimizer([{"params": [torch.zeros(1, requires_grad=True)]}], cfg)
    sched, out = lr_schedule(opt, cfg, total_updates=8, first_updates=3, first_scale=10.0), []
    for _ in range(8):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert out == pytest.approx([2.5, 5.0, 7.5, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_cosine_decay_makes_the_step_count_part_of_the_resume_check(tmp_path, capsys):
    assert main(_args(tmp_path / "run", 2, "optim.decay=cosine")) == 0
    assert main(_args(tmp_path / "run", 4, "optim.decay=cosine")) == 2  # constant decay would resume
    assert "run.steps" in capsys.readouterr().err
    assert main(_args(tmp_path / "const", 2)) == 0 and main(_args(tmp_path / "const", 4)) == 0


def test_cosine_with_decay_steps_trains_in_stages_on_one_schedule(tmp_path):
    """optim.decay_steps fixes the cosine's end, so a run may grow run.steps on resume (the study's staged
    pretraining) and continues exactly as one uninterrupted run."""
    cosine = ("optim.decay=cosine", "optim.decay_steps=4", "optim.warmup_steps=1")
    assert main(_args(tmp_path / "full", 4, *cosine)) == 0
    assert main(_args(tmp_path / "staged", 2, *cosine)) == 0 and main(_args(tmp_path / "staged", 4, *cosine)) == 0
    full, staged = _losses(tmp_path / "full"), _losses(tmp_path / "staged")
    assert full[3] == staged[3] and full[4] == staged[4]
    with pytest.raises(UserError, match="optim.decay_steps=0"):
        OptimConfig(decay_steps=0)


def test_class_selection_takes_ids_and_names_in_order():
    names = ["smooth_blobs", "checkers", "rings"]
    assert resolve_classes(None, names, 3) == [0, 1, 2]
    assert resolve_classes(["rings", 0, "1"], names, 3) == [2, 0, 1]
    with pytest.raises(UserError, match="classes contains 3, but the model has classes 0..2"):
        resolve_classes([3], names, 3)
    with pytest.raises(UserError, match="'zebra'.*names: smooth_blobs, checkers, rings"):
        resolve_classes(["zebra"], names, 3)
    with pytest.raises(UserError, match="names a class twice"):
        resolve_classes(["rings", 2], names, 3)
