"""T2I building blocks without a training run: prompt files, offline / unsupported-model / resolution errors, the
flow shift against diffusers' scheduler, latent packing against the Flux pipeline, the memory estimate."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from dmd_dar.diffusion.timesteps import shift as apply_shift
from dmd_dar.errors import UserError
from dmd_dar.t2i import loading as L
from dmd_dar.t2i import memory as M
from dmd_dar.t2i.families import FAMILIES, pack, unpack
from dmd_dar.t2i.prompts import load_prompt_sources, load_prompts


def test_prompt_txt_skips_comments_and_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\nfirst prompt\n\n  second prompt  \n")
    assert load_prompts(str(f)) == ["first prompt", "second prompt"]


def test_project_prompt_set_by_name():
    prompts = load_prompts("detail")
    assert len(prompts) > 100 and not any(p.startswith("#") for p in prompts)


@pytest.mark.parametrize("name, text, match", [
    ("empty.txt", "# only a comment\n\n", "no prompts in this file"),
    ("bad.jsonl", '{"caption": "ok"}\nnot json\n{"text": "wrong key"}\n{"caption": ""}\n',
     r"bad.jsonl: lines 2, 3, 4 not a JSON object"),
    ("bad.csv", "id,caption\n1,a cat\n2,\n3,a dog\n4,  \n", r"bad.csv: empty 'caption' on lines 3, 5"),
    ("nocol.csv", "id,text\n1,a cat\n", r"no 'caption' column in the header \(id, text\)"),
])
def test_prompt_file_errors_name_the_lines(tmp_path, name, text, match):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(UserError, match=match):
        load_prompts(str(f))


def test_prompt_csv_and_jsonl_caption_key(tmp_path):
    (tmp_path / "a.csv").write_text('prompt,id\n"a cat, sitting",1\n')
    (tmp_path / "b.jsonl").write_text('{"prompt": "a dog"}\n\n{"prompt": "a bird"}\n')
    got = load_prompt_sources([str(tmp_path / "a.csv"), str(tmp_path / "b.jsonl")], caption_key="prompt")
    assert got == ["a cat, sitting", "a dog", "a bird"]
    with pytest.raises(UserError, match="not found"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_offline_hub_id_says_how_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    source, local_only = L.resolve_source("stabilityai/stable-diffusion-3.5-medium")
    assert local_only
    with pytest.raises(UserError) as err:
        L.pipeline_index(source, local_only, cache_dir=str(tmp_path / "hf"))
    msg = str(err.value)
    assert "\n" not in msg
    assert "huggingface-cli download stabilityai/stable-diffusion-3.5-medium" in msg and "t2i.model" in msg


def test_local_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no model_index.json"):
        L.resolve_source(str(tmp_path))
    with pytest.raises(UserError, match="no such folder"):
        L.resolve_source(str(tmp_path / "nope" / "pipe"))
    with pytest.raises(UserError, match="t2i.model is empty"):
        L.resolve_source("")


def test_model_without_adapter_lists_the_supported_ones():
    index = {"_class_name": "StableDiffusionPipeline", "transformer": ["diffusers", "HunyuanDiT2DModel"]}
    with pytest.raises(UserError, match=r"no DAR adapter for HunyuanDiT2DModel; supported diffusers models: "
                                        r"DiTTransformer2DModel, FluxTransformer2DModel"):
        L.family_from_index(index)
    with pytest.raises(UserError, match="has no 'transformer' component"):
        L.family_from_index({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})


def test_resolution_the_vae_or_patching_cannot_take():
    class Cfg:
        patch_size = 2

    assert L.latent_geometry(FAMILIES["sd3"], Cfg, 8, 1024, 512, 16) == (16, 128, 64)
    with pytest.raises(UserError, match=r"t2i.height=1000: .* multiple of 16; use 992 or 1008"):
        L.latent_geometry(FAMILIES["sd3"], Cfg, 8, 1000, 1024, 16)
    with pytest.raises(UserError, match=r"t2i.width=1020: .*2x2 latent packing need a multiple of 16"):
        L.latent_geometry(FAMILIES["flux"], Cfg, 8, 1024, 1020, 16)


@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_dynamic_shift_is_the_schedulers(tokens):
    """Flux/Qwen dynamic shifting == our SD3-convention shift with s = exp(mu) (and the static case)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
               max_image_seq_len=4096)
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    s = L.scheduler_shift(dict(sched.config), tokens)
    mu = math.log(s)
    sigmas = np.linspace(1.0, 1 / 8, 8)
    sched.set_timesteps(sigmas=sigmas, mu=mu)
    ours = apply_shift(torch.tensor(sigmas, dtype=torch.float64), s)
    np.testing.assert_allclose(sched.sigmas[:-1].double().numpy(), ours.numpy(), rtol=1e-5)
    assert L.scheduler_shift({"shift": 3.0}, tokens) == 3.0
    if tokens == 4096:  # Flux-dev at 1024^2
        assert s == pytest.approx(math.exp(1.15))


def test_packing_matches_the_flux_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 6)
    packed = FluxPipeline._pack_latents(x, 2, 16, 8, 6)
    assert torch.equal(pack(x), packed)
    assert torch.equal(unpack(packed, 8, 6), x)


def test_memory_estimate_closed_form():
    teacher = M.NetCount(total=1000, trainable=0, frozen_bytes=2, train_bytes=4)
    student = M.NetCount(total=1100, trainable=100, frozen_bytes=2, train_bytes=4)  # LoRA + routers
    est = M.estimate(teacher, student, student, tokens=10, hidden=8, layers=2, batch=3, act_bytes=2,
                     checkpointing=False, dar_sublayers=4)
    gib = M.GiB
    assert est["teacher"] * gib == 2000
    assert est["student"] * gib == 1000 * 2 + 100 * 4
    assert est["gradients"] * gib == 2 * 100 * 4
    assert est["optimizer"] * gib == 8 * 200
    assert est["ema"] * gib == 2400
    assert est["activations (rough)"] * gib == pytest.approx(10 * 8 * 2 * 3 * (16 * 2 + 4))
    sharded = M.estimate(teacher, student, student, tokens=10, hidden=8, layers=2, batch=3, act_bytes=2,
                         checkpointing=True, offload_teacher=True, world_size=8, sharded=True)
    assert sharded["teacher"] == 0 and sharded["optimizer"] * gib == 8 * 200 / 8
    assert "MiB" in M.format_estimate(est, "t")
    shared = M.estimate(teacher, student, student, tokens=10, hidden=8, layers=2, batch=3, act_bytes=2,
                        checkpointing=True, world_size=8, sharded=True, shared_base=True, gathered=50)
    assert shared["teacher"] * gib == 2000 / 8  # the one base, sharded with the adapters
    assert shared["gradients"] * gib == (2 * 100 * 4 + 1000 * 4) / 8  # flat gradients cover the frozen base too
    assert shared["gathered units"] * gib == 2 * 50 * 2  # gathered values and their gradients, in bf16


def test_gathered_values_are_the_root_unit_and_the_two_largest_units():
    class Attention(torch.nn.Linear):
        pass

    class FeedForward(torch.nn.Linear):
        pass

    base = torch.nn.Sequential(torch.nn.Linear(2, 3), Attention(3, 3), FeedForward(3, 5), Attention(3, 3),
                               torch.nn.LayerNorm(5))  # root: 9 + 10 values; units: 12, 20, 12
    router = torch.nn.Linear(3, 1, bias=False)  # a network's own tensor outside the base: root unit
    assert M.gathered_values(base, router) == 9 + 10 + 3 + 20 + 12


def test_unsupported_class_in_a_pipeline_folder(tmp_path):
    """The early check reads model_index.json: nothing is loaded before the error."""
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "X", "transformer": ["diffusers",
                                                                                            "SanaTransformer2DModel"]}))
    source, local_only = L.resolve_source(str(folder))
    with pytest.raises(UserError, match="no DAR adapter for SanaTransformer2DModel"):
        L.family_from_index(L.pipeline_index(source, local_only))
    shutil.rmtree(folder)


CONFIGS = ("sd35_medium", "flux_dev", "pixart_sigma", "dit_xl2", "qwen_image")


@pytest.mark.parametrize("name", CONFIGS)
def test_t2i_configs_resolve(name):
    from pathlib import Path

    from dmd_dar.config import build_config
    from dmd_dar.distill.config import DistillConfig

    cfg = build_config(DistillConfig, [Path(__file__).resolve().parent.parent / "configs" / "t2i" / f"{name}.yaml"])
    assert cfg.networks.teacher_kind == "diffusers" and cfg.t2i.model
    if name == "qwen_image":  # the DAR paper's Qwen-Image recipe
        assert (cfg.t2i.lora_rank, cfg.generator_optim.lr, cfg.fake_optim.lr) == (64, 5e-6, 2e-6)
        assert (cfg.method.student_steps, cfg.method.guidance_scale, cfg.t2i.height, cfg.t2i.width) == (4, 4.0, 1024,
                                                                                                          1024)
        assert cfg.t2i.dtype == "bfloat16" and cfg.run.mixed_precision == "bf16" and cfg.run.batch_size == 1
    if name == "flux_dev":
        assert cfg.t2i.guidance == "embedded"


def test_dit_class_id_prompts_resolve_from_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_prompts("configs/t2i/imagenet_class_ids.txt")[:3] == ["0", "1", "2"]


def test_accelerate_configs_parse_and_fsdp_units_exist_in_every_family():
    """The FSDP units must be modules the DAR adapters call directly (attention, feed-forward), present in every
    family's model (Flux under its documented override)."""
    import sys
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils.dataclasses import get_module_class_from_name

    root = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
    kinds = {f.stem: load_config_from_file(str(f)).distributed_type.value for f in root.glob("*.yaml")}
    assert kinds == {"ddp_8gpu": "MULTI_GPU", "fsdp_8gpu": "FSDP", "fsdp_1gpu_80gb": "FSDP"}
    fsdp = load_config_from_file(str(root / "fsdp_8gpu.yaml")).fsdp_config
    assert fsdp["fsdp_use_orig_params"] and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_backbones_parity import FACTORIES

    for name, factory in FACTORIES.items():
        model, _ = factory()
        names = "FluxAttention,FeedForward" if name == "Flux" else fsdp["fsdp_transformer_layer_cls_to_wrap"]
        for cls in names.split(","):
            assert get_module_class_from_name(model, cls) is not None, (name, cls)


def test_t2inet_conventions_for_qwen_pixart_dit():
    """The families without a tiny pipeline here: T2INet feeds the stock forward in the pipelines' conventions
    (Qwen-Image: packed tokens, t in [0, 1]; PixArt / DiT: DDPM index t * 999, eps half of the learned-sigma
    output) and returns unpacked [B, C, h, w] predictions."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_backbones_parity import make

    from dmd_dar.t2i.families import T2INet

    t = torch.tensor([0.25, 0.75])
    model, inputs = make("QwenImage")  # in_channels 16 = 4 latent channels packed 2x2
    x = torch.randn(2, 4, 8, 8)
    cond = {"prompt_embeds": inputs["encoder_hidden_states"], "prompt_embeds_mask": inputs["encoder_hidden_states_mask"]}
    with torch.no_grad():
        got = T2INet(model, FAMILIES["qwenimage"])(x, t, cond)
        ref = model(hidden_states=pack(x), encoder_hidden_states=cond["prompt_embeds"],
                    encoder_hidden_states_mask=cond["prompt_embeds_mask"], timestep=t, img_shapes=[[(1, 4, 4)]] * 2,
                    return_dict=False)[0]
    torch.testing.assert_close(got, unpack(ref, 8, 8))
    for name in ("PixArt", "DiT"):
        model, inputs = make(name)
        fam = FAMILIES[name.lower()]
        x = inputs["hidden_states"]
        cond = ({"class_labels": inputs["class_labels"]} if name == "DiT" else
                {"prompt_embeds": inputs["encoder_hidden_states"], "attention_mask": inputs["encoder_attention_mask"]})
        with torch.no_grad():
            got = T2INet(model, fam)(x, t, cond)
            kwargs = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep")}
            ref = model(x, timestep=t * 999, return_dict=False, **kwargs)[0]
        assert ref.shape[1] == 2 * x.shape[1] and got.shape == x.shape
        torch.testing.assert_close(got, ref[:, :x.shape[1]])


class _RecordingVAE(torch.nn.Module):
    """A stand-in VAE: ``decode`` records its input and returns it times 3 (so the clamp to [-1, 1] shows)."""

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = type("Config", (), config)()
        self.weight = torch.nn.Parameter(torch.zeros((), dtype=torch.float16))  # the VAE's dtype: float16
        self.seen = []

    def decode(self, z, return_dict=False):
        self.seen.append(z)
        return (z.float() * 3,)


def test_decode_latents_undoes_each_familys_latent_normalisation():
    x = torch.tensor([[[[0.1]], [[-0.2]]]])  # [B=1, C=2, 1, 1]
    vae = _RecordingVAE(scaling_factor=2.0, shift_factor=0.25)
    img = FAMILIES["sd3"].decode_latents(vae, x)
    torch.testing.assert_close(vae.seen[0], (x / 2.0 + 0.25).half())  # in the VAE's dtype
    assert img.dtype == torch.float32
    torch.testing.assert_close(img, (x / 2.0 + 0.25).half().float().mul(3).clamp(-1, 1))
    img = FAMILIES["pixart"].decode_latents(_RecordingVAE(scaling_factor=0.5, shift_factor=None), x)  # no shift
    torch.testing.assert_close(img, torch.tensor([[[[0.6]], [[-1.0]]]]), atol=1e-3, rtol=0)  # 3 x / 0.5, clamped

    vae = _RecordingVAE(latents_mean=[1.0, -1.0], latents_std=[2.0, 0.5])  # Qwen-Image: a one-frame video VAE
    img = FAMILIES["qwenimage"].decode_latents(vae, x)
    expected = torch.tensor([[[[1.2]], [[-1.1]]]])  # x * std + mean, per channel
    assert vae.seen[0].shape == (1, 2, 1, 1, 1)
    torch.testing.assert_close(vae.seen[0][:, :, 0], expected.half())
    assert img.shape == (1, 2, 1, 1)
