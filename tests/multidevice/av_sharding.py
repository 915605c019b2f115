"""Audio-video training on 8 fake CPU devices under several meshes == the same on one device.

The audio-video DiT (model/av_dit.py, configs/tiny_av.py) cut to a small size trains 2
steps on each mesh, in both audio designs ('cross': a stream of blocks each, sequence-
parallel self-attention, cross-attention that GSPMD partitions; 'joint': one attention over
[video; audio] tokens with the sequence-parallel strategy); its losses and final params
must equal a one-device run's of the same design, and the audio stream's params must be
sharded by their logical names (EXPECTED_AUDIO_SPECS, written out from the default rules).

Run by av_sharding_test.py in a subprocess. Prints one JSON line {check: 'ok' | failure}.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/av_sharding.py
"""

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from configs import tiny_av
from tests.conftest import shrink
from tests.multidevice import all_gather_shapes, outcomes, path_specs
from vdit_jax.data import pipeline
from vdit_jax.train import loop
from vdit_jax.train import state as state_lib

# name -> (audio.design, mesh sizes, model.sequence_parallel).
MESHES = {
    'cross_data2_fsdp2_tensor2': ('cross', dict(data=2, fsdp=2, tensor=2), 'none'),
    'cross_data2_seq4_all_gather': ('cross', dict(data=2, sequence=4), 'all_gather'),
    'cross_data2_seq4_ring': ('cross', dict(data=2, sequence=4), 'ring'),
    # ulysses swaps heads for tokens: 4 heads per device (no tensor axis) divide by 2.
    'cross_data4_seq2_ulysses': ('cross', dict(data=4, sequence=2), 'ulysses'),
    'joint_data2_fsdp2_tensor2': ('joint', dict(data=2, fsdp=2, tensor=2), 'none'),
    'joint_data2_seq4_all_gather': ('joint', dict(data=2, sequence=4), 'all_gather'),
}
STEPS = 2
DEPTH = 2
# sharding.py's tolerance (x0 output's loss weighs clean-end errors by up to 400, so sums
# in another order move it by more than float32's epsilon).
TOL = dict(rtol=3e-5, atol=1e-6)
# 4 frames of 16x16 in 2x4x4 tubelets: 32 video tokens; 4 frames x 8 mel frames (16 kHz,
# 16 fps, hop 125) = 32 mel frames in tokens of 4: 8 audio tokens, which the sequence
# axis (4 or 2) divides.
MEL_BINS, AUDIO_PATCH = 16, 4
VIDEO_TOKENS, AUDIO_TOKENS = 32, 8

# Logical names -> mesh axes under the default rules (vdit_jax/parallel/axes.py), written
# out here: embed -> fsdp, mlp and heads -> tensor; patch, kv, modulation, freq: replicated.
EMBED, MLP, HEADS = 'fsdp', 'tensor', 'tensor'


def _attention_specs(prefix, bias=True):
  """A q/k/v + output projection's params (blocks.Attention's names), unscanned."""
  specs = {f'{prefix}/{k}_kernel': P(EMBED, HEADS, None) for k in ('query', 'key', 'value')}
  specs[f'{prefix}/out_kernel'] = P(HEADS, None, EMBED)
  if bias:
    specs.update({f'{prefix}/{k}_bias': P(HEADS, None) for k in ('query', 'key', 'value')})
    specs[f'{prefix}/out_bias'] = P(EMBED)
  specs[f'{prefix}/q_norm/scale'] = P(None)
  specs[f'{prefix}/k_norm/scale'] = P(None)
  return specs


def _mlp_specs(prefix):
  return {f'{prefix}/fc1/kernel': P(EMBED, MLP), f'{prefix}/fc1/bias': P(MLP),
          f'{prefix}/fc2/kernel': P(MLP, EMBED), f'{prefix}/fc2/bias': P(EMBED)}


def expected_audio_specs(design):
  """{path: PartitionSpec} of every audio-stream param of `design` (those whose path
  names audio), from the logical names each layer gives them."""
  specs = {
      'audio_embed/proj/kernel': P(None, EMBED),   # (patch, embed)
      'audio_embed/proj/bias': P(EMBED),
      'audio_t_embed/mlp_in/kernel': P(None, EMBED),  # (freq, embed)
      'audio_t_embed/mlp_in/bias': P(EMBED),
      'audio_t_embed/mlp_out/kernel': P(MLP, EMBED),
      'audio_t_embed/mlp_out/bias': P(EMBED),
      'audio_loss_logvar/proj/kernel': P(None, None),  # replicated, as the video's
      'audio_loss_logvar/proj/bias': P(None),
      'audio_final/adaln/proj/kernel': P(EMBED, None),  # (embed, modulation)
      'audio_final/adaln/proj/bias': P(None),
      'audio_final/proj/kernel': P(EMBED, None),  # (embed, patch)
      'audio_final/proj/bias': P(None),
  }
  for i in range(DEPTH):
    if design == 'cross':
      block = f'audio_blocks_{i}'
      specs[f'{block}/adaln/proj/kernel'] = P(EMBED, None)
      specs[f'{block}/adaln/proj/bias'] = P(None)
      specs.update(_attention_specs(f'{block}/attn'))
      specs.update(_attention_specs(f'{block}/cross_attn/attn'))  # the class tokens
      specs.update(_mlp_specs(f'{block}/mlp'))
      for direction in ('video_from_audio', 'audio_from_video'):  # no biases
        specs.update(_attention_specs(f'av_cross_{i}/{direction}', bias=False))
    else:
      block = f'blocks_{i}'
      specs[f'{block}/audio_adaln/proj/kernel'] = P(EMBED, None)
      specs[f'{block}/audio_adaln/proj/bias'] = P(None)
      specs.update(_attention_specs(f'{block}/audio_attn'))
      specs.update(_attention_specs(f'{block}/audio_cross_attn/attn'))
      specs.update(_mlp_specs(f'{block}/audio_mlp'))
  return specs


def is_audio_path(path):
  """Whether a param path ('a/b/c') belongs to the audio stream or its meeting with the
  video's (av_cross_*/video_from_audio reads the audio too)."""
  return 'audio' in path


def config_for(design, name=None):
  """configs/tiny_av.py (audio on, `design`) cut small; on mesh `name`, or one device."""
  config = shrink(
      tiny_av.get_config('joint' if design == 'joint' else None), small=('model', 'data'),
      # Without tiny_av's token convolution (model.mlp_conv): a video-stream layer whose
      # sharding sharding.py checks on these meshes, and about an eighth of the compile here.
      model=dict(width=32, depth=DEPTH, num_heads=4, mlp_dim=64,
                 patch_size=(2, 4, 4),  # 4 x 16 x 16 clip -> 32 tokens
                 mlp_conv=()),
      train=dict(batch_size=8, warmup_steps=0,  # a real update on the first step
                 learning_rate=1e-3),
      audio=dict(mel_bins=MEL_BINS, patch=AUDIO_PATCH),
      mesh=dict(data=1))
  assert config.audio.enabled and config.audio.design == design, config.audio
  if name is not None:
    assert MESHES[name][0] == design, (name, design)
    config.mesh.update(MESHES[name][1])
    config.model.sequence_parallel = MESHES[name][2]
  return config


def run(config, devices):
  """STEPS train steps from one init on `devices`: (setup, state, shardings, losses, hlo)."""
  s = loop.build(config, None, devices=devices)
  state, shardings = state_lib.create_state(s.init_fn, jax.random.key(0), s.mesh, s.rules)
  data = pipeline.make_dataset(config.data, config.train.batch_size, seed=0,
                               process_index=0, process_count=1,
                               audio=pipeline.audio_spec(config))
  losses = []
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    for i in range(STEPS):
      batch = loop.global_batch(next(data), s.mesh, s.rules)
      if i == 0:
        frames = config.data.num_frames * 8  # 16 kHz / 16 fps / hop 125
        assert batch['audio'].shape == (8, frames, MEL_BINS), batch['audio'].shape
        assert frames // AUDIO_PATCH == AUDIO_TOKENS
        # The soundtracks are split over the batch axes like the clips, whole per clip.
        ways = config.mesh.data * config.mesh.fsdp
        for key, shape in (('audio', (8 // ways, frames, MEL_BINS)),
                           ('video', (8 // ways, config.data.num_frames, 16, 16, 3))):
          shards = batch[key].addressable_shards
          assert {x.data.shape for x in shards} == {shape}, (key, shards[0].data.shape)
        step = loop.jit_train_step(s).lower(state, batch, jax.random.key(1)).compile()
        hlo = step.as_text()
      state, metrics = step(state, batch, jax.random.key(1))
      losses.append(float(metrics['loss']))
  return s, state, shardings, losses, hlo


def check_mesh(name, refs, devices):
  design, sizes, strategy = MESHES[name]
  if design not in refs:  # the one-device run of this design
    _, ref_state, _, ref_losses, _ = run(config_for(design), devices[:1])
    refs[design] = ref_losses, jax.device_get(ref_state.params)
  ref_losses, ref_params = refs[design]
  config = config_for(design, name)
  s, state, shardings, losses, hlo = run(config, devices)
  assert dict(s.mesh.shape) == {**dict(data=1, fsdp=1, tensor=1, sequence=1), **sizes}, (
      s.mesh.shape)
  assert np.all(np.isfinite(losses)), losses
  np.testing.assert_allclose(losses, ref_losses, **TOL, err_msg=f'{name} losses')
  params = jax.device_get(state.params)
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  jax.tree_util.tree_map_with_path(
      lambda path, a, b: np.testing.assert_allclose(
          a, b, **TOL, err_msg=f'{name} param {jax.tree_util.keystr(path)}'),
      params, ref_params)
  # The audio stream's params are planned by their logical names ...
  expected = expected_audio_specs(design)
  specs = path_specs(shardings.params)
  audio_specs = {k: v for k, v in specs.items() if is_audio_path(k)}
  assert set(audio_specs) == set(expected), (
      f'unexpected: {sorted(set(audio_specs) - set(expected))}; '
      f'missing: {sorted(set(expected) - set(audio_specs))}')
  wrong = {k: (v, expected[k]) for k, v in audio_specs.items() if v != expected[k]}
  assert not wrong, f'audio param specs (got, expected): {wrong}'
  # ... the EMA and Adam's moments follow them ...
  assert {k: v for k, v in path_specs(shardings.ema_params).items()
          if is_audio_path(k)} == expected
  adam = shardings.opt_state[1][0]  # chain(clip, adamw) -> its ScaleByAdamState
  assert {k: v for k, v in path_specs(adam.mu).items() if is_audio_path(k)} == expected
  # ... and the trained arrays really live so on the mesh.
  live = path_specs(jax.tree.map(lambda a: a.sharding, state.params))
  for path in ('audio_embed/proj/kernel', 'audio_final/proj/kernel',
               ('audio_blocks_1/attn/query_kernel' if design == 'cross'
                else 'blocks_1/audio_attn/query_kernel'),
               ('audio_blocks_0/mlp/fc1/kernel' if design == 'cross'
                else 'blocks_0/audio_mlp/fc1/kernel')):
    assert live[path] == expected[path], (path, live[path], expected[path])
  # The strategy's collectives are in the compiled step.
  if strategy == 'ring':
    assert 'collective-permute' in hlo, 'no collective-permute in the ring train step'
  if strategy == 'ulysses':
    assert 'all-to-all' in hlo, 'no all-to-all in the ulysses train step'
  if design == 'joint' and strategy == 'all_gather':
    # One attention over both streams: the strategy gathers the K/V of all the clip's
    # tokens, video and audio, [B/data, 32 + 8, K, Dh].
    gathered = all_gather_shapes(hlo)
    joint_kv = (8 // sizes['data'], VIDEO_TOKENS + AUDIO_TOKENS, 4, 8)
    assert joint_kv in gathered, f'no {joint_kv} all-gathered: {gathered}'


def main(argv):
  """argv[1:]: the meshes to check (default: all of MESHES)."""
  devices = jax.devices()
  assert len(devices) == 8, devices
  refs = {}
  names = argv[1:] or list(MESHES)
  unknown = [n for n in names if n not in MESHES]
  assert not unknown, f'unknown meshes {unknown}; choose from {list(MESHES)}'
  results = outcomes({name: (lambda name=name: check_mesh(name, refs, devices))
                      for name in names})
  print(json.dumps(results))


if __name__ == '__main__':
  main(sys.argv)
