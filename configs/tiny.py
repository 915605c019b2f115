r"""Tiny video DiT on the built-in synthetic shapes: trains on a 2-core CPU in minutes.

python -m vdit_jax.main --config=configs/tiny.py --workdir=/tmp/vdit_tiny

8 frames of 32x32 RGB, each one shape 40-55% of the frame side moving in a straight line
(data.bounce=False: the path never reaches a border, so the label's direction holds in every
frame); tubelets of 2x4x4 (256 tokens per clip), depth 4, 4 heads, and a 3x3x3 depthwise
convolution over the token grid at every MLP input (model.mlp_conv): about 1.6 M parameters
(0.26 M of them the cross-attention that reads the class tokens).
The recipe (issue 26, BUILD_NOTES.md "Recipe: what buys quality per unit of compute"):
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
model's x0 error at the noisiest step reaches what the label allows (bench/label_use.py)
and the samples move in the label's direction.

The extension, keyframe, interpolation and bucket configs build on this recipe; the
recipe before it is the flags of BUILD_NOTES.md's ablation table ("the old recipe").
"""

from vdit_jax.config.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.variant = 'Mu/2x4x4'
  config.model.mlp_conv = (3, 3, 3)
  config.data.num_frames = 8
  config.data.height = 32
  config.data.width = 32
  config.data.shape_size = (0.4, 0.55)
  config.data.bounce = False
  # Squares in half the clips (circles and triangles a quarter each): squares drawn right in
  # 0.90 of 384 clips (two training seeds) against equal shares' 0.73, the class's shape 0.96
  # against 0.91, the rest equal (BUILD_NOTES, Recipe, seventh round).
  config.data.shape_weights = (2.0, 1.0, 1.0)
  config.model.class_tokens = 4
  # EDM2's learned loss uncertainty (u(t) and the loss L / e^u + u per clip): crisp clips 0.51
  # of 384 (two training seeds) against 0.43, squares 0.95 against 0.90, at the same cost
  # (BUILD_NOTES, Recipe, eighth round).
  config.model.loss_uncertainty = True
  config.diffusion.objective = 'flow'
  config.diffusion.t_sampling = 'logit_normal'
  config.diffusion.shift = 3.0             # crisp clips 0.34 of 192 (shift 2: 0.21; 1: 0.02)
  config.diffusion.prediction = 'x0'
  config.diffusion.input_scale = 'signal'
  config.train.num_steps = 2400
  config.train.batch_size = 8
  # Peak 2e-3 (QK-norm keeps it stable): the class's shape in 0.91 of 384 clips (two training
  # seeds) against 1e-3's 0.86, the rest equal (BUILD_NOTES, sixth round).
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 100
  # Warmup-stable-decay (the 1 - sqrt cooldown over the last 20%): the class's shape in 0.86
  # of 192 clips against cosine's 0.77, crisp clips 0.39 against 0.34 (BUILD_NOTES, fifth round).
  config.train.lr_schedule = 'wsd'
  config.train.log_every = 25
  config.checkpoint.every_steps = 800
  config.checkpoint.keep = 2
  config.sample.every_steps = 0
  config.sample.num_samples = 8
  config.sample.sampler = 'euler'
  # Guidance 1.5: crisp clips 0.44 of 384 (two training seeds) against 2.0's 0.39, the class's
  # shape 0.91 at both; 1.25 and 3 are worse (BUILD_NOTES, sixth round).
  config.sample.cfg_scale = 1.5
  # The raw params, not the EMA: over 192 clips (two sample seeds) the class's shape 0.75
  # against the EMA's 0.66, crisp clips 0.21 against 0.15 (BUILD_NOTES, fourth round); a
  # 2400-step cosine run's last params are averaged enough by the decayed learning rate.
  config.sample.use_ema = False
  return config
