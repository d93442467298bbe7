"""The non-finite step guard: unit behaviour, and the trainer skipping / stopping on NaN critic losses."""

import pytest
import torch
from test_distill_trainer import _overrides, _read_logs, tiny_teacher  # noqa: F401 (tiny_teacher: fixture)

from dmd_dar.cli import main
from dmd_dar.distill.health import BadStepGuard, NonFiniteTrainingError
from dmd_dar.distill.method import DMD2
from dmd_dar.errors import UserError
from dmd_dar.training.checkpoint import Checkpointer, load_checkpoint
from dmd_dar.utils.io import load_safetensors


def test_guard_skips_and_counts():
    guard = BadStepGuard(3)
    assert guard.check(torch.tensor(1.0), 2.0, None)
    assert not guard.check(torch.tensor(float("nan")), phase="critic")
    assert not guard.check(torch.tensor([1.0, float("inf")]), phase="critic")
    assert guard.check(torch.tensor(0.5), phase="generator")  # another phase's good step: critic run goes on
    assert guard.consecutive["critic"] == 2 and guard.total == 2
    assert guard.check(torch.tensor(0.5), phase="critic")
    assert guard.consecutive["critic"] == 0 and guard.total == 2


def test_guard_stops_after_the_limit_with_a_clear_message():
    guard = BadStepGuard(2)
    assert not guard.check(float("nan"), phase="critic")
    with pytest.raises(NonFiniteTrainingError, match=r"2 non-finite critic steps in a row \(max_bad_steps=2") as exc:
        guard.check(float("nan"), phase="critic")
    assert isinstance(exc.value, UserError) and isinstance(exc.value, FloatingPointError)
    assert "last checkpoint is intact" in str(exc.value) and "\n" not in str(exc.value)


def _nan_critic_at(monkeypatch, calls: set[int]) -> None:
    """Make DMD2.critic_step return a NaN loss (still with its graph) on the given call numbers (= steps here)."""
    original, count = DMD2.critic_step, [0]

    def critic_step(self, *args, **kwargs):
        loss, logs = original(self, *args, **kwargs)
        count[0] += 1
        if count[0] - 1 in calls:
            loss = loss * float("nan")
        return loss, logs

    monkeypatch.setattr(DMD2, "critic_step", critic_step)


def test_trainer_skips_nan_critic_steps(tiny_teacher, tmp_path, monkeypatch):  # noqa: F811
    _nan_critic_at(monkeypatch, {1, 3})  # steps 1 and 3 are critic-only steps (method.ttur=2)
    out = tmp_path / "run"
    assert main(["distill", *_overrides(tiny_teacher, out, 4, "run.ckpt_every=1", "run.keep_checkpoints=5")]) == 0
    logs = _read_logs(out)
    assert [logs[s].get("health/skipped_critic_step") for s in (1, 2, 3, 4)] == [0.0, 1.0, 0.0, 1.0]
    assert logs[4]["health/bad_steps_total"] == 2.0

    def fake_after(done):
        return load_safetensors(out / "checkpoints" / f"step_{done:07d}" / "fake_score.safetensors")

    def unchanged(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    f1, f2, f3, f4 = (fake_after(done) for done in (1, 2, 3, 4))
    assert unchanged(f1, f2) and unchanged(f3, f4), "a skipped critic step must leave the fake score as it was"
    assert not unchanged(f2, f3), "the critic step after a skipped one trains normally"


def test_trainer_stops_after_max_bad_steps_and_keeps_the_checkpoint(tiny_teacher, tmp_path, monkeypatch,  # noqa: F811
                                                                    capsys):
    _nan_critic_at(monkeypatch, set(range(2, 100)))  # every critic step from step 2 on
    out = tmp_path / "run"
    assert main(["distill", *_overrides(tiny_teacher, out, 6, "max_bad_steps=2")]) == 2  # ckpt_every=2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 non-finite critic steps in a row (max_bad_steps=2" in err[0]
    latest = Checkpointer(out).latest()
    assert latest is not None and latest.name == "step_0000002"
    nets, _, state = load_checkpoint(latest)
    assert state["step"] == 2 and {"generator", "fake_score", "generator_ema"} <= nets.keys()
    assert not (out / "export").exists()
    assert _read_logs(out)[3]["health/skipped_critic_step"] == 1.0
