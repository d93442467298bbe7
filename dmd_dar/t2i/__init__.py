"""Text-to-image teachers from diffusers: families, pipeline loading, prompt sets, the text-embedding cache, LoRA,
memory estimates, export / ``load_student`` and sampling. The DMD2 task itself is ``dmd_dar.t2i.task``."""

from dmd_dar.t2i.export import find_export, load_student
from dmd_dar.t2i.families import FAMILIES, Family, T2INet
from dmd_dar.t2i.prompts import load_prompt_sources, load_prompts

__all__ = ["FAMILIES", "Family", "T2INet", "find_export", "load_prompt_sources", "load_prompts", "load_student"]
