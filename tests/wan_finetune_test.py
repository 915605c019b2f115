"""Fine-tuning a pretrained Wan 2.1 transformer (model/wan.py) on latent shards with caption
embeddings: full fine-tuning from train.init_from, LoRA on lora.base_checkpoint = a Wan
folder, and the config checks that stop a mismatched folder before anything compiles.

The Wan is tests/wan_test.py's tiny diffusers WanTransformer3DModel (width 24, 2 layers,
text_dim 16), configs/wan.py shrunk to its sizes by wan.apply_overrides; the clips are
[3, 8, 8, 4] latents (48 tokens) whose records carry [5, 16] caption embeddings.
data.latents=False: no VAE decodes the final sample, which is written as .npy latents.
tests/multidevice/wan_finetune.py runs the full fine-tuning's first step on 8 fake devices
(fsdp=8) against one device.
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import wan as wan_configs
from vdit_jax.config import resolve
from vdit_jax.data import shards
from vdit_jax.model import wan
from vdit_jax.parallel import paths
from vdit_jax.train import lora as lora_lib
from vdit_jax.train import loop
from vdit_jax.train import metrics as metrics_lib
from vdit_jax.train import state as state_lib

pytest.importorskip('torch')
pytest.importorskip('diffusers')
from tests import wan_test  # pylint: disable=g-import-not-at-top,g-bad-import-order  # needs torch

CLIP_SHAPE = (3, 8, 8)      # [T, H, W] latents: 1x2x2 tubelets -> 48 tokens
CAPTION_ROWS = 5            # rows of each record's caption embedding
NUM_CLIPS = 4
RANK = 4
# What tests/multidevice/wan_finetune.py reports.
FSDP_CHECKS = ('step0_params_equal', 'params_born_sharded_over_fsdp',
               'first_step_loss_matches')


def write_latent_shards(directory, shape, channels, embed_dim, count=NUM_CLIPS, seed=0):
  """One shard of `count` float16 latent clips [*shape, channels] of N(0, 1) values, each
  with a float16 caption embedding [CAPTION_ROWS, embed_dim] (umT5 outputs' layout)."""
  rng = np.random.default_rng(seed)
  writer = shards.ShardWriter(shards.prepare_output(directory, overwrite=False), 1)
  try:
    for i in range(count):
      clip = rng.standard_normal((*shape, channels)).astype(np.float16)  # [T, H, W, C]
      embedding = rng.standard_normal((CAPTION_ROWS, embed_dim)).astype(np.float16)  # [L, E]
      writer.write(0, shards.encode_record(clip, label=0, caption_embedding=embedding))
    entries = writer.finish()
  finally:
    writer.abort()
  shards.write_index(directory, {
      'format': shards.FORMAT, 'shards': entries, 'num_records': count,
      'clip_shape': [*shape, channels], 'dtype': 'float16', 'num_classes': 1})
  return directory


@pytest.fixture(scope='module')
def wan_folder(tmp_path_factory):
  """A tiny Wan 2.1 diffusers folder (FOLDER/transformer, weights in several shards)."""
  folder = str(tmp_path_factory.mktemp('wan'))
  wan_test.make_reference(folder, wan_test.T2V)
  return folder


@pytest.fixture(scope='module')
def latents(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('data') / 'wan_latents')
  return write_latent_shards(directory, CLIP_SHAPE, wan_test.T2V['out_channels'],
                             wan_test.T2V['text_dim'])


def tiny_wan_config(folder, data_path, variant='t2v_1_3b', **train):
  """configs/wan.py:VARIANT shrunk to the tiny Wan in `folder` (its config.json's model),
  fp32 without remat, batch 2 of CLIP_SHAPE latents, a short run, a small final sample."""
  config = wan_configs.get_config(variant)
  wan.apply_overrides(config.model, wan.read_config(folder))
  config.model.dtype = 'float32'
  config.model.remat_policy = 'none'
  config.model.caption_dropout = 0.0  # every clip keeps its caption (the LoRA check)
  config.data.update(dict(path=data_path, latents=False, channels=wan_test.T2V['out_channels'],
                          num_frames=CLIP_SHAPE[0], height=CLIP_SHAPE[1],
                          width=CLIP_SHAPE[2]))
  config.train.update(dict(num_steps=2, batch_size=2, warmup_steps=1, log_every=1,
                           learning_rate=1e-3))
  config.train.update(train)
  config.checkpoint.async_save = False
  config.sample.update(dict(every_steps=0, num_steps=2, num_samples=1))
  if config.lora.rank:
    config.lora.rank = RANK  # the variant's 32 exceeds the tiny model's width
    config.lora.base_checkpoint = folder
  return config


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def wan_weights(folder, s):
  """The Wan folder's params on the host, as model/wan.py maps them onto `s`'s model."""
  return wan.load_params(folder, s.model.spec, s.abstract_state.params if s.lora is None
                         else s.lora.base_abstract)


def assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, host(got), host(want))


def differs(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(host(a)),
                                                      jax.tree.leaves(host(b))))


def losses(workdir):
  records = metrics_lib.read_metrics(paths.join(workdir, metrics_lib.METRICS_FILENAME))
  return {r['step']: r['loss'] for r in records}


def test_full_finetuning_starts_from_init_from_and_resumes_from_its_checkpoint(
    wan_folder, latents, tmp_path, monkeypatch, capsys):
  # 3 steps, the first run stopped after 2 (as a preemption): the rerun's step is the
  # same program, loaded from the compilation cache.
  config = tiny_wan_config(wan_folder, latents, init_from=wan_folder, num_steps=3)
  workdir = str(tmp_path / 'run')
  s = loop.build(config, workdir)
  try:
    state, latest = loop.restore_or_init(s)  # step 0: the state the first step updates
  finally:
    s.checkpointer.close()
  assert latest is None and int(state.step) == 0
  want = wan_weights(wan_folder, s)
  assert_trees_equal(state.params, want)
  assert_trees_equal(state.ema_params, want)
  assert state_lib.param_count(state.params) == state_lib.param_count(want) > 0
  assert 'train.init_from:' in capsys.readouterr().out
  del state

  final = loop.train_and_evaluate(config, workdir, stop_at=2)
  assert int(final.step) == 2
  assert all(np.isfinite(loss) for loss in losses(workdir).values())
  assert differs(final.params, want)
  assert os.path.isfile(os.path.join(workdir, loop.SAMPLES_DIRNAME,
                                     'step_0000002_latents.npy'))  # no VAE: latents

  # A rerun resumes from the workdir's checkpoint; the folder is not read again.
  def no_reading(*args, **kwargs):
    raise AssertionError('init_from was read although the workdir has a checkpoint')
  monkeypatch.setattr(wan, 'load_params', no_reading)
  capsys.readouterr()
  resumed = loop.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert 'ignored: resuming from the checkpoints' in out
  assert 'resumed from step 2' in out
  assert int(resumed.step) == 3 and sorted(losses(workdir)) == [1, 2, 3]


def test_lora_on_a_wan_folder_trains_adapters_and_reads_the_captions(
    wan_folder, latents, tmp_path):
  config = tiny_wan_config(wan_folder, latents, 't2v_1_3b,lora')
  workdir = str(tmp_path / 'lora')
  s = loop.build(config, workdir)
  try:
    assert s.lora.source.kind == 'wan'
    transformer = lora_lib.resolve_base(os.path.join(wan_folder, 'transformer'))
    assert transformer.kind == 'wan'  # the transformer folder itself is one too
    assert_trees_equal(s.lora.base_params(), wan_weights(wan_folder, s))
    state, _ = loop.restore_or_init(s)
    initial = host(state.params)

    # The train step feeds the batch's captions to the merged model: another caption
    # embedding, the same clips, noise and times, gives another loss.
    rng = np.random.default_rng(1)
    length, dim = config.model.text.max_length, config.model.text.embed_dim
    mask = np.zeros((2, length), bool)
    mask[:, :CAPTION_ROWS] = True
    batch = {'video': rng.standard_normal((2, *CLIP_SHAPE, 4)).astype(np.float32),
             'label': np.zeros((2,), np.int32), 'text_mask': mask}
    step = loop.jit_train_step(s)
    step_losses = []
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      for seed in (2, 3):
        embed = np.zeros((2, length, dim), np.float32)  # [B, L, E]
        embed[:, :CAPTION_ROWS] = np.random.default_rng(seed).standard_normal(
            (2, CAPTION_ROWS, dim))
        fresh = jax.tree.map(jnp.copy, state)  # the step donates its state
        _, metrics = step(fresh, loop.global_batch(dict(batch, text_embed=embed), s.mesh,
                                                   s.rules), jax.random.key(0))
        step_losses.append(float(metrics['loss']))
    assert np.all(np.isfinite(step_losses))
    assert abs(step_losses[0] - step_losses[1]) > 1e-4 * abs(step_losses[0]), step_losses
  finally:
    s.checkpointer.close()

  final = loop.train_and_evaluate(config, workdir)
  assert int(final.step) == 2
  assert all(np.isfinite(loss) for loss in losses(workdir).values())
  assert jax.tree.structure(final.params) == jax.tree.structure(initial)
  assert differs(final.params, initial)  # the adapters trained


def _folder_with(folder, target, **changes):
  """A copy of the Wan folder whose transformer config.json has `changes`."""
  shutil.copytree(folder, target)
  path = os.path.join(target, 'transformer', 'config.json')
  with open(path) as f:
    hf = json.load(f)
  with open(path, 'w') as f:
    json.dump(dict(hf, **changes), f)
  return str(target)


def test_mismatched_or_missing_folders_stop_before_compiling(wan_folder, latents, tmp_path,
                                                             monkeypatch):
  def no_compiling(*args, **kwargs):
    raise AssertionError('the run compiled before the config check')
  monkeypatch.setattr(state_lib, 'jit_init', no_compiling)
  deeper = _folder_with(wan_folder, tmp_path / 'deeper', num_layers=3)
  config = tiny_wan_config(wan_folder, latents, init_from=deeper)
  with pytest.raises(ValueError, match=r'model\.depth=2 does not match the Wan transformer '
                     r"in config\.train\.init_from=.*deeper.*\(3\)"):
    loop.train_and_evaluate(config, str(tmp_path / 'a'))

  config = tiny_wan_config(wan_folder, latents, init_from=str(tmp_path / 'absent'))
  with pytest.raises(FileNotFoundError, match=r'config\.train\.init_from=.*absent.* is not a '
                     'directory'):
    loop.train_and_evaluate(config, str(tmp_path / 'b'))

  config = tiny_wan_config(wan_folder, latents, init_from=str(tmp_path))
  with pytest.raises(ValueError, match=r'config\.train\.init_from=.*no config\.json found'):
    resolve.resolve(config, devices=jax.devices()[:1])

  config = tiny_wan_config(wan_folder, latents)
  config.data.channels = 16
  config.train.init_from = wan_folder
  with pytest.raises(ValueError, match=r'data\.channels=16 does not match .*out_channels=4'):
    resolve.resolve(config, devices=jax.devices()[:1])

  config = tiny_wan_config(wan_folder, latents, 't2v_1_3b,lora', init_from=wan_folder)
  with pytest.raises(ValueError, match=r'lora\.rank=4: a LoRA run .* set '
                     r'config\.lora\.base_checkpoint='):
    resolve.resolve(config, devices=jax.devices()[:1])

  config = tiny_wan_config(wan_folder, latents, 't2v_1_3b,lora')
  config.lora.base_checkpoint = deeper
  with pytest.raises(ValueError, match=r'model\.depth=2 does not match the Wan transformer in '
                     r'config\.lora\.base_checkpoint='):
    loop.train_and_evaluate(config, str(tmp_path / 'c'))


def test_fsdp8_finetuning_matches_one_device(multidevice, wan_folder, latents):
  """init_from on 8 fake CPU devices, fsdp=8 (tests/multidevice/wan_finetune.py): the
  params are read into their fsdp shardings, equal one device's, as the first step's loss."""
  results = multidevice.run('multidevice/wan_finetune.py', (wan_folder, latents))
  for check in FSDP_CHECKS:
    multidevice.assert_ok(results, FSDP_CHECKS, check)
