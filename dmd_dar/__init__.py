"""dmd-dar: DMD/DMD2 distillation of diffusion transformers with Diffusion-Adaptive Routing."""

__version__ = "0.1.0"
