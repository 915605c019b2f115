r"""Tiny video DiT on the built-in synthetic shapes: trains on a 2-core CPU in minutes.

python -m vdit_jax.main --config=configs/tiny.py --workdir=/tmp/vdit_tiny

8 frames of 32x32 RGB, each one shape 40-55% of the frame side moving in a straight line
(data.bounce=False: the path never reaches a border, so the label's direction holds in every
frame); tubelets of 2x4x4 (256 tokens per clip), depth 4, 4 heads, and a 3x3x3 depthwise
convolution over the token grid at every MLP input (model.mlp_conv): about 1.6 M parameters
(0.26 M of them the cross-attention that reads the class tokens).
The recipe (issue 26; current figures in docs/results.md, "Recipe: what buys quality per
unit of compute", the rounds that led to it in docs/history/recipe-rounds.md):
- rectified flow (diffusion.objective='flow': z_t = (1 - t) x0 + t eps, Euler sampling) with
  t drawn logit-normal (SD3) and time-shifted by 3 (diffusion.shift=3), so most training
  draws fall mid-path or noisier, where the outline is decided, and more sampler steps at the
  noisy end; against v loss on the shifted cosine schedule it gives every frame one object
  (1.00 against 0.88) at the same compute, and shift 3 makes 0.34 of the clips crisp
  against shift 2's 0.21 and shift 1's 0.02;
- sampling from the last params, not the EMA (sample.use_ema=False): the class's shape in
  0.75 of the clips against 0.66; with guidance 1.5 (sample.cfg_scale): crisp clips 0.44
  against guidance 2's 0.39, the shape equal;
- the learning rate warmup-stable-decay (train.lr_schedule='wsd': the peak held until the
  last 20% of the steps, then the 1 - sqrt cooldown): the class's shape in 0.86 of the
  clips against cosine's 0.77, crisp clips 0.39 against 0.34, at the same steps; and its
  peak 2e-3 (train.learning_rate): the shape in 0.91 against 1e-3's 0.86 (two training
  seeds), squares the weakest class (0.74 of theirs);
- EDM2's learned loss uncertainty (model.loss_uncertainty: a head u(t) and the loss
  L / exp(u) + u per clip, so each noise level is weighed by the inverse of its expected
  loss): crisp clips 0.51 against 0.43 and squares 0.95 against 0.90 over two training
  seeds, at the same cost;
- the network outputs the clean clip (diffusion.prediction='x0', as JiT): one object per
  frame is learnt in a quarter of the steps that v output needs;
- the noisy input scaled by its signal level (diffusion.input_scale='signal'), so at the
  noisy end each token sees its position rather than noise;
- the class label as 4 tokens that every block cross-attends to (model.class_tokens=4),
  beside its adaLN vector.
Alone, none of the last three moves the samples' direction off chance; together the
model's x0 error at the noisiest step reaches what the label allows (vdit_jax.eval.label_use)
and the samples move in the label's direction.

Variants (`--config=configs/tiny.py:VARIANT`):
- none: the recipe above, the main job's.
- `c1`: the same model and clips trained as they were when the recipe's first round
  shipped c1 (straight paths, 4 class tokens, x0 output, the scaled input; docs/history/
  recipe-rounds.md): v loss on the cosine schedule shifted by 2, DDIM, the EMA sampled at
  guidance 2, a cosine learning rate at peak 1e-3, equal shape shares, no learned loss
  weighting. configs/tiny_extend.py and configs/tiny_buckets.py build on it: their figures
  were measured with it.
The recipe before c1 is the flags of the ablation table in docs/history/recipe-rounds.md
("the old recipe").
"""

from vdit_jax.config.defaults import base_config


VARIANTS = ('', 'c1')


def get_config(arg=None):
  variant = arg or ''
  if variant not in VARIANTS:
    raise ValueError(f'configs/tiny.py:{variant} is not a variant; choose from {VARIANTS} '
                     "('' is the main job's recipe).")
  config = base_config()
  # The model and the clips: both variants.
  config.model.variant = 'Mu/2x4x4'
  config.model.mlp_conv = (3, 3, 3)
  config.model.class_tokens = 4
  config.data.num_frames = 8
  config.data.height = 32
  config.data.width = 32
  config.data.shape_size = (0.4, 0.55)
  config.data.bounce = False
  config.diffusion.prediction = 'x0'
  config.diffusion.input_scale = 'signal'
  config.train.num_steps = 2400
  config.train.batch_size = 8
  config.train.warmup_steps = 100
  config.train.log_every = 25
  config.checkpoint.every_steps = 800
  config.checkpoint.keep = 2
  config.sample.every_steps = 0
  config.sample.num_samples = 8

  if variant == 'c1':
    # c1's training and sampling (docs/history/recipe-rounds.md, "Recipe: what buys quality
    # per unit of compute" and "Extension on c1").
    config.diffusion.objective = 'v'
    config.diffusion.schedule = 'cosine'
    config.diffusion.t_sampling = 'uniform'
    config.diffusion.shift = 2.0
    config.sample.sampler = 'ddim'
    config.sample.cfg_scale = 2.0
    config.sample.use_ema = True
    config.train.learning_rate = 1e-3
    config.train.lr_schedule = 'cosine'
    config.data.shape_weights = ()
    config.model.loss_uncertainty = False
    return config

  # Squares in half the clips (circles and triangles a quarter each): squares drawn right in
  # 0.90 of 384 clips (two training seeds) against equal shares' 0.73, the class's shape 0.96
  # against 0.91, the rest equal (docs/history/recipe-rounds.md, seventh round).
  config.data.shape_weights = (2.0, 1.0, 1.0)
  # EDM2's learned loss uncertainty (u(t) and the loss L / e^u + u per clip): crisp clips 0.51
  # of 384 (two training seeds) against 0.43, squares 0.95 against 0.90, at the same cost
  # (docs/results.md, "Recipe", eighth round).
  config.model.loss_uncertainty = True
  config.diffusion.objective = 'flow'
  config.diffusion.t_sampling = 'logit_normal'
  config.diffusion.shift = 3.0             # crisp clips 0.34 of 192 (shift 2: 0.21; 1: 0.02)
  # Peak 2e-3 (QK-norm keeps it stable): the class's shape in 0.91 of 384 clips (two training
  # seeds) against 1e-3's 0.86, the rest equal (docs/history/recipe-rounds.md, sixth round).
  config.train.learning_rate = 2e-3
  # Warmup-stable-decay (the 1 - sqrt cooldown over the last 20%): the class's shape in 0.86
  # of 192 clips against cosine's 0.77, crisp clips 0.39 against 0.34
  # (docs/history/recipe-rounds.md, fifth round).
  config.train.lr_schedule = 'wsd'
  config.sample.sampler = 'euler'
  # Guidance 1.5: crisp clips 0.44 of 384 (two training seeds) against 2.0's 0.39, the class's
  # shape 0.91 at both; 1.25 and 3 are worse (docs/history/recipe-rounds.md, sixth round).
  config.sample.cfg_scale = 1.5
  # The raw params, not the EMA: over 192 clips (two sample seeds) the class's shape 0.75
  # against the EMA's 0.66, crisp clips 0.21 against 0.15 (docs/history/recipe-rounds.md,
  # fourth round); a 2400-step cosine run's last params are averaged enough by the decayed
  # learning rate.
  config.sample.use_ema = False
  return config
