r"""LoRA fine-tune of the tiny model: the same shapes and motions, all painted red.

python -m vdit_jax.main --config=configs/tiny.py --workdir=runs/tiny    # the base, if needed
python -m vdit_jax.main --config=configs/lora_finetune.py --workdir=runs/tiny_red \
    --config.lora.base_checkpoint=runs/tiny

The model is configs/tiny.py's, frozen at the EMA params of the base run's newest
checkpoint (or the params of an export directory, WORKDIR/export/<step>). Only rank-8
adapters (alpha 8, so W + A @ B) on the attention (q, k, v, out; the self-attention and the
cross-attention that reads the class tokens) and MLP (fc1, fc2) kernels train: 106,496
params, 6.7% of the tiny model's 1.58 M (the share shrinks with
width: 2.0% for DiT-S (configs/small.py), 0.9% with the default targets='attn'). The data are the synthetic clips of
every shape and direction drawn in red only (data.colours), a colour the base saw in
one clip of seven. WORKDIR/checkpoints holds the adapters, their optimizer state and
EMA; --mode=export writes the EMA adapters alone; samples use the merged weights.

The model and diffusion sections are configs/tiny.py's, taken whole: the adapters sit on
its checkpoint and train on its objective. The data, training and sampling sections are
this run's own, stated here.
"""

from configs import tiny
from vdit_jax.config.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  base = tiny.get_config()
  config.model = base.model
  config.diffusion = base.diffusion
  config.lora.rank = 8
  config.lora.alpha = 8.0
  config.lora.targets = 'attn,mlp'
  config.lora.base_checkpoint = ''  # required: --config.lora.base_checkpoint=BASE_WORKDIR
  # tiny's clips (8 frames of 32x32, shapes 40-55% of the side on straight paths), red only,
  # in equal shares.
  config.data.num_frames = 8
  config.data.height = 32
  config.data.width = 32
  config.data.shape_size = (0.4, 0.55)
  config.data.bounce = False
  config.data.colours = 'red'
  config.data.shape_weights = ()
  config.train.num_steps = 300
  config.train.batch_size = 8
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 20
  config.train.lr_schedule = 'cosine'
  config.train.log_every = 25
  config.checkpoint.every_steps = 100
  config.checkpoint.keep = 2
  config.sample.every_steps = 0
  config.sample.num_samples = 8
  config.sample.sampler = 'euler'   # tiny's objective is rectified flow
  config.sample.cfg_scale = 2.0
  config.sample.use_ema = True
  return config
