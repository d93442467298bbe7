"""Teacher pretraining: runs, checkpoints atomically, resumes exactly, exports a sampleable model."""

import json
from pathlib import Path

import pytest

from dmd_dar.cli import main
from dmd_dar.training.checkpoint import Checkpointer


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


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    import torch

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
