"""The full default config: every key a run reads, with its default.

Each `configs/*.py` starts from `base_config()` and changes what it needs, so a
key added here is known to every experiment and can be overridden from the
command line (`--config.train.num_steps=100`).
"""

import copy
import os

import ml_collections
from ml_collections import config_dict

from vdit_jax.parallel import axes
from vdit_jax.vae.config import VAEConfig


LR_SCHEDULES = ('cosine', 'wsd')   # train.lr_schedule (train/state.py)
OPTIMIZERS = ('adamw', 'muon')     # train.optimizer


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
  m.rope_style = 'halves'           # rope: halves | wan (interleaved pairs, t gets the rest)
  m.qk_norm = True
  m.qk_norm_across_heads = False    # one RMSNorm over all heads' q (k), as Wan 2.1
  # adaLN: per_block (each block projects the timestep embedding: DiT) | shared (one
  # projection for all blocks plus per-block learned offsets: Wan 2.1)
  m.modulation = 'per_block'
  m.cross_attn_norm_affine = False  # the cross-attention's LayerNorm learns scale and bias
  # Wan 2.1 I2V: CLIP image tokens [Li, E] (E = this; 0 = none) read by cross-attention,
  # and condition_channels more input channels (the first-frame latents and their mask).
  m.image_embed_dim = 0
  m.condition_channels = 0
  # A Wan 2.1 I2V diffusers folder (its image_encoder/ and image_processor/) whose CLIP
  # encodes the conditioning image at sampling time (--mode=extend); '' = none. Only for a
  # model with image tokens (image_embed_dim > 0).
  m.image_encoder_path = ''
  m.attention_impl = 'auto'         # auto | xla | cudnn | blockwise | splash (model/attention.py)
  # blockwise / splash tiles (splash: multiples of 128); None: the kernel's default,
  # blockwise 256 x 256 (CPU caches), splash 512 x 512 (attention.DEFAULT_BLOCKS).
  m.attention_block_q = config_dict.placeholder(int)
  m.attention_block_kv = config_dict.placeholder(int)
  m.sequence_parallel = 'none'      # none | all_gather | ring | ulysses (over mesh.sequence)
  # Attention patterns (model/attention_patterns.py); window sizes in tokens, -1 = whole axis.
  m.attention_pattern = 'full'      # full | factorised | windowed | hierarchical
  m.factorised_mode = 'alternating'  # alternating (even blocks spatial, odd temporal) | within_block
  m.window_size = (2, 4, 4)         # windowed: (wt, wh, ww), each dividing the token grid
  m.window_shift = True             # windowed: Swin half-window shift on odd blocks (masked)
  m.hierarchical_windows = ((-1, -1, -1), (2, 4, 4))  # coarse -> fine, one head group each
  # Depthwise 3-D convolution over the token grid at every MLP input, (kt, kh, kw) odd;
  # () = none. Lets neighbouring tubelets decide together (BUILD_NOTES, "Local mixing").
  m.mlp_conv = ()
  # Pixel refiner after the unpatchify (model/blocks.py PixelRefiner): a residual two-layer
  # convolution over pixels that sees the prediction and the noisy input; 0 = none.
  m.refiner_width = 0
  m.refiner_kernel = (1, 3, 3)
  # Self-conditioning (Chen et al. 2022): the model also sees its own x0 estimate, from a
  # first pass on half the train steps and from the previous sampler step.
  m.self_condition = False
  # EDM2's learned loss uncertainty: a head u(t) (zero at init) and the loss L / e^u + u per
  # clip (its generated frames where some are given), so each noise level is weighed by the
  # inverse of its expected loss.
  m.loss_uncertainty = False
  m.scan_layers = True
  m.remat_policy = 'none'           # none | full | nothing_saveable | dots_saveable |
                                    # dots_with_no_batch_dims_saveable | save_named | ...
  m.remat_names = ''                # save_named: comma list from blocks.CHECKPOINT_NAMES
  m.dtype = 'float32'               # compute dtype
  m.param_dtype = 'float32'
  m.label_dropout = 0.1             # p(label -> null) in training, for CFG
  # Text conditioning (model/text.py): cross-attention to caption tokens in every block.
  m.conditioning = 'class'          # class | text
  m.class_tokens = 0                # class: also K label tokens read by cross-attention
  m.caption_dropout = 0.1           # text: p(caption -> learned null caption), for CFG
  m.text = text = ml_collections.ConfigDict()
  text.encoder = 'builtin'          # builtin (word tokens + small transformer, trained with the
                                    # model) | precomputed (shards' caption_embedding [L, E])
  text.max_length = 16              # caption tokens / embedding rows L
  text.width = 128                  # builtin encoder width, depth, heads, MLP (None: 4 x width)
  text.depth = 2
  text.num_heads = 4
  text.mlp_dim = config_dict.placeholder(int)
  text.embed_dim = 0                # precomputed: E (T5-XXL / UMT5-XXL: 4096)
  text.projection = 'layernorm_linear'  # precomputed -> width: layernorm_linear | gelu_mlp (Wan)
  text.attend_padding = False       # attend all L rows, padding too; no caption = zeros (Wan)
  # precomputed: a umT5 folder (a Wan 2.1 diffusers folder, or its text_encoder/ with the
  # tokenizer/ beside it) that encodes prompts at sampling time ('' = prompts refused)
  text.encoder_path = ''
  text.pooled = False               # also add the caption's masked mean (an MLP of it) to the
                                    # timestep embedding that drives adaLN, as SD3 / Flux do
  # Given frames (diffusion/conditioning.py): video extension, image-to-video.
  m.context_frames_max = 0          # train with the first k in [1, this] frames given; 0 = off
  m.context_none_prob = 0.1         # p(k = 0) per clip, so the model also generates from nothing
  # Which frames are given: prefix (the first k, extension) | keyframes (frames 0, s, ...,
  # T-1, interpolation; context_frames_max = their number). Stride s: 0 = first and last.
  m.given_frames = 'prefix'
  m.keyframe_stride = 0

  c.diffusion = d = ml_collections.ConfigDict()
  d.objective = 'eps'               # eps | v | flow
  d.schedule = 'cosine'             # linear | cosine (eps, v)
  d.num_timesteps = 1000
  d.t_sampling = 'uniform'          # uniform | logit_normal (flow)
  d.logit_mean = 0.0
  d.logit_std = 1.0
  d.shift = 1.0                     # SNR / shift^2: flow time shift; eps, v: shifted schedule
  d.loss_weighting = 'none'         # none | x0 (v, flow) | min_snr: see diffusion/objectives.py
  d.min_snr_gamma = 5.0             # min_snr: the cap on the x0 error's weight SNR(t)
  d.input_scale = 'none'            # none | signal: z_t * sqrt(abar_t) in (objectives.py)
  d.prediction = 'target'           # target | x0 (v, flow): what the network outputs

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
  dd.colours = ''                   # synthetic: comma list of synthetic.COLOURS ('' = all)
  dd.shape_size = (0.20, 0.35)      # synthetic: (min, max) shape side / shorter frame side
  dd.bounce = True                  # synthetic: reflect off borders (False: paths fit inside)
  dd.shape_weights = ()             # synthetic: weights of square, circle, triangle (() = equal)
  dd.frame_stride = 1               # files: video frames between clip frames
  dd.clip_start = 'random'          # files: random | center
  dd.crop = 'center'                # files: center | random (after the short-side resize)
  # Multi-shape training (data/buckets.py): ((T, H, W, global_batch), ...), bucket-pure
  # batches; each bucket's batch replaces train.batch_size; samples take bucket 0's shape.
  dd.buckets = ()                   # () = one shape: num_frames x height x width
  dd.bucket_weights = ()            # synthetic: one weight per bucket (() = equal)
  # Latent diffusion (vae/latents.py): the shards hold VAE latents (tools.encode_latents;
  # num_frames/height/width/channels are the latents' T', H', W', z) and samples are
  # un-normalised with the index's statistics and decoded through the VAE to frames.
  dd.latents = False
  dd.vae = ''                       # latents: VAE folder ('' = the one index.json records)

  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 1000
  t.batch_size = 16                 # global, over all processes and devices
  t.learning_rate = 1e-3
  t.warmup_steps = 100
  t.end_lr_fraction = 0.1           # the schedule ends at this fraction of the peak
  t.lr_schedule = 'cosine'          # cosine | wsd (warmup, stable peak, 1 - sqrt cooldown)
  t.decay_fraction = 0.2            # wsd: the last share of the steps that cools down
  t.weight_decay = 0.0
  t.optimizer = 'adamw'             # adamw | muon (block matrices; the rest AdamW: train/state.py)
  t.b1 = 0.9
  t.b2 = 0.99
  t.grad_clip = 1.0
  # A step whose loss or gradient is NaN / inf never updates the state (train/step.py);
  # 'skip': go on, and stop after max_nonfinite_steps of them in a row; 'stop': stop at the
  # first. Either way no checkpoint ever holds a non-finite value.
  t.nonfinite = 'skip'
  t.max_nonfinite_steps = 20
  t.ema_decay = 0.999
  t.log_every = 25
  t.tensorboard = True              # WORKDIR/tensorboard event files (process 0)
  # A Wan 2.1 diffusers folder (model/wan.py) whose transformer weights a fresh run starts
  # from (full fine-tuning); the workdir's own checkpoints come first when resuming.
  t.init_from = ''
  t.grad_accum_steps = 1            # micro-batches per step (scanned; one optimizer update)
  # Persistent XLA compilation cache ('' = off), shared by every run of this user on this
  # host: a restart, a resume or a second run of the same shapes loads the compiled step.
  # JAX's own JAX_COMPILATION_CACHE_DIR, when set, is the default (a run points JAX's
  # cache at this field, so it would otherwise override what the user set for JAX).
  t.compilation_cache_dir = (os.environ.get('JAX_COMPILATION_CACHE_DIR')
                             or '~/.cache/vdit_jax/jax_compilation_cache')

  c.checkpoint = ck = ml_collections.ConfigDict()
  ck.every_steps = 500
  ck.keep = 3
  ck.async_save = True
  ck.keep_period = config_dict.placeholder(int)  # also keep every multiple of this step
  # latest: resume from the newest step, and stop if it does not restore (damaged bytes,
  # NaN); latest_good: from the newest step that restores and verifies.
  ck.resume = 'latest'

  c.sample = s = ml_collections.ConfigDict()
  s.every_steps = 0                 # 0 = only at the end of training
  s.sampler = 'ddim'                # ddpm | ddim (eps, v) | euler | unipc (flow; unipc: Wan's)
  s.num_steps = 50
  s.shift = config_dict.placeholder(float)  # euler (flow): the grid's time shift (None: diffusion.shift)
  s.eta = 0.0
  s.cfg_scale = 2.0
  s.cfg_interval = ()               # (lo, hi): guide only at noise levels in [lo, hi]; () every step
  s.num_samples = 8
  s.use_ema = True
  s.fps = 8
  s.formats = 'mp4,gif'
  s.seed = 1
  s.prompts = ''                    # text: ';'-separated captions ('' = synthetic captions)
  # precomputed text with model.text.encoder_path: the prompt that CFG guides away from
  # (WanPipeline's negative_prompt; '' encodes the empty prompt, as diffusers does)
  s.negative_prompt = ''
  s.overlap = 0                     # --mode=extend: given frames per window (0 = context_frames_max)
  s.vae_latents_per_chunk = 1       # data.latents: latent frames per VAE decode call
  s.vae_tile = ()                   # data.latents: (SIZE, STRIDE) pixels: decode in tiles

  # LoRA fine-tuning (model/lora.py, train/lora.py): rank > 0 freezes the base model read
  # from base_checkpoint and trains only rank-r adapters W + (alpha / rank) * A @ B.
  c.lora = lo = ml_collections.ConfigDict()
  lo.rank = 0                       # 0 = off
  lo.alpha = 8.0
  lo.targets = 'attn'               # comma list: attn (q, k, v, out), mlp (fc1, fc2), or kernels
  lo.base_checkpoint = ''           # workdir (newest checkpoint's EMA params), export dir, or
                                    # a Wan 2.1 diffusers folder (model/wan.py)

  # Synchronised audio (issue 30): clips carry their soundtrack as log-mel frames on the
  # video's time axis, and one DiT generates both (model/av_dit.py, diffusion/av.py).
  c.audio = au = ml_collections.ConfigDict()
  au.enabled = False
  au.sample_rate = 16000            # Hz, mono
  au.fps = 16.0                     # video frames per second of a clip (files: must match)
  au.n_fft = 512                    # STFT window (samples)
  au.hop = 125                      # samples per mel frame; sample_rate / fps / hop integer
  au.mel_bins = 64
  au.fmin = 0.0
  au.fmax = 8000.0
  au.missing = 'skip'               # files without (readable) audio: skip | silence
  au.design = 'cross'               # cross (two streams + cross-attention, LTX-2 / Ovi) |
                                    # joint (one attention over both, MM-DiT)
  au.patch = 4                      # mel frames per audio token
  au.loss_weight = 1.0              # the audio stream's loss beside the video's
  # Training tasks per clip: (joint: both noisy at one t, video->audio: the video clean,
  # audio->video: the audio clean); the rest of the clips draw a t per stream.
  au.task_probs = (0.5, 0.3, 0.1)
  au.modality_dropout = 0.1         # p(a stream does not see the other), for modality CFG
  # Sampling: joint (both generated) | v2a (audio for given video) | a2v (video for audio)
  au.task = 'joint'
  au.cfg_scale = 1.5                # the audio stream's label guidance (sample.cfg_scale: video's)
  au.modality_cfg_video = 1.0       # guidance of each stream toward the other (1 = none)
  au.modality_cfg_audio = 1.0
  au.griffin_lim_iters = 32         # the vocoder's iterations

  c.mesh = mesh = ml_collections.ConfigDict()
  # Sizes within one slice (ICI); an axis's full size is mesh.<axis> * mesh.dcn_<axis>.
  mesh.data = -1                    # -1: whatever the other axes leave of a slice
  mesh.fsdp = 1
  mesh.tensor = 1
  mesh.sequence = 1
  # Slices each axis spans (DCN, between TPU slices); their product is the slice count,
  # positive ints (no -1). Put data (and fsdp) over DCN: tensor and sequence collectives
  # run every layer and want the fast in-slice links.
  mesh.dcn_data = 1
  mesh.dcn_fsdp = 1
  mesh.dcn_tensor = 1
  mesh.dcn_sequence = 1
  c.logical_axis_rules = axes.DEFAULT_RULES
  return c


def vae_base_config() -> ml_collections.ConfigDict:
  """Every key VAE training reads, with its default (configs/vae_*.py start from this)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.vae = v = ml_collections.ConfigDict()  # VAEConfig fields (vae/config.py)
  arch = VAEConfig()
  v.base_dim = arch.base_dim
  v.decoder_base_dim = config_dict.placeholder(int)  # None: base_dim
  v.z_dim = arch.z_dim
  v.dim_mult = arch.dim_mult
  v.num_res_blocks = arch.num_res_blocks
  v.temporal_downsample = arch.temporal_downsample
  v.dtype = 'float32'
  # The DiT trainer's data config: same sources, fields and checks.
  c.data = copy.deepcopy(base_config().data)
  c.data.num_frames = 17  # 1 + 4k
  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 1000
  t.batch_size = 8
  t.learning_rate = 1e-3
  t.warmup_steps = 50
  t.end_lr_fraction = 0.1
  t.lr_schedule = 'cosine'          # the DiT trainer's schedules and optimizers (train/state.py)
  t.decay_fraction = 0.2
  t.optimizer = 'adamw'
  t.weight_decay = 0.0
  t.b1 = 0.9
  t.b2 = 0.99
  t.grad_clip = 1.0
  t.kl_weight = 1e-4     # x mean KL per latent value, next to the per-pixel MSE
  t.log_every = 25
  t.stats_batches = 8    # batches that measure the latents' mean / std at the end
  return c
