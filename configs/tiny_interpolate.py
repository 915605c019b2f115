r"""Stage 2 of multi-stage generation: a tiny DiT that fills the frames between two keyframes.

python -m vdit_jax.main --config=configs/tiny_interpolate.py --workdir=/tmp/vdit_tiny_interpolate

Windows of 5 full-rate synthetic frames (8 fps) whose first and last frames are given clean
(model.given_frames='keyframes', the model's given-frame mask channel on them) and whose 3
middle frames are generated; the loss covers those 3 only (diffusion/conditioning.py).
configs/tiny_keyframes.py makes keyframes 4 frames apart at 2 fps; the pipeline
(generate/multistage.py, tools/generate_video.py) runs this model once per consecutive pair.
Text-conditioned, with configs/tiny_text.py's captions and training (tiny's straight paths,
the token convolution, rectified flow with x0 output, the scaled noisy input,
warmup-stable-decay at peak 1e-3, Euler sampling of the raw params), stated here in full,
at the variant's width 128, 1200 steps, without guidance at sampling time: the keyframes
carry the colour and shape. Given the true keyframes of 24 held-out clips, the frames
between have their centroids 0.31 px from the true ones (linear interpolation 0.17; the v
recipe before it 0.40; docs/results.md, "Interpolation and keyframes"). Tubelets of 1x4x4,
since 5 frames do not split into pairs (320 tokens per clip). --mode=sample interpolates
the keyframes of held-out synthetic clips.
"""

from vdit_jax.config.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  # Clips: windows of 5 full-rate frames (keyframe spacing 4, tiny_keyframes' time_stride).
  config.data.num_frames = 5
  config.data.height = 32
  config.data.width = 32
  config.data.time_stride = 1.0
  config.data.shape_size = (0.4, 0.55)
  config.data.bounce = False
  config.data.shape_weights = ()
  # Model: tiny's width 128 and token convolution, 1x4x4 tubelets.
  config.model.variant = 'Mu/1x4x4'
  config.model.mlp_conv = (3, 3, 3)
  config.model.loss_uncertainty = False
  # The two keyframes given: the first and last frame of each window.
  config.model.given_frames = 'keyframes'
  config.model.keyframe_stride = 0      # 0: the first and last frame of each window
  config.model.context_frames_max = 2   # the two keyframes
  config.model.context_none_prob = 0.25
  # Captions (configs/tiny_text.py's encoder).
  config.model.conditioning = 'text'
  config.model.caption_dropout = 0.1
  config.model.text.encoder = 'builtin'
  config.model.text.max_length = 8
  config.model.text.width = 64
  config.model.text.depth = 2
  config.model.text.num_heads = 4
  config.diffusion.objective = 'flow'
  config.diffusion.t_sampling = 'logit_normal'
  config.diffusion.shift = 3.0
  config.diffusion.prediction = 'x0'
  config.diffusion.input_scale = 'signal'
  config.train.num_steps = 1200
  config.train.batch_size = 8
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 100
  config.train.lr_schedule = 'wsd'
  config.train.log_every = 25
  config.checkpoint.every_steps = 400
  config.checkpoint.keep = 2
  config.sample.every_steps = 0
  config.sample.num_samples = 8
  config.sample.sampler = 'euler'
  config.sample.use_ema = False
  config.sample.cfg_scale = 1.0         # no guidance: the keyframes carry colour and shape
  config.sample.fps = 8
  return config
