"""Config validation: every rule a run depends on, checked before anything compiles."""

from vdit_jax.diffusion import objectives, samplers
from vdit_jax.model import dit
from vdit_jax.model import patching
from vdit_jax.parallel import mesh as mesh_lib

OBJECTIVE_SAMPLERS = {'eps': ('ddpm', 'ddim'), 'v': ('ddpm', 'ddim'), 'flow': ('euler',)}


def _positive(config, *paths):
  for path in paths:
    value = config
    for part in path.split('.'):
      value = value[part]
    if value is None or value <= 0:
      raise ValueError(f'config.{path}={value} must be positive.')


def _non_negative(config, *paths):
  for path in paths:
    value = config
    for part in path.split('.'):
      value = value[part]
    if value is None or value < 0:
      raise ValueError(f'config.{path}={value} must be >= 0.')


def validate_config(config, num_devices: int, process_count: int = 1) -> None:
  """Raises ValueError naming the first value that breaks a rule."""
  _positive(config, 'data.num_frames', 'data.height', 'data.width', 'data.channels',
            'data.num_examples', 'train.num_steps', 'train.batch_size', 'train.log_every',
            'train.learning_rate', 'checkpoint.every_steps', 'checkpoint.keep',
            'sample.num_steps', 'sample.num_samples', 'sample.fps',
            'diffusion.num_timesteps')
  _non_negative(config, 'train.warmup_steps', 'sample.every_steps', 'data.num_workers',
                'train.weight_decay', 'train.grad_clip', 'sample.eta')
  for path in ('train.ema_decay', 'model.label_dropout'):
    section, key = path.split('.')
    value = config[section][key]
    if not 0.0 <= value < 1.0:
      raise ValueError(f'config.{path}={value} must be in [0, 1).')

  spec = dit.resolve_spec(config.model)
  dit.check_spec(spec)
  patching.check_patch((config.data.num_frames, config.data.height, config.data.width),
                       spec.patch_size)

  objective = config.diffusion.objective
  if objective not in objectives.OBJECTIVES:
    raise ValueError(f'diffusion.objective={objective!r} is not one of {objectives.OBJECTIVES}.')
  sampler = config.sample.sampler
  if sampler not in samplers.SAMPLERS:
    raise ValueError(f'sample.sampler={sampler!r} is not one of {samplers.SAMPLERS}.')
  if sampler not in OBJECTIVE_SAMPLERS[objective]:
    raise ValueError(f'sample.sampler={sampler!r} does not sample objective {objective!r}; '
                     f'use one of {OBJECTIVE_SAMPLERS[objective]}.')
  if objective != 'flow' and config.sample.num_steps > config.diffusion.num_timesteps:
    raise ValueError(f'sample.num_steps={config.sample.num_steps} exceeds '
                     f'diffusion.num_timesteps={config.diffusion.num_timesteps}.')
  objectives.Diffusion.from_config(config.diffusion)  # schedule / t_sampling names

  formats = [f.strip() for f in config.sample.formats.split(',') if f.strip()]
  bad = [f for f in formats if f not in ('mp4', 'gif')]
  if bad or not formats:
    raise ValueError(f'sample.formats={config.sample.formats!r} must list mp4 and/or gif.')

  sizes = mesh_lib.mesh_shape(config.mesh, num_devices)
  batch = config.train.batch_size
  if batch % num_devices:
    raise ValueError(f'train.batch_size={batch} is not divisible by the device count '
                     f'{num_devices}.')
  if batch % process_count:
    raise ValueError(f'train.batch_size={batch} is not divisible by the process count '
                     f'{process_count}.')
  batch_ways = sizes['data'] * sizes['fsdp']
  if batch % batch_ways:
    raise ValueError(f'train.batch_size={batch} is not divisible by mesh data*fsdp='
                     f'{batch_ways}.')
