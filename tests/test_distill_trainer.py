"""The distill trainer end to end on a tiny teacher: phases, resume, bad input (multi-process: test_distill_fsdp)."""

import copy
import json
from pathlib import Path

import pytest
import torch

from dmd_dar.artifact import ArtifactMeta, DiffusionConfig, save_artifact
from dmd_dar.cli import main
from dmd_dar.config import build_config
from dmd_dar.distill.config import DistillConfig
from dmd_dar.distill.denoiser import Denoiser
from dmd_dar.distill.method import DMD2, MicroBatch, RegressionPairs
from dmd_dar.distill.trainer import build_task
from dmd_dar.models import build_model, preset_config
from dmd_dar.routing import RoutingConfig, routing_parameters
from dmd_dar.training.checkpoint import load_checkpoint
from dmd_dar.utils.io import load_safetensors

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

    student = task.build_network(cfg.networks.student_routing, False)
    fake = task.build_network(RoutingConfig(kind="dar", query="dynamic"), False)
    head = GANHead(task.feature_dim)
    path, null = task.teacher.path, task.teacher.null_cond
    method = DMD2(cfg.method, Denoiser(student, path, null), Denoiser(fake, path, null), task.teacher,
                  task.student_times, gan_head=head)
    gen = torch.Generator().manual_seed(0)
    micro = MicroBatch(task.draw(4, gen, "cpu", need_real=True), gen, torch.Generator().manual_seed(1))
    loss, _ = method.generator_step(micro)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in routing_parameters(student))
    assert all(p.grad is None for p in fake.parameters()), "the generator step must not train the fake score"
    assert all(p.grad is None for p in head.parameters()), "the generator step must not train the GAN head"
    assert all(p.grad is None for p in task.net.parameters()), "the teacher never gets a gradient"
    student.zero_grad(set_to_none=True)
    assert micro.sample is not None and not micro.sample.requires_grad  # kept for this iteration's critic
    c_loss, _ = method.critic_step(micro)
    c_loss.backward()
    assert all(p.grad is None for p in student.parameters()), "the critic step must not train the generator"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())
    assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad is None for p in task.net.parameters())


def test_generator_gradient_with_gan_equals_the_direct_gradient(tiny_teacher):
    """The GAN term reaches the student through its own backward (method._gan_generator_grad); the student's
    gradient must equal that of the plain sum w_dm * L_dm + w_gan * L_gan, and the logged loss its value."""
    from dmd_dar.distill.denoiser import Denoiser
    from dmd_dar.distill.gan import GANHead, score_features
    from dmd_dar.distill.losses import distribution_matching_loss, gan_generator_loss
    from dmd_dar.distill.method import _uniform

    cfg = build_config(DistillConfig, [], _overrides(tiny_teacher, Path("unused"), 1, "method.gan_weight=0.3",
                                                     "method.dm_weight=0.7"))
    task = build_task(cfg, "cpu")
    torch.manual_seed(1)
    fake, head = task.build_network(RoutingConfig(kind="residual"), False).eval(), GANHead(task.feature_dim)
    with torch.no_grad():  # eval: no label dropout; perturbed: a fake score unlike the teacher, a real DM gradient
        for p in fake.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path, null = task.teacher.path, task.teacher.null_cond
    method = DMD2(cfg.method, Denoiser(fake, path, null), Denoiser(fake, path, null), task.teacher,
                  task.student_times, gan_head=head)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    cond = torch.tensor([0, 3, 5, 7])
    loss, logs, _ = method.generator_loss(x, cond, torch.Generator().manual_seed(5))
    (got,) = torch.autograd.grad(loss, x)

    gen = torch.Generator().manual_seed(5)  # the same draws, in the same order, summed directly
    t = method.dm_timesteps(4, gen)
    x_t = path.add_noise(x.detach(), torch.randn(x.shape, generator=gen), t)
    with torch.no_grad():
        x0_real = task.teacher.x0(x_t, t, cond, guidance=cfg.method.guidance_scale)
        x0_fake = method.fake.x0(x_t, t, cond, guidance=cfg.method.fake_guidance_scale)
    t_g = _uniform(4, 0.0, cfg.method.gan_max_t, gen).float()
    x_g = path.add_noise(x, torch.randn(x.shape, generator=gen), t_g)
    direct = 0.7 * distribution_matching_loss(x, x0_real, x0_fake) + 0.3 * gan_generator_loss(
        head(score_features(fake, x_g, t_g, cond, cfg.method.gan_feature)))
    (want,) = torch.autograd.grad(direct, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    assert logs["gen/loss"] == pytest.approx(direct.item(), rel=1e-6)
    assert all(p.grad is None for p in [*fake.parameters(), *head.parameters()])


def test_student_starts_equal_to_teacher(tiny_teacher):
    cfg = build_config(DistillConfig, [], _overrides(tiny_teacher, Path("unused"), 1))
    task = build_task(cfg, "cpu")
    student = task.build_network(RoutingConfig(kind="dar", query="static_t", chunk_size=2), False).eval()
    x, t, y = torch.randn(3, 3, 16, 16), torch.rand(3), torch.tensor([0, 1, 2])
    torch.testing.assert_close(student(x, t, y), task.net(x, t, y), atol=1e-5, rtol=1e-5)


def test_student_and_fake_score_do_not_drop_labels(tiny_teacher):
    """The teacher's label dropout (0.1, a CFG-pretraining device) is off in both distillation networks: their
    training-mode forward equals their eval-mode forward, and the exported config says so; the teacher keeps it."""
    cfg = build_config(DistillConfig, [], _overrides(tiny_teacher, Path("unused"), 1))
    task = build_task(cfg, "cpu")
    x, t, y = torch.randn(128, 3, 16, 16), torch.rand(128), torch.arange(128) % 8
    teacher = copy.deepcopy(task.net)
    torch.manual_seed(0)
    with torch.no_grad():  # the same copy in .train() drops labels: at 128 samples the check below has teeth
        assert not torch.equal(teacher.train()(x, t, y), teacher.eval()(x, t, y))
    for routing in (cfg.networks.student_routing, cfg.networks.fake_routing):
        net = task.build_network(routing, False)
        assert net.training and net.cfg.class_dropout_prob == 0.0
        with torch.no_grad():
            train_out = net(x, t, y)
            eval_out = net.eval()(x, t, y)
        assert torch.equal(train_out, eval_out), routing.kind
        torch.testing.assert_close(eval_out, task.net(x, t, y), atol=1e-5, rtol=1e-5)  # the teacher's function
    assert task.net.cfg.class_dropout_prob == 0.1 and task.net.y_embedder.dropout_prob == 0.1


def test_resume_continues_exactly(tiny_teacher, tmp_path):
    """Stopped at step 2 and resumed to 4, a run logs the same losses as an uninterrupted 4-step run, and ends
    with bitwise the same networks, EMA and export (what users sample from)."""
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["distill", *_overrides(tiny_teacher, full, 4)]) == 0
    assert main(["distill", *_overrides(tiny_teacher, split, 2)]) == 0
    assert main(["distill", *_overrides(tiny_teacher, split, 4)]) == 0  # resumes from step 2
    a, b = _read_logs(full), _read_logs(split)
    for step in (3, 4):  # whole rows: step 4 (no generator update, ttur=2) carries step 3's generator logs
        assert a[step] == b[step], step
    assert "critic/fake_loss" in b[4] and "gen/dm_loss" in b[4]
    logged = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4], "the second run must continue at step 3, not start again"
    last = Path("checkpoints") / "step_0000004"
    for name in ("generator_ema", "generator", "fake_score"):
        want, got = (load_safetensors(run / last / f"{name}.safetensors") for run in (full, split))
        assert want.keys() == got.keys() and want
        for k in want:
            assert torch.equal(want[k], got[k]), (name, k)
    want, got = (load_safetensors(run / "export" / "model.safetensors") for run in (full, split))
    assert want.keys() == got.keys() and want
    for k in want:
        assert torch.equal(want[k], got[k]), ("export", k)
    states = [json.loads((run / last / "state.json").read_text()) for run in (full, split)]
    assert states[0]["ema_updates"] == states[1]["ema_updates"] == 2  # generator updates: steps 0, 2 (ttur=2)
    initial = load_safetensors(split / "checkpoints" / "step_0000002" / "generator_ema.safetensors")
    assert any(not torch.equal(initial[k], got[k]) for k in got), "the resumed run's EMA must have moved on"


def test_a_logged_row_holds_each_phase_s_latest_update_only(tiny_teacher, tmp_path, monkeypatch):
    """A key the latest generator update did not log (a dm_grad/* timestep bucket its batch missed) is not carried
    over from an older update, which a resumed run could not reproduce; an iteration without a generator update
    (ttur=2) logs the latest one's."""
    buckets = iter([{"dm_grad/first": 1.0}, {"dm_grad/second": 2.0}])
    monkeypatch.setattr("dmd_dar.distill.method.per_bucket_rms", lambda *args: next(buckets))
    out = tmp_path / "run"
    assert main(["distill", *_overrides(tiny_teacher, out, 4)]) == 0  # generator updates at steps 1 and 3
    logs = _read_logs(out)
    assert logs[1]["dm_grad/first"] == logs[2]["dm_grad/first"] == 1.0
    assert logs[2]["gen/dm_loss"] == logs[1]["gen/dm_loss"]
    assert logs[3]["dm_grad/second"] == logs[4]["dm_grad/second"] == 2.0
    assert "dm_grad/first" not in logs[3] and "dm_grad/first" not in logs[4]


def test_resume_with_changed_config_names_the_keys(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *_overrides(tiny_teacher, out, 2)]) == 0
    assert main(["distill", *_overrides(tiny_teacher, out, 4, "method.guidance_scale=3.0")]) == 2
    assert "method.guidance_scale" in capsys.readouterr().err


def test_resume_against_changed_teacher_is_refused(tiny_teacher, tmp_path, capsys):
    """Same config, but the teacher folder now holds other weights (same shapes, then another architecture): the run
    must not resume silently against a different objective; both cases name the fix."""
    import shutil

    from dmd_dar.artifact import load_artifact

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    out = tmp_path / "run"
    assert main(["distill", *_overrides(teacher, out, 2)]) == 0
    model, meta = load_artifact(teacher)
    with torch.no_grad():
        model.final_layer.linear.bias.add_(0.1)
    save_artifact(teacher, model, meta)
    assert main(["distill", *_overrides(teacher, out, 4)]) == 2
    err = capsys.readouterr().err
    assert "other teacher weights" in err and "run.out_dir" in err
    # another architecture (a checkpoint written before the teacher gained attention bias tables)
    biased = build_model(preset_config("tiny", num_classes=8, relative_position_bias=True))
    biased.load_state_dict(model.state_dict(), strict=False)
    save_artifact(teacher, biased.eval(), meta)
    state_files = list((out / "checkpoints").glob("step_*/state.json"))
    assert state_files
    for state_file in state_files:  # drop the recorded teacher digest, as in checkpoints of older versions
        state = json.loads(state_file.read_text())
        assert state.pop("teacher")
        state_file.write_text(json.dumps(state))
    assert main(["distill", *_overrides(teacher, out, 4)]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "position_bias" in err and "run.out_dir" in err


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




def test_warm_start_trains_the_student_on_the_pairs_alone(tiny_teacher, tmp_path):
    """``method.warm_start_steps=2``: iterations 0 and 1 update the generator on the regression loss alone (also
    iteration 1, which TTUR 2 would skip) and leave the fake score untouched; DMD and the critic start at 2."""
    out = tmp_path / "run"
    extra = ("method.warm_start_steps=2", "method.regression_pairs=8", "method.regression_steps=2")
    assert main(["distill", *_overrides(tiny_teacher, out, 3, *extra)]) == 0
    logs = _read_logs(out)
    for step in (1, 2):
        assert "gen/regression_loss" in logs[step] and "gen/dm_loss" not in logs[step], step
        assert "critic/fake_loss" not in logs[step], step
    assert "gen/dm_loss" in logs[3] and "critic/fake_loss" in logs[3]
    warm = Path("checkpoints") / "step_0000002"
    state = json.loads((out / warm / "state.json").read_text())
    assert state["ema_updates"] == 2  # a generator update at each warm-start iteration
    fake = load_safetensors(out / warm / "fake_score.safetensors")
    teacher = load_safetensors(tiny_teacher / "model.safetensors")
    assert fake and all(torch.equal(fake[k], teacher[k]) for k in fake), "the warm start must not train the critic"
    student = load_safetensors(out / warm / "generator.safetensors")
    assert any(not torch.equal(student[k], teacher[k]) for k in student if k in teacher)


def test_warm_start_runs_at_its_own_learning_rate(tiny_teacher, tmp_path):
    """``method.warm_start_lr``: the generator's rate for the warm start's updates, ``generator_optim.lr`` after it
    (no warm-up: the rates are exact); the fake score keeps its own rate throughout."""
    out = tmp_path / "run"
    extra = ("method.warm_start_steps=2", "method.warm_start_lr=1e-3", "generator_optim.lr=1e-5",
             "generator_optim.warmup_steps=0", "fake_optim.lr=3e-4", "fake_optim.warmup_steps=0",
             "method.regression_pairs=8", "method.regression_steps=2", "run.ckpt_every=1", "run.keep_checkpoints=3")
    assert main(["distill", *_overrides(tiny_teacher, out, 3, *extra)]) == 0
    # A checkpoint's optimizer holds the rate of the next update: steps 1 -> warm start, 2 and 3 -> DMD.
    rates = {}
    for step in (1, 2, 3):
        _, optimizers, _ = load_checkpoint(out / "checkpoints" / f"step_{step:07d}")
        rates[step] = [g["lr"] for g in optimizers["generator"]["param_groups"]]
    assert rates[1] == pytest.approx([1e-3] * len(rates[1]))
    assert rates[2] == rates[3] == pytest.approx([1e-5] * len(rates[2]))
    fake_rates = [g["lr"] for g in optimizers["fake"]["param_groups"]]  # step 3's
    assert fake_rates == pytest.approx([3e-4] * len(fake_rates))


def test_warm_start_loss_is_the_mse_to_the_teacher_pairs(tiny_teacher):
    """The warm-start loss is mean((G(z_i) - x_i)^2) over pairs drawn from the cache, G the one-step student."""
    cfg = build_config(DistillConfig, [], _overrides(tiny_teacher, Path("unused"), 1, "method.warm_start_steps=1"))
    task = build_task(cfg, "cpu")
    student = task.build_network(cfg.networks.student_routing, False)
    path, null = task.teacher.path, task.teacher.null_cond
    pairs = RegressionPairs(torch.randn(5, 3, 16, 16), torch.arange(5) % 8, torch.randn(5, 3, 16, 16))
    method = DMD2(cfg.method, Denoiser(student, path, null), None, task.teacher, task.student_times,
                  regression=pairs)
    micro = MicroBatch(task.draw(4, torch.Generator().manual_seed(0), "cpu", need_real=False),
                       torch.Generator().manual_seed(3), torch.Generator().manual_seed(1))
    loss, logs = method.warm_start_step(micro)
    idx = torch.randint(5, (4,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        t0 = torch.full((4,), task.student_times[0])
        x = Denoiser(student, path, null).x0(pairs.noise[idx], t0, pairs.cond[idx])
    torch.testing.assert_close(loss.detach(), ((x - pairs.target[idx]) ** 2).mean())
    torch.testing.assert_close(micro.sample, x)
    assert logs["gen/regression_loss"] == pytest.approx(loss.item())


@pytest.mark.parametrize("method, student_times, needs_real", [
    ({}, [1.0], False),  # one step from pure noise
    ({"gan_weight": 0.1}, [1.0], True),  # the discriminator sees real images
    ({"backward_simulation": False}, [1.0, 0.5], True),  # few-step inputs: real images noised to t_k
    ({}, [1.0, 0.5], False),  # backward simulation: the student's own outputs
])
def test_the_method_says_whether_it_needs_real_images(method, student_times, needs_real):
    from dmd_dar.diffusion.paths import make_path
    from dmd_dar.distill.config import MethodConfig
    from dmd_dar.distill.denoiser import Denoiser
    from dmd_dar.distill.gan import GANHead

    score = Denoiser(torch.nn.Identity(), make_path("flow", "velocity"))
    dmd = DMD2(MethodConfig(**method), score, score, score, student_times, gan_head=GANHead(4))
    assert dmd.needs_real is needs_real


@pytest.mark.parametrize("extra, forced, drawn_real", [
    ((), False, False),
    (("method.gan_weight=0.1",), False, True),
    ((), True, True),  # the trainer asks the method, whatever the flags say
])
def test_the_trainer_draws_real_images_when_the_method_needs_them(tiny_teacher, tmp_path, monkeypatch, extra,
                                                                   forced, drawn_real):
    from dmd_dar.distill.task import NativeTask

    asked, draw = [], NativeTask.draw

    def recording_draw(self, batch_size, gen, device, need_real):
        asked.append(need_real)
        return draw(self, batch_size, gen, device, need_real)

    monkeypatch.setattr(NativeTask, "draw", recording_draw)
    if forced:
        monkeypatch.setattr(DMD2, "needs_real", property(lambda self: True))
    assert main(["distill", *_overrides(tiny_teacher, tmp_path / "run", 2, *extra)]) == 0
    assert asked == [drawn_real] * 2  # one draw per step (one micro-batch)
