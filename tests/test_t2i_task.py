"""DiffusersT2ITask on tiny random SD3-like and Flux-like pipelines saved to disk and loaded back through
``from_pretrained(local_files_only=True)``: the teacher reproduces the diffusers pipeline's own sampler (timestep
conventions, CFG vs embedded guidance, flow shift, packing), the text-embedding cache, LoRA, export/load_student."""

import numpy as np
import pytest
import torch

from dmd_dar.config import build_config
from dmd_dar.diffusion.samplers import sample_ode
from dmd_dar.distill.config import DistillConfig
from dmd_dar.errors import UserError
from dmd_dar.routing import RoutingConfig
from dmd_dar.t2i import embeddings as E
from dmd_dar.t2i.families import pack, unpack
from dmd_dar.t2i.task import DiffusersT2ITask
from dmd_dar.t2i.tiny import build_tiny_pipeline

PROMPTS = ["a cat on a mat", "a red fox in the snow", "macro photo of a bee"]
CLASS_IDS = ["1", "3", "7"]  # the tiny DiT's "prompts"


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "class_ids.txt").write_text("\n".join(CLASS_IDS) + "\n")
    for family in ("sd3", "flux", "dit"):
        build_tiny_pipeline(family, root / family)
    return root


def make_cfg(root, family, *extra):
    prompts = root / ("class_ids.txt" if family == "dit" else "prompts.txt")
    return build_config(DistillConfig, [], [
        "networks.teacher_kind=diffusers", f"t2i.model={root / family}", "t2i.dtype=float32", "t2i.height=16",
        "t2i.width=16", f"t2i.prompts=[{prompts}]", "t2i.max_sequence_length=8",
        f"t2i.embed_cache_dir={root / 'cache'}", "t2i.reference_samples=2", "t2i.teacher_steps=2",
        "t2i.grid_prompts=1", "method.guidance_scale=3.0", "method.regression_weight=0", *extra])


@pytest.fixture(scope="module")
def tasks(pipes):
    return {f: DiffusersT2ITask(make_cfg(pipes, f), "cpu") for f in ("sd3", "flux", "dit")}


def test_teacher_reproduces_the_diffusers_pipeline_sd3(tasks):
    """Our Euler sampler over the teacher Denoiser (t*1000, CFG on '' , shift 3) == StableDiffusion3Pipeline."""
    from diffusers import DiffusionPipeline

    task = tasks["sd3"]
    assert task.guidance_form == "cfg" and task.shift == 3.0 and task.latent_shape == (4, 8, 8)
    pipe = DiffusionPipeline.from_pretrained(task.source, local_files_only=True)
    z = torch.randn(1, *task.latent_shape)
    steps = 3
    with torch.no_grad():
        ref = pipe(PROMPTS[0], height=16, width=16, num_inference_steps=steps, guidance_scale=3.0, latents=z,
                   output_type="latent", max_sequence_length=8,
                   sigmas=list(np.linspace(1.0, 0.0, steps + 1)[:-1])).images
        cond = task.condition([PROMPTS[0]])
        ours = _cfg_sample(task, cond, z, steps)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def _cfg_sample(task, cond, z, steps):
    from dmd_dar.diffusion.samplers import guided

    net = task.teacher.net
    denoise = guided(lambda x, t, c: net(x, t, c), 3.0, cond, task.null_cond(cond))
    return sample_ode("euler", denoise, task.path, z, steps, shift=task.shift)


def test_teacher_reproduces_the_diffusers_pipeline_flux(tasks):
    """Embedded guidance (one pass, no null condition), t in [0, 1], dynamic shift exp(mu), 2x2 packing."""
    from diffusers import DiffusionPipeline

    task = tasks["flux"]
    assert task.guidance_form == "embedded" and task.teacher.null_cond is None
    assert task.latent_shape == (4, 8, 8) and task.image_tokens == 16
    pipe = DiffusionPipeline.from_pretrained(task.source, local_files_only=True)
    z = torch.randn(1, *task.latent_shape)
    steps = 3
    with torch.no_grad():
        ref = pipe(PROMPTS[1], height=16, width=16, num_inference_steps=steps, guidance_scale=3.0,
                   latents=pack(z), output_type="latent", max_sequence_length=8).images
        cond = task.condition([PROMPTS[1]])
        g = torch.full((1,), 3.0)
        ours = sample_ode("euler", lambda x, t: task.teacher.net(x, t, {**cond, "guidance": g}), task.path, z, steps,
                          shift=task.shift)
        # the DMD real score uses the same single pass
        t = torch.tensor([0.6])
        x0 = task.teacher.x0(z, t, cond, guidance=3.0)
        v = task.teacher.net(z, t, {**cond, "guidance": g})
    torch.testing.assert_close(ours, unpack(ref, 8, 8), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x0, z - 0.6 * v)


def test_text_cache_hit_on_the_second_run(pipes, tasks, monkeypatch):
    first = tasks["sd3"]
    assert first.cache.misses == len(PROMPTS) + 1  # + the negative prompt
    files = sorted(p.name for p in first.cache.root.rglob("*.safetensors"))

    def boom(*a, **k):
        raise AssertionError("text encoders used on a fully cached run")

    monkeypatch.setattr(E, "encode_with_pipeline", boom)
    loaded = []
    import dmd_dar.t2i.loading as L

    real = L.load_pipeline
    monkeypatch.setattr(L, "load_pipeline", lambda *a, **k: loaded.append(k.get("skip")) or real(*a, **k))
    second = DiffusersT2ITask(make_cfg(pipes, "sd3"), "cpu")
    assert second.cache.misses == 0 and second.cache.hits == len(PROMPTS) + 1
    assert {"text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer"} <= set(loaded[0])
    assert sorted(p.name for p in first.cache.root.rglob("*.safetensors")) == files
    torch.testing.assert_close(second.condition(PROMPTS)["prompt_embeds"], first.condition(PROMPTS)["prompt_embeds"])


def test_lora_trains_only_adapters_and_routers(tasks):
    task = tasks["sd3"]
    task.tc.lora_rank = 4
    try:
        net = task.build_network(RoutingConfig(kind="dar", query="static_t"), gradient_checkpointing=True)
    finally:
        task.tc.lora_rank = 0
    from dmd_dar.t2i.lora import has_lora

    assert not has_lora(task.transformer)  # the real score never runs through the student's adapters
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".router." in n or n.startswith("model.router.") for n in trainable)
    assert any(n.startswith("model.router.") for n in trainable) and any("lora_B" in n for n in trainable)
    groups = task.param_groups(net, 1e-4, 1e-3, 0.01)
    assert {g["name"] for g in groups} == {"decay", "routing"}  # LoRA matrices decay; routers have their own group
    assert next(g for g in groups if g["name"] == "routing")["lr"] == 1e-3
    batch = task.draw(2, torch.Generator().manual_seed(0), "cpu", False)
    out = net(batch.noise, torch.tensor([0.9, 0.3]), batch.cond)
    out.square().mean().backward()
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= trainable
    assert any("lora_A" in n for n in with_grad)  # B is zero at init, so A's gradient is 0, but it exists


def test_residual_student_equals_teacher_and_dar_is_function_preserving(tasks):
    task = tasks["flux"]
    batch = task.draw(2, torch.Generator().manual_seed(1), "cpu", False)
    t = torch.tensor([0.8, 0.2])
    with torch.no_grad():
        ref = task.teacher.net(batch.noise, t, batch.cond)
        for kind in ("residual", "dar"):
            net = task.build_network(RoutingConfig(kind=kind), gradient_checkpointing=False)
            torch.testing.assert_close(net(batch.noise, t, batch.cond), ref, atol=1e-5, rtol=1e-5)
    assert task.embedded_guidance == 3.0  # the student / fake input when cond has no guidance


@pytest.mark.parametrize("family", ["dit", "sd3", "flux"])
def test_distillation_networks_run_in_train_mode_as_in_eval(tasks, family):
    """The student and the fake score are trained in .train(); there they must compute their .eval() function.
    DiT's per-block label embedders drop labels with p = 0.1 (each block on its own) in the stock model, which
    the teacher keeps (checked: at 64 samples it differs between modes); build_network switches that off. SD3 and
    Flux (here with LoRA on the fake score, peft's dropout included) have nothing that differs between modes."""
    task = tasks[family]
    batch = task.draw(64, torch.Generator().manual_seed(3), "cpu", False)
    t = torch.rand(64, generator=torch.Generator().manual_seed(4))
    teacher = task.teacher.net
    torch.manual_seed(0)  # the stock label dropout's draws
    with torch.no_grad():
        ref = teacher(batch.noise, t, batch.cond)
        dropped = teacher.train()(batch.noise, t, batch.cond)
    teacher.eval()
    if family == "dit":
        assert not torch.equal(dropped, ref)  # the stock DiT drops labels in .train(): what the test must catch
    for routing, lora in ((RoutingConfig(kind="dar", query="static_t"), 0), (RoutingConfig(kind="residual"), 4)):
        task.tc.lora_rank = lora if family != "dit" else 0
        try:
            net = task.build_network(routing, gradient_checkpointing=False)
        finally:
            task.tc.lora_rank = 0
        assert net.training
        with torch.no_grad():
            train_out = net(batch.noise, t, batch.cond)
            eval_out = net.eval()(batch.noise, t, batch.cond)
        assert torch.equal(train_out, eval_out), routing.kind
        torch.testing.assert_close(eval_out, ref, atol=1e-5, rtol=1e-5)  # still the teacher's function at step 0


def test_export_and_load_student_with_lora(tasks, tmp_path):
    """Trained-looking student (non-zero LoRA B, non-zero router queries) -> export -> load_student: same function;
    plain diffusers on transformer/ is the residual twin; the peft adapter on the teacher = the merged weights."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    from dmd_dar.t2i.export import export_student, load_student
    from dmd_dar.utils.io import load_safetensors

    task = tasks["sd3"]
    task.tc.lora_rank = 4
    try:
        net = task.build_network(RoutingConfig(kind="dar", query="static"), gradient_checkpointing=False).eval()
    finally:
        task.tc.lora_rank = 0
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
            if n.endswith(".query"):
                p.normal_(0, 3.0)
    folder = export_student(net, tmp_path / "export", task, merge=True)  # LoRA runs merge only when asked
    batch = task.draw(2, torch.Generator().manual_seed(2), "cpu", False)
    t = torch.tensor([0.7, 0.4])
    loaded, info = load_student(folder)
    assert info["student_timesteps"] == task.student_times and (folder / "README.md").is_file()
    assert "without" in (folder / "README.md").read_text().lower() or "not the student" in \
        (folder / "README.md").read_text()
    with torch.no_grad():
        want = net(batch.noise, t, batch.cond)
        torch.testing.assert_close(loaded(batch.noise, t, batch.cond), want, atol=1e-4, rtol=1e-4)
        plain = SD3Transformer2DModel.from_pretrained(folder / "transformer")
        twin = type(net)(plain, task.family)(batch.noise, t, batch.cond)
        assert (twin - want).abs().max() > 1e-3  # routers matter: plain diffusers is not the student
        base = SD3Transformer2DModel.from_pretrained(task.source, subfolder="transformer")
        cfg = LoraConfig(**{k: v for k, v in _json(folder / "lora" / "adapter_config.json").items()
                            if k in ("r", "lora_alpha", "target_modules")})
        inject_adapter_in_model(cfg, base)
        set_peft_model_state_dict(base, load_safetensors(folder / "lora" / "adapter_model.safetensors"))
        torch.testing.assert_close(type(net)(base, task.family)(batch.noise, t, batch.cond), twin, atol=1e-4,
                                   rtol=1e-4)


def _json(path):
    import json

    return json.loads(path.read_text())


def test_unavailable_method_options_fail_early(pipes):
    with pytest.raises(UserError, match="GAN head needs real images"):
        DiffusersT2ITask(make_cfg(pipes, "sd3", "method.gan_weight=0.01"), "cpu")
    with pytest.raises(UserError, match="backward_simulation=true"):
        DiffusersT2ITask(make_cfg(pipes, "sd3", "method.student_steps=2", "method.backward_simulation=false"), "cpu")
    with pytest.raises(UserError, match=r"t2i.height=18: .*use 16 or 20"):
        DiffusersT2ITask(make_cfg(pipes, "sd3", "t2i.height=18"), "cpu")
    with pytest.raises(UserError, match="has no guidance embedding"):
        DiffusersT2ITask(make_cfg(pipes, "sd3", "t2i.guidance=embedded"), "cpu")
