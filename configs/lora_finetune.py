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
"""

from configs import tiny


def get_config(arg=None):
  config = tiny.get_config(arg)
  config.lora.rank = 8
  config.lora.alpha = 8.0
  config.lora.targets = 'attn,mlp'
  config.lora.base_checkpoint = ''  # required: --config.lora.base_checkpoint=BASE_WORKDIR
  config.data.colours = 'red'
  config.train.num_steps = 300
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 20
  config.train.log_every = 25
  config.checkpoint.every_steps = 100
  config.checkpoint.keep = 2
  config.sample.use_ema = True   # measured with the EMA; tiny samples its raw params
  config.train.lr_schedule = 'cosine'  # measured with cosine decay (tiny: wsd)
  config.sample.cfg_scale = 2.0          # measured with this guidance (tiny: 1.5)
  config.data.shape_weights = ()         # measured with equal shares (tiny: squares 2x)
  return config
