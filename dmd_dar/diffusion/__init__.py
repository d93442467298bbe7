"""Noise paths, conversions, timestep sampling and ODE / few-step samplers. Pure functions, no nn.Module state."""

from dmd_dar.diffusion.noise import make_noise
from dmd_dar.diffusion.paths import NoisePath, RectifiedFlow, VPPath, make_path
from dmd_dar.diffusion.samplers import (
    cfg,
    cfg_x0,
    ddim_sample,
    euler_sample,
    few_step_sample,
    guided,
    heun_sample,
    network_x0_fn,
    sample_ode,
    student_timesteps,
    timestep_grid,
)
from dmd_dar.diffusion.timesteps import (
    dm_timestep_range,
    sample_dm_timesteps,
    sample_logit_normal,
    sample_timesteps,
    sample_uniform,
    shift,
    unshift,
)

__all__ = ["NoisePath", "RectifiedFlow", "VPPath", "make_path", "make_noise", "cfg", "cfg_x0", "guided",
           "timestep_grid", "euler_sample", "heun_sample", "ddim_sample", "sample_ode", "student_timesteps",
           "network_x0_fn", "few_step_sample", "shift", "unshift", "sample_uniform", "sample_logit_normal",
           "sample_timesteps", "dm_timestep_range", "sample_dm_timesteps"]
