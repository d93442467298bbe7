"""Gradient accumulation in the distill trainer, and the EMA switch (ema_decay=0)."""

import json

import pytest
import torch
from accelerate import Accelerator
from test_distill_trainer import ROOT, _overrides, _read_logs, tiny_teacher  # noqa: F401 (tiny_teacher: fixture)

from dmd_dar.cli import main
from dmd_dar.distill import trainer
from dmd_dar.distill.health import BadStepGuard
from dmd_dar.utils.io import load_safetensors


class _Recorder:
    """Optimizer stand-in that records the gradients it is asked to step with."""

    def __init__(self, params):
        self.params, self.stepped_with = list(params), None

    def step(self):
        self.stepped_with = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def test_two_micro_batches_give_the_gradient_of_the_whole_batch():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    x, y = torch.randn(4, 5), torch.randn(4, 1)
    ((net(x) - y) ** 2).mean().backward()  # reference: one batch of 4
    whole = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = _Recorder(net.parameters())
    halves = [(x[:2], y[:2]), (x[2:], y[2:])]

    def micro_loss(m):
        xm, ym = halves[m]
        loss = ((net(xm) - ym) ** 2).mean()
        return loss, {"loss": loss.item()}

    stepped, norm, logs = trainer.accumulated_update(accelerator, [net], opt, list(net.parameters()), 0.0,
                                                     BadStepGuard(3), "critic", micro_loss)
    assert stepped and opt.stepped_with is not None
    for got, want in zip(opt.stepped_with, whole):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert norm == pytest.approx(torch.cat([g.flatten() for g in whole]).norm().item(), rel=1e-5)
    assert logs["loss"] == pytest.approx(((net(x) - y) ** 2).mean().item(), rel=1e-6)
    assert all(p.grad is None for p in net.parameters())


def test_grad_accum_resume_continues_exactly(tiny_teacher, tmp_path):  # noqa: F811
    def args(out, steps):
        return _overrides(tiny_teacher, out, steps, "run.batch_size=2", "run.grad_accum=2")

    full, split, plain = tmp_path / "full", tmp_path / "split", tmp_path / "plain"
    assert main(["distill", *args(full, 4)]) == 0
    assert main(["distill", *args(split, 2)]) == 0
    assert main(["distill", *args(split, 4)]) == 0  # resumes from step 2
    a, b = _read_logs(full), _read_logs(split)
    for step in (3, 4):
        for key in ("critic/fake_loss", "gen/dm_loss"):
            if key in b[step]:
                assert a[step][key] == b[step][key], (step, key)
    assert "gen/dm_loss" in b[3] and "critic/fake_loss" in b[4]
    # Micro-batch 0 is what a run without accumulation draws; the logged loss averages in micro-batch 1 as well.
    assert main(["distill", *_overrides(tiny_teacher, plain, 1, "run.batch_size=2")]) == 0
    assert _read_logs(plain)[1]["critic/fake_loss"] != a[1]["critic/fake_loss"]


def test_ema_decay_zero_exports_the_raw_student(tiny_teacher, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert main(["distill", *_overrides(tiny_teacher, out, 2, "ema_decay=0")]) == 0
    ckpt = out / "checkpoints" / "step_0000002"
    assert not (ckpt / "generator_ema.safetensors").exists()
    student, exported = load_safetensors(ckpt / "generator.safetensors"), load_safetensors(
        out / "export" / "model.safetensors")
    assert student.keys() == exported.keys()
    for k in student:
        assert torch.equal(student[k], exported[k]), k
    assert json.loads((ckpt / "state.json").read_text())["ema_updates"] == 0
    assert main(["distill", *_overrides(tiny_teacher, out, 3, "ema_decay=0")]) == 0  # resumes without an EMA
