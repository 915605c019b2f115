r"""DiT-XL video model at pod scale (trained in tests only cut to CPU size, and
AOT-compiled at full size for TPU topologies).

python -m vdit_jax.main --config=configs/dit_xl_video.py --workdir=gs://BUCKET/runs/xl \
    --config.data.source=shards --config.data.path=gs://BUCKET/latents
# 2 slices, data across them (launch/gke_jobset.sh with SLICES=2 starts the processes):
python -m vdit_jax.main --config=configs/dit_xl_video.py --workdir=gs://BUCKET/runs/xl \
    --config.data.source=shards --config.data.path=gs://BUCKET/latents --config.mesh.dcn_data=2

Latent video [B, T, H, W, C] = [B, 16, 32, 32, 16] (a 4x temporal / 8x spatial
VAE's latents of 61 frames at 256x256), tubelets 1x2x2 -> 4,096 tokens per clip,
XL width 1152, depth 28, 16 heads (~ 674 M parameters), 3-D RoPE, bf16 compute,
f32 params, layers scanned and rematerialised, params and optimizer state
sharded over fsdp.

Planned (AOT-compiled on a CPU host, no TPU needed) with

python -m vdit_jax.tools.plan --config=configs/dit_xl_video.py --topology=v5p:4x4x8
python -m vdit_jax.tools.plan --config=configs/dit_xl_video.py --topology=v6e:16x16

Global batch 256 (a multiple of both device counts), mesh data=-1 x fsdp=8, remat
dots_with_no_batch_dims_saveable (keeps the weight matmuls' outputs, recomputes the
attention logits that xla attention would otherwise keep as [B, K, N, N] per layer):
v5p:4x4x8  mesh data 16 x fsdp 8, 2 clips/chip, 9.8 GiB of 95 GiB per chip;
v6e:16x16  mesh data 32 x fsdp 8, 1 clip/chip,  6.0 GiB of 32 GiB per chip,
with model.attention_impl=auto, which takes the splash kernel on TPU (with xla attention:
17.5 and 8.2 GiB). Figures: docs/results.md, "Pod-scale plans".
"""

from vdit_jax.config.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.variant = 'XL/2'
  config.model.pos_embed = 'rope'
  config.model.dtype = 'bfloat16'
  config.model.param_dtype = 'float32'
  config.model.remat_policy = 'dots_with_no_batch_dims_saveable'
  config.data.num_frames = 16
  config.data.height = 32
  config.data.width = 32
  config.data.channels = 16
  config.diffusion.objective = 'flow'
  config.diffusion.t_sampling = 'logit_normal'
  config.diffusion.shift = 3.0
  config.sample.sampler = 'euler'
  config.train.num_steps = 400_000
  config.train.batch_size = 256
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 5000
  config.train.weight_decay = 0.01
  config.train.ema_decay = 0.9999
  config.train.log_every = 50
  config.checkpoint.every_steps = 2000
  config.checkpoint.keep = 5
  config.sample.every_steps = 20_000
  config.sample.num_samples = 16
  config.mesh.data = -1
  config.mesh.fsdp = 8
  return config
