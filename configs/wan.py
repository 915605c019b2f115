r"""Wan 2.1 (T2V 1.3B / 14B, I2V 14B): fine-tune, LoRA and sample from the open weights.

Download elsewhere (this library never downloads), e.g.
  huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir=Wan2.1-T2V-1.3B-Diffusers

# Sample from the pretrained weights (the transformer read from the folder at run time):
python -m vdit_jax.main --config=configs/wan.py --workdir=runs/wan --mode=sample \
    --config.train.init_from=Wan2.1-T2V-1.3B-Diffusers \
    --config.model.text.encoder_path=Wan2.1-T2V-1.3B-Diffusers \
    --config.data.vae=wan_vae --prompt="a cat walking on grass"
# Full fine-tuning on latent shards with cached umT5 caption embeddings:
python -m vdit_jax.main --config=configs/wan.py --workdir=runs/wan_ft \
    --config.train.init_from=Wan2.1-T2V-1.3B-Diffusers --config.data.path=wan_latents
# LoRA (the frozen base read from the folder):
python -m vdit_jax.main --config=configs/wan.py:t2v_1_3b,lora --workdir=runs/wan_lora \
    --config.lora.base_checkpoint=Wan2.1-T2V-1.3B-Diffusers --config.data.path=wan_latents

# I2V 14B: --mode=extend --input=frame.png (or clip.mp4) animates the (last) frame, its
# CLIP image tokens from the folder's image_encoder/:
python -m vdit_jax.main --config=configs/wan.py:i2v_14b --workdir=runs/wan_i2v --mode=extend \
    --config.train.init_from=Wan2.1-I2V-14B-480P-Diffusers \
    --config.model.text.encoder_path=Wan2.1-I2V-14B-480P-Diffusers \
    --config.model.image_encoder_path=Wan2.1-I2V-14B-480P-Diffusers \
    --config.data.vae=wan_vae --input=frame.png --num_frames=81 --prompt="the cat jumps"

Variants (get_config(arg), comma-separated): t2v_1_3b (default), t2v_14b, i2v_14b, and
lora. The model section is Wan's (model/wan.py's mapping; the folder's config.json is checked
against it when the weights load), 480p x 81 frames: VAE latents [21, 60, 104, 16] (4x time,
8x space), 1x2x2 tubelets -> 32,760 tokens per clip. Flow matching with Wan's shift 3.0
(480p; 5.0 at 720p), UniPC 50 steps with CFG 5.0 and a negative prompt, as WanPipeline.
bf16 compute, f32 master params, blocks scanned and rematerialised, params and optimizer
state sharded over fsdp (all devices by default). Planned for TPU pods (docs/wan_plans.md):
1.3B full fine-tuning fits 4 v5p chips (21.9 GiB of 95 per chip), 14B full 16 (84.2 GiB),
14B LoRA 8 (86.3 GiB); sampling 1.3B / 14B at CFG on 4 chips (3.6 / 24.7 GiB).
  python -m vdit_jax.tools.plan --config=configs/wan.py:t2v_14b --topology=v5p:2x2x4
  python -m vdit_jax.tools.plan --config=configs/wan.py:t2v_14b --topology=v6e:8x8 --search_mesh
"""

from vdit_jax.config.defaults import base_config

# The published Wan 2.1 transformers (their diffusers config.json values).
MODELS = {
    't2v_1_3b': dict(num_heads=12, width=1536, mlp_dim=8960, depth=30, image_embed_dim=0,
                     condition_channels=0),
    't2v_14b': dict(num_heads=40, width=5120, mlp_dim=13824, depth=40, image_embed_dim=0,
                    condition_channels=0),
    'i2v_14b': dict(num_heads=40, width=5120, mlp_dim=13824, depth=40, image_embed_dim=1280,
                    condition_channels=20),
}
VARIANTS = ('t2v_1_3b', 't2v_14b', 'i2v_14b', 't2v_1_3b,lora')


def get_config(arg=None):
  parts = [p.strip() for p in (arg or 't2v_1_3b').split(',') if p.strip()]
  names = [p for p in parts if p in MODELS]
  unknown = [p for p in parts if p not in MODELS and p != 'lora']
  if unknown or len(names) != 1:
    raise ValueError(f'configs/wan.py:{arg!r}: give one of {sorted(MODELS)}, optionally '
                     f"',lora' (unknown: {unknown}).")
  model = MODELS[names[0]]
  config = base_config()
  m = config.model
  m.variant = ''
  m.width, m.depth, m.num_heads, m.mlp_dim = (model['width'], model['depth'],
                                              model['num_heads'], model['mlp_dim'])
  m.patch_size = (1, 2, 2)
  m.pos_embed = 'rope'
  m.rope_style = 'wan'
  m.qk_norm = True
  m.qk_norm_across_heads = True
  m.modulation = 'shared'
  m.cross_attn_norm_affine = True
  m.conditioning = 'text'
  m.caption_dropout = 0.1           # training: all-zero embeddings (the model's "no caption")
  m.text.encoder = 'precomputed'
  m.text.embed_dim = 4096           # umT5-XXL
  m.text.max_length = 512
  m.text.projection = 'gelu_mlp'
  m.text.attend_padding = True
  m.image_embed_dim = model['image_embed_dim']
  m.condition_channels = model['condition_channels']
  m.dtype = 'bfloat16'
  m.param_dtype = 'float32'
  m.scan_layers = True
  m.remat_policy = 'full'
  m.attention_impl = 'auto'

  d = config.data
  d.source = 'shards'               # latent shards with caption_embedding (tools.encode_latents)
  d.path = ''
  d.latents = True
  d.num_frames, d.height, d.width, d.channels = 21, 60, 104, 16

  config.diffusion.objective = 'flow'
  config.diffusion.t_sampling = 'uniform'
  config.diffusion.shift = 3.0

  t = config.train
  t.num_steps = 2000
  t.batch_size = 8
  t.learning_rate = 1e-5
  t.warmup_steps = 100
  t.weight_decay = 0.0
  t.ema_decay = 0.0                 # sample the trained weights (fine-tuning is short)
  t.log_every = 10

  s = config.sample
  s.sampler = 'unipc'
  s.num_steps = 50
  s.cfg_scale = 5.0
  s.shift = 3.0
  s.num_samples = 1
  s.fps = 16
  s.formats = 'mp4'
  s.use_ema = False
  s.overlap = 5                     # --mode=extend: latent frames (17 video frames) given per window

  config.checkpoint.every_steps = 250
  config.checkpoint.keep = 2
  config.mesh.data = 1
  config.mesh.fsdp = -1             # every device: params and optimizer state sharded

  if model['condition_channels']:  # I2V: each window starts from the clip's last frame
    s.overlap = 0
  if 'lora' in parts:
    config.lora.rank = 32
    config.lora.alpha = 32.0
    config.lora.targets = 'attn,mlp'
    t.learning_rate = 1e-4
  return config
