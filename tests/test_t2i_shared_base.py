"""LoRA runs on one frozen base (``t2i.shared_base``, dmd_dar.t2i.lora.SharedBase) on tiny random SD3-like and
Flux-like pipelines: the same training as three copies of the base, one storage for teacher / student / fake
score, gradients only where they belong (activation checkpointing included), checkpoints and EMA without any base
tensor, exact resume, the export (peft + diffusers LoRA files, merged copy only when asked), and bad input."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dmd_dar.cli import find_command, main, resolve
from dmd_dar.config import build_config
from dmd_dar.distill import trainer
from dmd_dar.distill.config import DistillConfig
from dmd_dar.errors import UserError
from dmd_dar.routing import RoutingConfig
from dmd_dar.t2i.export import export_student, load_student
from dmd_dar.t2i.families import T2INet
from dmd_dar.t2i.lora import add_lora
from dmd_dar.t2i.task import DiffusersT2ITask
from dmd_dar.t2i.tiny import build_tiny_pipeline
from dmd_dar.training.checkpoint import Checkpointer, load_checkpoint
from dmd_dar.utils.io import load_safetensors

PROMPTS = ["a cat on a mat", "a red fox in the snow", "macro photo of a bee"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_shared")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    for family in ("sd3", "flux"):
        build_tiny_pipeline(family, root / family)
    return root


def common(root: Path, family: str) -> list[str]:
    return ["networks.teacher_kind=diffusers", f"t2i.model={root / family}", "t2i.dtype=float32", "t2i.height=16",
            "t2i.width=16", f"t2i.prompts=[{root / 'prompts.txt'}]", "t2i.max_sequence_length=8",
            f"t2i.embed_cache_dir={root / 'cache'}", "t2i.reference_samples=0", "t2i.teacher_steps=2",
            "t2i.grid_prompts=1", "method.regression_weight=0", "t2i.lora_rank=2"]


def distill(root: Path, family: str, out: Path, *extra: str) -> Path:
    args = ["distill", *common(root, family), f"run.out_dir={out}", "run.steps=3", "run.batch_size=2",
            "run.cpu=true", "run.log_every=1", "run.sample_every=0", "run.ckpt_every=0", "run.log_with=none",
            "run.progress=false", "method.ttur=1", "debug_grid_every=0", "ema_decay=0.5",
            "networks.gradient_checkpointing=true", *extra]
    assert main(args) == 0
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def last_checkpoint(run: Path):
    return load_checkpoint(Checkpointer(run).latest())


def make_task(root: Path, family: str = "sd3", *extra: str) -> DiffusersT2ITask:
    return DiffusersT2ITask(build_config(DistillConfig, [], [*common(root, family), *extra]), "cpu")


@pytest.mark.parametrize("family, extra", [
    ("sd3", ["networks.student_routing.kind=dar"]),
    ("flux", ["networks.fake_routing.kind=dar", "method.student_steps=2"]),  # DAR fake score, backward simulation
    ("sd3", ["run.mixed_precision=bf16"]),  # under bf16 autocast
])
def test_shared_base_trains_what_three_copies_train(root, tmp_path, family, extra):
    """Same losses at every step (to 1e-6), same exported adapter and routers, same EMA; and the shared run's
    checkpoint holds only LoRA matrices and routers (no base tensor), the copies' the whole transformer twice."""
    shared = distill(root, family, tmp_path / "shared", *extra)
    copies = distill(root, family, tmp_path / "copies", *extra, "t2i.shared_base=false")
    want, got = metrics(copies), metrics(shared)
    assert len(got) == len(want) == 3
    for w, g in zip(want, got):
        for key in ("gen/dm_loss", "critic/fake_loss", "gen/grad_norm", "critic/grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-8), (g["step"], key)
    for name in ("lora/adapter_model.safetensors", "dar_router.safetensors"):
        a, b = load_safetensors(copies / "export" / name), load_safetensors(shared / "export" / name)
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-8)
    assert any(v.abs().sum() > 0 for k, v in load_safetensors(shared / "export" / "lora" /
                                                               "adapter_model.safetensors").items() if "lora_B" in k)
    assert not (shared / "export" / "transformer").exists()  # no merged copy unless export.merge=true

    nets, _, _ = last_checkpoint(shared)
    for part in ("generator", "fake_score", "generator_ema"):
        keys = set(nets[part])
        assert keys and all(k.startswith(("adapter.", "model.router.", "model.text_router.")) for k in keys), part
        assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys if k.startswith("adapter."))
    base_numel = sum(v.numel() for v in last_checkpoint(copies)[0]["generator"].values())
    assert sum(v.numel() for v in nets["generator"].values()) < base_numel / 5
    # the shared run's EMA of the LoRA matrices is the copies' EMA of the same matrices
    copies_ema = last_checkpoint(copies)[0]["generator_ema"]
    for key, value in nets["generator_ema"].items():
        if key.startswith("adapter."):
            path, matrix = key[len("adapter."):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]  # ..., lora_A|lora_B
            name = f"model.transformer.{path.replace('__', '.')}.{matrix}.default.weight"
            torch.testing.assert_close(value, copies_ema[name], rtol=1e-6, atol=1e-8)


def test_one_base_and_gradients_only_where_they_belong(root):
    """Teacher, student and fake score compute with the same base tensors; the generator's backward reaches only the
    student's LoRA and routers, the critic's only the fake score's, the teacher builds no graph; under activation
    checkpointing the student's gradient is the same whether or not other networks ran between its forward and its
    backward (the recomputation re-binds the student's adapter)."""
    task = make_task(root, "sd3")
    torch.manual_seed(0)
    student = task.build_network(RoutingConfig(kind="dar", query="static_t"), True, role="student")
    fake = task.build_network(RoutingConfig(kind="dar", query="static"), True, role="fake")
    base = task.transformer
    assert student.model.transformer is base and fake.model.transformer is base and task.teacher.net.model is base
    base_ptrs = {p.data_ptr() for n, p in base.named_parameters() if "lora_" not in n}
    own = lambda net: {p.data_ptr() for p in net.parameters()}  # noqa: E731
    assert not (own(student) & base_ptrs) and not (own(fake) & base_ptrs) and not (own(student) & own(fake))
    assert all(not p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)
    with torch.no_grad():  # a student and a fake score that differ from the teacher and from each other
        for net, scale in ((student, 0.3), (fake, -0.2)):
            for p in net.adapter.parameters():
                p.normal_(0, abs(scale))
    batch = task.draw(2, torch.Generator().manual_seed(0), "cpu", False)
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        ref = task.teacher.net(batch.noise, t, batch.cond)
        assert not torch.allclose(student(batch.noise, t, batch.cond), ref, atol=1e-3)
        assert not torch.allclose(fake(batch.noise, t, batch.cond), student(batch.noise, t, batch.cond), atol=1e-3)
    assert not task.teacher.net(batch.noise, t, batch.cond).requires_grad  # frozen: no graph even with grad on

    def student_grads(interleave: bool) -> dict[str, torch.Tensor]:
        student.zero_grad(set_to_none=True)
        loss = student(batch.noise, t, batch.cond).square().mean()
        if interleave:  # what a generator step does between the student's forward and its backward
            with torch.no_grad():
                task.teacher.net(batch.noise, t, batch.cond)
                fake(batch.noise, t, batch.cond)
        loss.backward()
        return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    alone, interleaved = student_grads(False), student_grads(True)
    assert alone.keys() == {n for n, _ in student.named_parameters()}  # every LoRA matrix and router
    for k in alone:
        torch.testing.assert_close(interleaved[k], alone[k], rtol=0, atol=0)
    assert all(p.grad is None for p in base.parameters() if not p.requires_grad)
    assert all(p.grad is None for p in fake.parameters())
    student.zero_grad(set_to_none=True)
    fake(batch.noise, t, batch.cond).square().mean().backward()
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is not None for p in fake.adapter.parameters())
    assert all(p.grad is None for n, p in base.named_parameters() if "lora_" not in n)


def test_resume_is_exact_including_the_ema(root, tmp_path):
    """4 steps at once vs 2 steps, stop, resume to 4: the same losses after the resume, the same EMA and trained
    tensors in the last checkpoint, the same exported adapter."""
    whole = distill(root, "sd3", tmp_path / "whole", "run.steps=4", "run.ckpt_every=2")
    part = tmp_path / "part"
    distill(root, "sd3", part, "run.steps=2", "run.ckpt_every=2")
    distill(root, "sd3", part, "run.steps=4", "run.ckpt_every=2")
    want, got = metrics(whole), metrics(part)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for w, g in zip(want[2:], got[2:]):
        for key in ("gen/dm_loss", "critic/fake_loss", "gen/grad_norm"):
            assert g[key] == w[key], (g["step"], key)
    a, b = last_checkpoint(whole)[0], last_checkpoint(part)[0]
    for part_name in ("generator", "fake_score", "generator_ema"):
        assert a[part_name].keys() == b[part_name].keys()
        for k in a[part_name]:
            assert torch.equal(a[part_name][k], b[part_name][k]), (part_name, k)
    lora = "export/lora/adapter_model.safetensors"
    x, y = load_safetensors(whole / lora), load_safetensors(part / lora)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_resume_against_another_base_is_refused(root, tmp_path):
    model = tmp_path / "sd3"
    shutil.copytree(root / "sd3", model)
    args = [f"t2i.model={model}", "run.steps=1", "run.ckpt_every=1"]
    run = distill(root, "sd3", tmp_path / "run", *args)
    weights = next((model / "transformer").glob("*.safetensors"))
    state = load_safetensors(weights)
    key = next(k for k in state if k.endswith("proj_out.weight"))
    state[key] = state[key] + 0.01
    save_file(state, str(weights))
    with pytest.raises(UserError, match="other teacher weights"):
        trainer.run(resolve(find_command("distill"), [], [*common(root, "sd3"), f"run.out_dir={run}", *args,
                                                           "run.steps=2", "run.cpu=true", "run.log_with=none",
                                                           "run.batch_size=2", "run.log_every=1", "run.progress=false",
                                                           "run.sample_every=0", "method.ttur=1", "ema_decay=0.5",
                                                           "debug_grid_every=0",
                                                           "networks.gradient_checkpointing=true"]))


def test_export_loads_in_diffusers_and_dmd_dar_without_a_merged_copy(root, tmp_path):
    """A residual student on the shared base with trained-looking LoRA: ``pipe.load_lora_weights`` of the exported
    adapter on the stock teacher pipeline, and ``load_student`` (no transformer/ in the export), compute it."""
    from diffusers import DiffusionPipeline

    task = make_task(root, "sd3")
    student = task.build_network(RoutingConfig(kind="residual"), False, role="student").eval()
    task.build_network(RoutingConfig(kind="residual"), False, role="fake")
    with torch.no_grad():
        for p in student.adapter.parameters():
            p.normal_(0, 0.3)
    folder = export_student(student, tmp_path / "export", task)
    assert not (folder / "transformer").exists() and (folder / "lora" / "pytorch_lora_weights.safetensors").is_file()
    batch = task.draw(2, torch.Generator().manual_seed(5), "cpu", False)
    t = torch.tensor([0.7, 0.4])
    with torch.no_grad():
        want = student(batch.noise, t, batch.cond)
        assert (want - task.teacher.net(batch.noise, t, batch.cond)).abs().max() > 1e-3
        loaded, info = load_student(folder)
        assert info["merged"] is False
        torch.testing.assert_close(loaded(batch.noise, t, batch.cond), want, atol=1e-5, rtol=1e-5)
        pipe = DiffusionPipeline.from_pretrained(task.source, local_files_only=True)
        pipe.load_lora_weights(str(folder / "lora"))
        got = T2INet(pipe.transformer, task.family)(batch.noise, t, batch.cond)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merge_without_disk_space_still_exports_the_adapter(root, tmp_path, monkeypatch):
    task = make_task(root, "sd3")
    student = task.build_network(RoutingConfig(kind="dar"), False, role="student")
    import dmd_dar.t2i.export as export_module

    monkeypatch.setattr(export_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(UserError, match=r"export.merge=true: the merged transformer needs .* export.merge=false"):
        export_student(student, tmp_path / "export", task, merge=True)
    assert (tmp_path / "export" / "lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "export" / "dar_router.safetensors").is_file()
    assert not (tmp_path / "export" / "transformer").exists()
    monkeypatch.undo()
    export_student(student, tmp_path / "merged", task, merge=True)  # with space: the merged copy equals the student
    assert (tmp_path / "merged" / "transformer" / "config.json").is_file()


def test_adapter_name_collision_with_the_pipeline_is_refused(root):
    task = make_task(root, "sd3")
    add_lora(task.transformer, 2, None, ["to_q"], adapter_name="student")  # a pipeline that already has one
    with pytest.raises(UserError, match=r"t2i.student_adapter='student': .* already has an adapter of that name"):
        task.build_network(RoutingConfig(kind="dar"), False, role="student")


def test_fake_score_can_start_from_and_track_the_student(root, tmp_path):
    """fake_init=student: the fake score's first critic loss is that of the student's copy (here the student
    equals the teacher at step 0, so compare the tensors); fake_track_student: after each fake update the fake
    adapter moves toward the student's by (1 - d)."""
    from dmd_dar.distill.state import copy_shared_tensors

    task = make_task(root, "sd3")
    student = task.build_network(RoutingConfig(kind="dar"), False, role="student")
    fake = task.build_network(RoutingConfig(kind="dar"), False, role="fake")
    with torch.no_grad():
        for p in student.parameters():
            p.normal_()
    copy_shared_tensors(student, fake)
    s, f = dict(student.named_parameters()), dict(fake.named_parameters())
    assert s.keys() == f.keys() and all(torch.equal(s[k], f[k]) for k in s)
    assert all(s[k].data_ptr() != f[k].data_ptr() for k in s)
    tracked = distill(root, "sd3", tmp_path / "tracked", "networks.fake_track_student=0.5", "run.steps=1")
    plain = distill(root, "sd3", tmp_path / "plain", "run.steps=1")
    nets_t, nets_p = last_checkpoint(tracked)[0], last_checkpoint(plain)[0]
    for k, fake_p in nets_p["fake_score"].items():  # one critic update, then the merge with the student
        want = 0.5 * fake_p + 0.5 * nets_p["generator"][k]
        torch.testing.assert_close(nets_t["fake_score"][k], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("override, named", [
    (["t2i.fake_adapter=student"], "t2i.student_adapter='student' and t2i.fake_adapter='student' must be two"),
    (["t2i.offload_teacher=true"], "t2i.offload_teacher=true with t2i.shared_base=true"),
    (["networks.fake_init=copy"], "networks.fake_init='copy'; choose teacher or student"),
    (["networks.fake_track_student=1.0"], "networks.fake_track_student=1.0 must lie in [0, 1)"),
])
def test_bad_shared_base_settings_are_refused(root, override, named):
    with pytest.raises(UserError, match=re.escape(named)):
        build_config(DistillConfig, [], [*common(root, "sd3"), *override])
