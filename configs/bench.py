r"""The CPU benchmark shape: a small latent-video DiT, timed by bench/*.py.

python bench/train_step.py --config=configs/bench.py

Latent video [B, T, H, W, C] = [2, 8, 32, 32, 4], tubelets 1x2x2 -> 8 x 16 x 16 =
2,048 tokens per clip (4,096 per step), width 384, 6 heads (head dim 64), depth 12,
MLP 1536 (DiT-S sizes, ~ 33 M parameters), float32 compute and params on CPU.

The benchmarks feed random arrays of this shape straight into the compiled train step
and sampler, so no data pipeline runs. The config passes `validate.validate_config`;
as with configs/dit_xl_video.py, `vdit_jax.main` cannot train it until a latent (4-channel)
source is configured: the built-in synthetic clips are RGB and rejected with channels=4
(`--config.data.source=shards --config.data.path=...` with 4-channel latent shards).
"""

from vdit_jax.config.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.variant = 'S/2'      # width 384, depth 12, 6 heads, MLP 1536, patch 1x2x2
  config.model.width = 384
  config.model.depth = 12
  config.model.num_heads = 6
  config.model.mlp_dim = 1536
  config.model.patch_size = (1, 2, 2)
  config.model.dtype = 'float32'
  config.model.param_dtype = 'float32'
  config.model.scan_layers = True
  config.model.remat_policy = 'none'
  config.data.num_frames = 8
  config.data.height = 32
  config.data.width = 32
  config.data.channels = 4
  config.diffusion.objective = 'v'
  config.diffusion.schedule = 'cosine'
  config.train.batch_size = 2
  config.train.num_steps = 100
  config.train.warmup_steps = 10
  config.train.log_every = 10
  config.checkpoint.every_steps = 100
  config.sample.sampler = 'ddim'
  config.sample.num_steps = 50
  config.sample.num_samples = 2
  config.sample.cfg_scale = 1.0
  return config
