"""The full default config: every key a run reads, with its default.

Each `configs/*.py` starts from `base_config()` and changes what it needs, so a
key added here is known to every experiment and can be overridden from the
command line (`--config.train.num_steps=100`).
"""

import ml_collections
from ml_collections import config_dict

from vdit_jax.model import axes


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.variant = 'Mu/2x4x4'            # NAME/P or NAME/PTxPHxPW; see model/dit.py VARIANTS
  m.width = config_dict.placeholder(int)      # explicit sizes override the variant's
  m.depth = config_dict.placeholder(int)
  m.num_heads = config_dict.placeholder(int)
  m.mlp_dim = config_dict.placeholder(int)
  m.patch_size = config_dict.placeholder(tuple)  # (pt, ph, pw)
  m.pos_embed = 'sincos'            # sincos | rope
  m.qk_norm = True
  m.attention_impl = 'xla'
  m.sequence_parallel = 'none'      # none | all_gather | ring | ulysses (over mesh.sequence)
  m.scan_layers = True
  m.remat_policy = 'none'           # none | full | dots_saveable | ...
  m.dtype = 'float32'               # compute dtype
  m.param_dtype = 'float32'
  m.label_dropout = 0.1             # p(label -> null) in training, for CFG

  c.diffusion = d = ml_collections.ConfigDict()
  d.objective = 'eps'               # eps | v | flow
  d.schedule = 'cosine'             # linear | cosine (eps, v)
  d.num_timesteps = 1000
  d.t_sampling = 'uniform'          # uniform | logit_normal (flow)
  d.logit_mean = 0.0
  d.logit_std = 1.0
  d.shift = 1.0

  c.data = dd = ml_collections.ConfigDict()
  dd.source = 'synthetic'           # synthetic | files | shards (see data/pipeline.py)
  dd.path = ''                      # files: folder or glob of videos; shards: make_shards' --out
  dd.num_frames = 16
  dd.height = 32
  dd.width = 32
  dd.channels = 3
  dd.num_examples = 100_000         # synthetic only; files / shards hold what is on disk
  dd.num_workers = 0
  dd.time_stride = 1.0              # synthetic: base-motion frames per clip frame
  dd.source_seed = 0                # synthetic clips; files: per-index draws of source[idx]
  dd.frame_stride = 1               # files: video frames between clip frames
  dd.clip_start = 'random'          # files: random | center
  dd.crop = 'center'                # files: center | random (after the short-side resize)

  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 1000
  t.batch_size = 16                 # global, over all processes and devices
  t.learning_rate = 1e-3
  t.warmup_steps = 100
  t.end_lr_fraction = 0.1           # cosine decays to this fraction of the peak
  t.weight_decay = 0.0
  t.b1 = 0.9
  t.b2 = 0.99
  t.grad_clip = 1.0
  t.ema_decay = 0.999
  t.log_every = 25

  c.checkpoint = ck = ml_collections.ConfigDict()
  ck.every_steps = 500
  ck.keep = 3
  ck.async_save = True
  ck.keep_period = config_dict.placeholder(int)  # also keep every multiple of this step

  c.sample = s = ml_collections.ConfigDict()
  s.every_steps = 0                 # 0 = only at the end of training
  s.sampler = 'ddim'                # ddpm | ddim (eps, v) | euler (flow)
  s.num_steps = 50
  s.eta = 0.0
  s.cfg_scale = 2.0
  s.num_samples = 8
  s.use_ema = True
  s.fps = 8
  s.formats = 'mp4,gif'
  s.seed = 1

  c.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1                    # -1: whatever the other axes leave
  mesh.fsdp = 1
  mesh.tensor = 1
  mesh.sequence = 1
  c.logical_axis_rules = axes.DEFAULT_RULES
  return c
