"""Diffusion: noise schedules, training objectives (eps, v, flow) and compiled samplers."""

from vdit_jax.diffusion.objectives import DISCRETE_OBJECTIVES
from vdit_jax.diffusion.objectives import Diffusion
from vdit_jax.diffusion.objectives import FLOW_T_SCALE
from vdit_jax.diffusion.objectives import mse
from vdit_jax.diffusion.objectives import OBJECTIVES
from vdit_jax.diffusion.objectives import shift_t
from vdit_jax.diffusion.objectives import T_SAMPLINGS
from vdit_jax.diffusion.samplers import flow_time_grid
from vdit_jax.diffusion.samplers import guided_prediction
from vdit_jax.diffusion.samplers import make_sampler
from vdit_jax.diffusion.samplers import respaced_timesteps
from vdit_jax.diffusion.samplers import sample
from vdit_jax.diffusion.samplers import SAMPLERS
from vdit_jax.diffusion.schedules import alphas_cumprod
from vdit_jax.diffusion.schedules import cosine_alpha_bar
from vdit_jax.diffusion.schedules import make_betas
from vdit_jax.diffusion.schedules import SCHEDULES
