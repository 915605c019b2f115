"""Every config rule is checked before anything compiles, with a message naming the value."""

import copy
import importlib
import re

import ml_collections
import pytest

from configs import dit_xl_video, small, tiny
from tests import configs_multidevice
from vdit_jax.config import validate
from vdit_jax.train import loop


def cfg(**overrides):
  """configs/tiny.py on v loss and DDIM (the objective the cases name), then `overrides`."""
  config = tiny.get_config()
  config.diffusion.objective = 'v'
  config.sample.sampler = 'ddim'
  for path, value in overrides.items():
    section, key = path.split('__')
    config[section][key] = value
  return config


@pytest.mark.parametrize('make', [tiny.get_config, small.get_config])
def test_shipped_configs_are_valid(make):
  validate.validate_config(make(), num_devices=1)


def test_pod_config_shapes_are_valid_for_its_mesh():
  config = dit_xl_video.get_config()
  validate.validate_config(config, num_devices=128, process_count=32)


CASES = [
    # patch not dividing T/H/W
    (dict(model__patch_size=(3, 4, 4)), 'T=8 is not a positive multiple of its patch size 3'),
    (dict(data__height=30), 'H=30 is not a positive multiple'),
    (dict(data__width=36, model__patch_size=(2, 4, 8)), 'W=36 is not a positive multiple'),
    # width not divisible by heads
    (dict(model__width=100, model__num_heads=3), 'model.width=100 is not divisible by model.num_heads=3'),
    # unknown names
    (dict(diffusion__objective='x0'), "diffusion.objective='x0' is not one of"),
    (dict(sample__sampler='heun'), "sample.sampler='heun' is not one of"),
    (dict(model__variant='Huge/2'), "model.variant='Huge/2' is not NAME/P"),
    (dict(model__remat_policy='some'), "model.remat_policy='some' is not one of"),
    (dict(model__pos_embed='learned'), "model.pos_embed='learned' is not one of"),
    (dict(model__dtype='float8'), "model.dtype='float8' is not one of"),
    (dict(diffusion__schedule='sqrt'), 'sqrt'),
    (dict(diffusion__loss_weighting='snr'), "loss_weighting='snr' is not known"),
    (dict(diffusion__loss_weighting='x0', diffusion__objective='eps', diffusion__prediction='target'),
     "loss_weighting='x0' needs objective 'v' or 'flow'"),
    (dict(sample__formats='avi'), "sample.formats='avi' must list mp4 and/or gif"),
    (dict(sample__cfg_interval=(0.9, 0.1)),
     r'sample.cfg_interval=\(0.9, 0.1\) must satisfy 0 <= lo < hi <= 1'),
    # sampler / objective mismatch
    (dict(diffusion__objective='flow'), "sample.sampler='ddim' does not sample objective 'flow'"),
    (dict(sample__sampler='euler', diffusion__objective='eps'),
     "sample.sampler='euler' does not sample objective 'eps'"),
    # non-positive sizes
    (dict(data__num_frames=0), 'config.data.num_frames=0 must be positive'),
    (dict(data__height=-32), 'config.data.height=-32 must be positive'),
    (dict(train__batch_size=0), 'config.train.batch_size=0 must be positive'),
    (dict(train__num_steps=0), 'config.train.num_steps=0 must be positive'),
    (dict(model__width=0), 'model.width=0 must be positive'),
    (dict(model__depth=-1), 'model.depth=-1 must be positive'),
    (dict(model__num_heads=0), 'model.num_heads=0 must be positive'),
    (dict(checkpoint__every_steps=0), 'config.checkpoint.every_steps=0 must be positive'),
    (dict(checkpoint__resume='newest'),
     "config.checkpoint.resume='newest' must be 'latest' or 'latest_good'"),
    (dict(train__nonfinite='retry'), "config.train.nonfinite='retry' must be 'skip' or 'stop'"),
    (dict(sample__num_steps=0), 'config.sample.num_steps=0 must be positive'),
    (dict(train__ema_decay=1.0), r'config.train.ema_decay=1.0 must be in \[0, 1\)'),
    (dict(sample__num_steps=2000), 'sample.num_steps=2000 exceeds diffusion.num_timesteps=1000'),
    (dict(diffusion__shift=0.0), 'shift=0.0 must be a finite number > 0'),
    (dict(diffusion__shift=float('inf')), 'config.diffusion.shift=inf must be a finite number'),
    (dict(sample__shift=0.0), 'shift=0.0 must be a finite number > 0'),
    (dict(model__self_condition=True, model__context_frames_max=2),
     'model.self_condition=True is built for class-conditional models only'),
    (dict(sample__shift=4.0), "sample.shift=4.0 re-times only the flow objective's Euler grid"),
    (dict(train__learning_rate=float('nan')),
     'config.train.learning_rate=nan must be a finite number'),
    (dict(train__b1=1.0), r'config.train.b1=1.0 must be in \[0, 1\)'),
    (dict(train__b2=-0.1), r'config.train.b2=-0.1 must be in \[0, 1\)'),
    (dict(train__end_lr_fraction=1.5), r'config.train.end_lr_fraction=1.5 must be in \[0, 1\]'),
    (dict(train__optimizer='sgd'), "config.train.optimizer='sgd' must be 'adamw' or 'muon'"),
    (dict(train__lr_schedule='step'), "train.lr_schedule='step' must be one of ('cosine', 'wsd')"),
    (dict(train__lr_schedule='wsd', train__decay_fraction=0.0),
     r'train.decay_fraction=0.0 must be in \(0, 1\]'),
    (dict(model__mlp_conv=(2, 3, 3)), 'model.mlp_conv=(2, 3, 3) must be () (no convolution) or '
     'three odd positive ints'),
    (dict(model__mlp_conv=(3, 3)), 'model.mlp_conv=(3, 3) must be ()'),
    (dict(model__mlp_conv=(3, -1, 3)), 'model.mlp_conv=(3, -1, 3) must be ()'),
]


def _float_fields(node, path=()):
  """Paths (keys and tuple indices) of every float leaf of a config."""
  if isinstance(node, ml_collections.ConfigDict):
    for key in node.keys():
      yield from _float_fields(node[key], path + (key,))
  elif isinstance(node, (tuple, list)):
    for i, item in enumerate(node):
      yield from _float_fields(item, path + (i,))
  elif isinstance(node, float):
    yield path


def _with_value(config, path, value):
  """A copy of config with the leaf at path (through tuples too) set to value."""
  config = copy.deepcopy(config)
  parent, key = config, path[0]
  depth = 1
  while depth < len(path) and not isinstance(path[depth], int):
    parent, key = parent[key], path[depth]
    depth += 1
  if depth == len(path):
    parent[key] = value
  else:  # a float inside a tuple (e.g. data.shape_size): rebuild the tuple
    items = list(parent[key])
    items[path[depth]] = value
    parent[key] = tuple(items)
  return config


@pytest.mark.parametrize('name', configs_multidevice.CONFIGS)
def test_every_float_field_of_every_shipped_config_refuses_nan_and_inf(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  fields = list(_float_fields(config))
  assert {p[0] for p in fields} >= {"train", "diffusion", "model", "data", "sample"}, fields
  for path in fields:
    shown = '.'.join(str(p) for p in path if not isinstance(p, int)) + ''.join(
        f'[{p}]' for p in path if isinstance(p, int))
    for value in (float('nan'), float('inf'), float('-inf')):
      with pytest.raises(ValueError, match=re.escape(f'config.{shown}={value} must be a '
                                                     'finite number')):
        validate.validate_config(_with_value(config, path, value), num_devices=1)


@pytest.mark.parametrize('overrides,message', CASES,
                         ids=[m[:40] for _, m in CASES])
def test_bad_config_is_rejected_with_message(overrides, message):
  with pytest.raises(ValueError, match=message if '\\' in message else re.escape(message)):
    validate.validate_config(cfg(**overrides), num_devices=1)


def test_batch_not_divisible_by_devices():
  # The default mesh is data=-1: every device takes a share of the batch.
  with pytest.raises(ValueError, match=re.escape(
      "train.batch_size=16 is not divisible by 3, the size of mesh axes ('data', 'fsdp') "
      "(data=3, fsdp=1)")):
    validate.validate_config(cfg(train__batch_size=16), num_devices=3)


def test_batch_not_divisible_by_processes():
  with pytest.raises(ValueError, match='not divisible by the process count 5'):
    validate.validate_config(cfg(train__batch_size=24), num_devices=24, process_count=5)


def test_bad_mesh_is_rejected():
  with pytest.raises(ValueError, match='mesh axes'):
    validate.validate_config(cfg(mesh__fsdp=-1), num_devices=1)
  with pytest.raises(ValueError, match='has 4 devices but 1 are available'):
    validate.validate_config(cfg(mesh__data=2, mesh__tensor=2), num_devices=1)


# tiny: width 128, 4 heads, MLP 512, depth 4, 8x32x32 clips in 2x4x4 tubelets -> 256 tokens.
MESH_CASES = [
    (dict(mesh__data=2, mesh__fsdp=4, train__batch_size=12), 8,
     "train.batch_size=12 is not divisible by 8, the size of mesh axes ('data', 'fsdp') "
     "(data=2, fsdp=4) that shard it through the logical axis 'activation_batch'"),
    (dict(mesh__data=1, mesh__fsdp=3, model__width=96, model__num_heads=4,
          train__batch_size=24, data__channels=1),
     3, None),  # 96 / 3 = 32 per device: valid
    (dict(mesh__data=1, mesh__fsdp=5, model__width=128, train__batch_size=40), 5,
     "model width=128 is not divisible by 5, the size of mesh axes ('fsdp',) (fsdp=5) "
     "that shard it through the logical axis 'embed'"),
    (dict(mesh__data=1, mesh__tensor=8, train__batch_size=8), 8,
     "model num_heads=4 is not divisible by 8, the size of mesh axes ('tensor',) (tensor=8)"),
    (dict(mesh__data=1, mesh__tensor=3, model__num_heads=3, model__width=96,
          model__mlp_dim=256, train__batch_size=3), 3,
     "model mlp_dim=256 is not divisible by 3, the size of mesh axes ('tensor',) (tensor=3)"),
    (dict(mesh__data=1, mesh__sequence=3, train__batch_size=3), 3,
     "tokens per clip 256 (T/pt * H/ph * W/pw) is not divisible by 3, the size of mesh axes "
     "('sequence',) (sequence=3)"),
    # The sampler's batch need not divide the batch axes (it runs whole where they do not).
    (dict(mesh__data=2, mesh__sequence=4, model__sequence_parallel='ring',
          sample__num_samples=3), 8, None),
    (dict(mesh__data=1, mesh__tensor=2, mesh__sequence=4, model__sequence_parallel='ulysses'),
     8, "the heads per device, num_heads=4 / 2 = 2, must be divisible by the "
        "sequence-sharding mesh size 4"),
    (dict(mesh__data=1, mesh__sequence=4, model__sequence_parallel='ulysses'), 4, None),
]


@pytest.mark.parametrize('overrides,num_devices,message', MESH_CASES,
                         ids=[str(m)[:50] for _, _, m in MESH_CASES])
def test_mesh_must_divide_every_dimension_it_shards(overrides, num_devices, message):
  config = cfg(**overrides)
  if message is None:
    validate.validate_config(config, num_devices=num_devices)
  else:
    with pytest.raises(ValueError, match=re.escape(message)):
      validate.validate_config(config, num_devices=num_devices)


def test_rules_naming_unknown_mesh_axes_are_rejected():
  config = cfg()
  config.logical_axis_rules = tuple(config.logical_axis_rules) + (('embed', 'model'),)
  with pytest.raises(ValueError, match=re.escape(
      "logical_axis_rules entry ('embed', 'model') names mesh axes ['model'] that are not "
      "mesh axes ('data', 'fsdp', 'tensor', 'sequence')")):
    validate.validate_config(config, num_devices=1)


def test_train_validates_before_doing_anything(tmp_path):
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match='is not divisible by model.num_heads'):
    loop.train_and_evaluate(cfg(model__width=100, model__num_heads=3), str(workdir))
  assert not (workdir / 'checkpoints').exists()
