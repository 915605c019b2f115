r"""Tiny latent video DiT: trains on the latents of configs/vae_tiny.py; samples decode to mp4.

python -m vdit_jax.main --config=configs/tiny_latent.py:runs/tiny_latents \
    --workdir=runs/tiny_latent_dit [--mode=sample]

The whole chain on a CPU (bench/latent_e2e.py runs it and prints the numbers):
  python -m vdit_jax.train.vae --config=configs/vae_tiny.py --workdir=runs/vae_tiny
  python -m vdit_jax.tools.encode_latents --videos=synthetic --num_examples=512 \
      --num_frames=9 --height=32 --width=32 --vae=runs/vae_tiny/vae --out=runs/tiny_latents
  python -m vdit_jax.main --config=configs/tiny_latent.py:runs/tiny_latents \
      --workdir=runs/tiny_latent_dit
  python -m vdit_jax.main --config=configs/tiny_latent.py:runs/tiny_latents \
      --workdir=runs/tiny_latent_dit --mode=sample   # samples/*.mp4 (9 frames of 32x32)

The argument is the encode_latents folder (default runs/tiny_latents). Clips of 9x32x32 RGB
are latents [T', H', W', z] = [3, 4, 4, 16] (normalised per channel); tubelets of 1x1x1
give 48 tokens per clip of 16 values each, at configs/tiny.py's width 128, depth 4, with
v-prediction on the cosine schedule. data.latents=True: samples are un-normalised with the
statistics in the folder's index.json and decoded by the VAE it records (data.vae
overrides it) before the mp4/gif is written; the latents are kept as *_latents.npy.
"""

from configs import tiny

LATENTS = 'runs/tiny_latents'


def get_config(arg=None):
  config = tiny.get_config()
  # The recipe its BUILD_NOTES figures were measured with (bench/latent_e2e.py), stated
  # here rather than configs/tiny.py's pixel recipe: v output on the unshifted cosine
  # schedule (DDIM), the unscaled noisy input, no token convolution, the class in adaLN only.
  config.model.mlp_conv = ()
  config.model.class_tokens = 0
  config.diffusion.objective = 'v'
  config.diffusion.schedule = 'cosine'
  config.diffusion.t_sampling = 'uniform'
  config.sample.sampler = 'ddim'
  config.diffusion.shift = 1.0
  config.diffusion.prediction = 'target'
  config.diffusion.input_scale = 'none'
  config.diffusion.loss_weighting = 'none'
  config.model.variant = 'Mu/1x1x1'
  config.data.source = 'shards'
  config.data.path = arg or LATENTS
  config.data.latents = True
  config.data.num_frames = 3      # latent frames: 1 + (9 - 1) / 4
  config.data.height = 4          # 32 / 8
  config.data.width = 4
  config.data.channels = 16       # the VAE's z_dim
  config.train.num_steps = 1000
  config.train.batch_size = 16
  config.train.warmup_steps = 50
  config.checkpoint.every_steps = 250
  config.sample.use_ema = True   # measured with the EMA; tiny samples its raw params
  config.train.lr_schedule = 'cosine'  # measured with cosine decay (tiny: wsd)
  config.sample.cfg_scale = 2.0          # measured with this guidance (tiny: 1.5)
  config.model.loss_uncertainty = False  # measured without it (tiny: EDM2's weighting)
  config.train.learning_rate = 1e-3     # measured at this peak (tiny: 2e-3)
  return config
