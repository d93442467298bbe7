"""Tiny random diffusers pipelines (text-to-image, and the class-conditional DiT), built from configs with no
downloads (tests, smoke runs, the ``--dry-run`` of ``eval/gpu_dmd2_realscale.py``).

``build_tiny_pipeline(family, folder)`` writes a complete pipeline folder (``model_index.json`` + components) that
loads back through ``DiffusionPipeline.from_pretrained(folder, local_files_only=True)``: a tiny transformer, a tiny
``AutoencoderKL``, tiny CLIP / T5 text encoders, and CLIP BPE tokenizers whose vocabulary is a prefix of the one
open_clip ships (``open_clip.tokenizer.default_bpe()``), so tokenisation is real but small.
"""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path

import torch

TINY_FAMILIES = ("sd3", "flux", "dit")
_NUM_MERGES = 2000  # a prefix of CLIP's 48894 BPE merges: real tokenisation, small vocabulary


@cache
def _bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of a truncated CLIP BPE, built the way open_clip's SimpleTokenizer builds its own."""
    # lazy: open_clip takes seconds to import; only tiny test pipelines need its BPE
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:1 + _NUM_MERGES]
    symbols = list(bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    return {s: i for i, s in enumerate(symbols)}, merges


def tiny_tokenizer(max_length: int = 16):
    # lazy: transformers takes seconds to import; only building a tiny pipeline needs it
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], model_max_length=max_length)


def _clip(projection: bool, hidden: int = 16, projection_dim: int = 8):
    # lazy: transformers takes seconds to import; only building a tiny pipeline needs it
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, _ = _bpe_vocab()
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=projection_dim,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"], hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(d_model: int = 12):
    # lazy: transformers takes seconds to import; only building a tiny pipeline needs it
    from transformers import T5Config, T5EncoderModel

    vocab, _ = _bpe_vocab()
    cfg = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, pad_token_id=vocab["<|endoftext|>"],
                   eos_token_id=vocab["<|endoftext|>"], decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float | None):
    # lazy: diffusers takes seconds to import; only building a tiny pipeline needs it
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
                         scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=False, use_post_quant_conv=False).eval()


def build_tiny_pipeline(family: str, folder: str | Path, seed: int = 0):
    """Build, save to ``folder`` and return a tiny random pipeline of ``family`` (sd3 | flux | dit).

    VAE downsampling is 2x, so a 16x16 image has 8x8 latents (SD3, DiT: 4x4 tokens with patch 2; Flux: 4x4 packed
    tokens). SD3's scheduler has shift 3.0; Flux's uses dynamic shifting (and guidance embeddings, like Flux-dev).
    DiT is class-conditional over 10 classes (prompts: integer class ids) with DiT-XL/2's learned sigma and
    per-block label embedders, on a linear-beta DDIM schedule.
    """
    # lazy: diffusers takes seconds to import; only building a tiny pipeline needs it
    from diffusers import (
        DDIMScheduler,
        DiTPipeline,
        DiTTransformer2DModel,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    if family == "sd3":
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                                            pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(4, 1.5305, 0.0609), text_encoder=_clip(True), text_encoder_2=_clip(True),
            text_encoder_3=_t5(16), tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(),
            tokenizer_3=tiny_tokenizer())
    elif family == "flux":
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                             pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(4, 0.3611, 0.1159),
                            text_encoder=_clip(False, projection_dim=8, hidden=8), text_encoder_2=_t5(12),
                            tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer())
    elif family == "dit":
        transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                            out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                            num_embeds_ada_norm=10)
        pipe = DiTPipeline(transformer=transformer, vae=_vae(4, 0.18215, None), scheduler=DDIMScheduler())
    else:
        raise ValueError(f"tiny pipelines exist for {TINY_FAMILIES}, not {family!r}")
    _randomise(pipe.transformer, seed)
    pipe.save_pretrained(str(folder))
    return pipe


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter so that adaLN-Zero gates and zero-initialised heads are not trivially zero."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
