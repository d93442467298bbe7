"""What differs between diffusers text-to-image families, in one place: how the transformer is called, what the
condition holds, how latents are packed, which noise path and guidance form the teacher uses, how the VAE decodes.

Everything else (DMD2, the trainer, sampling) sees one network interface, :class:`T2INet`:

    net(x_t [B, C, h, w], t [B] in [0, 1], cond: dict of tensors) -> prediction [B, C, h, w]

in the teacher's own parameterisation (flow velocity ``eps - x0`` for SD3/Flux/Qwen-Image, VP eps for
PixArt/DiT). Latents are always held unpacked ``[B, C, h, w]``; Flux and Qwen-Image 2x2-pack them into tokens inside
``T2INet`` (diffusers' own ``_pack_latents`` layout) and unpack the output.

Timestep conventions of the stock transformers (what ``T2INet`` feeds them from our ``t``):

=========  ==========================  ==========================================================
family     transformer ``timestep``    why
=========  ==========================  ==========================================================
sd3        ``t * 1000``                the SD3 pipeline passes the scheduler's ``sigma * 1000``
flux       ``t``                       the Flux pipeline passes ``timestep / 1000``; the model scales by 1000 inside
qwenimage  ``t``                       same as Flux (its time projection has ``scale=1000``)
pixart     ``t * 999``                 DDPM index (our VP path maps t to the fractional index ``t * 999``)
dit        ``t * 999``                 same as PixArt
=========  ==========================  ==========================================================

Flux's guidance vector is the guidance scale itself (the model multiplies it by 1000, as the pipeline expects).
PixArt and DiT predict a learned variance in their second half of channels; only the eps half is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: transformer class name -> family name
FAMILY_OF_CLASS = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "QwenImageTransformer2DModel": "qwenimage",
    "PixArtTransformer2DModel": "pixart",
    "DiTTransformer2DModel": "dit",
}


@dataclass(frozen=True)
class Family:
    """Static facts about one family (see the module docstring for the conventions)."""

    name: str
    path: str  # flow | vp
    prediction: str  # velocity | eps
    packed: bool  # 2x2 latent packing into tokens (Flux, Qwen-Image)
    mask_key: str | None  # condition key of the text attention mask (padded per batch), or None
    default_max_sequence_length: int
    lora_targets: tuple[str, ...]  # peft target module names (linear layers of attention and MLP)
    has_text: bool = True  # DiT is class-conditional: "prompts" are ImageNet class names

    @torch.no_grad()
    def decode_latents(self, vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One batch of latents through this family's VAE: [B, C, h, w] -> [B, 3, H, W] in [-1, 1] (float32)."""
        cfg = vae.config
        dtype = next(vae.parameters()).dtype
        x = x.to(device=next(vae.parameters()).device, dtype=torch.float32)
        if self.name == "qwenimage":  # a video VAE (one frame) normalising latents per channel by mean / std
            mean = torch.tensor(cfg.latents_mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(cfg.latents_std, device=x.device).view(1, -1, 1, 1)
            img = vae.decode((x * std + mean).to(dtype)[:, :, None], return_dict=False)[0][:, :, 0]
        else:
            shift = getattr(cfg, "shift_factor", None) or 0.0
            img = vae.decode((x / cfg.scaling_factor + shift).to(dtype), return_dict=False)[0]
        return img.float().clamp(-1, 1)


_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
FAMILIES = {
    "sd3": Family("sd3", "flow", "velocity", False, None, 256,
                  _ATTN + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
                           "ff_context.net.0.proj", "ff_context.net.2")),
    "flux": Family("flux", "flow", "velocity", True, None, 512,
                   _ATTN + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
                            "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")),
    "qwenimage": Family("qwenimage", "flow", "velocity", True, "prompt_embeds_mask", 1024,
                        _ATTN + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "img_mlp.net.0.proj",
                                 "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")),
    "pixart": Family("pixart", "vp", "eps", False, "attention_mask", 300,
                     _ATTN + ("ff.net.0.proj", "ff.net.2")),
    "dit": Family("dit", "vp", "eps", False, None, 0, _ATTN + ("ff.net.0.proj", "ff.net.2"), has_text=False),
}


def family_for(class_name: str) -> Family:
    return FAMILIES[FAMILY_OF_CLASS[class_name]]


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C], diffusers' Flux/Qwen-Image ``_pack_latents`` layout."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, h/2, w/2, C, 2, 2]
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack`: [B, (h/2)(w/2), 4C] -> [B, C, h, w]."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [B, C, h/2, 2, w/2, 2]
    return x.reshape(b, d // 4, h, w)


def _image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Flux positional ids of the packed image tokens, [(h/2)(w/2), 3] (as ``_prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class T2INet(nn.Module):
    """One diffusers transformer (stock, or wrapped by ``wrap_with_dar``) behind ``net(x_t, t, cond)``.

    model:             the transformer (its ``forward`` has the stock signature).
    family:            a :class:`Family`.
    embedded_guidance: Flux-dev's guidance input used when ``cond`` holds no ``"guidance"`` (the student and the
                       fake score get this fixed value; the teacher gets the CFG scale through ``cond``).
    """

    def __init__(self, model: nn.Module, family: Family, embedded_guidance: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.embedded_guidance = embedded_guidance

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        name = self.family.name
        dtype = _param_dtype(self.model)
        x = x_t.to(dtype)
        b, c, h, w = x.shape
        t = t.to(device=x.device).expand(b) if t.ndim == 0 else t.to(device=x.device)  # [B]
        if name == "sd3":
            out = self.model(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                             pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
                             timestep=(t * 1000).to(dtype), return_dict=False)[0]
        elif name == "flux":
            config = self.model.config
            guidance = None
            if config.guidance_embeds:
                guidance = cond.get("guidance")
                if guidance is None:
                    guidance = torch.full((b,), float(self.embedded_guidance or 1.0), device=x.device)
            text = cond["prompt_embeds"].to(dtype)
            out = self.model(hidden_states=pack(x), encoder_hidden_states=text,
                             pooled_projections=cond["pooled_prompt_embeds"].to(dtype), timestep=t.to(dtype),
                             img_ids=_image_ids(h, w, x.device, dtype),
                             txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=dtype),
                             guidance=None if guidance is None else guidance.to(x.device, torch.float32),
                             return_dict=False)[0]
            out = unpack(out, h, w)
        elif name == "qwenimage":
            out = self.model(hidden_states=pack(x), encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                             encoder_hidden_states_mask=cond["prompt_embeds_mask"], timestep=t.to(dtype),
                             img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
            out = unpack(out, h, w)
        elif name == "pixart":
            extra = {"resolution": None, "aspect_ratio": None}
            if getattr(_stock(self.model), "use_additional_conditions", False):  # PixArt-alpha 1024
                size = self.latent_to_pixels(h, w)
                extra = {"resolution": torch.tensor([size], device=x.device, dtype=dtype).expand(b, 2),
                         "aspect_ratio": torch.full((b, 1), size[0] / size[1], device=x.device, dtype=dtype)}
            out = self.model(x, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                             encoder_attention_mask=cond["attention_mask"], timestep=(t * 999).to(dtype),
                             added_cond_kwargs=extra, return_dict=False)[0]
            out = out[:, :c] if out.shape[1] == 2 * c else out  # drop the learned-variance half
        elif name == "dit":
            out = self.model(x, timestep=(t * 999).to(dtype), class_labels=cond["class_labels"],
                             return_dict=False)[0]
            out = out[:, :c] if out.shape[1] == 2 * c else out
        else:  # pragma: no cover - families are closed
            raise AssertionError(name)
        return out.to(x_t.dtype)  # [B, C, h, w]

    vae_scale_factor: int = 8

    def latent_to_pixels(self, h: int, w: int) -> tuple[int, int]:
        return h * self.vae_scale_factor, w * self.vae_scale_factor


def _stock(model: nn.Module) -> nn.Module:
    """The diffusers model inside a DAR wrapper (or the model itself)."""
    return getattr(model, "transformer", model)


def _param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the transformer computes in: that of its (frozen) base weights."""
    for p in _stock(model).parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
