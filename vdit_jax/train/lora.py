"""LoRA fine-tuning: a frozen base model and trained rank-r adapters (model/lora.py).

With config.lora.rank > 0, `loop.build` gives the run a train state whose params,
opt_state and ema_params are the adapters alone, so everything the trainer does to a
state applies to the adapters only:
  - WORKDIR/checkpoints/<step> holds adapters + their Adam moments + their EMA + the data
    position (a few % of a full checkpoint); a rerun resumes from it as any run does;
  - `--mode=export` writes the (EMA) adapters alone, with the config, to WORKDIR/export/<step>;
  - samples (end of training, `--mode=sample`) use merge(base, adapters): W + (alpha/r) A B.

The base params come from config.lora.base_checkpoint, read once onto the mesh with the
model's shardings:
  - an export directory (WORKDIR/export/<step>): the params it holds (EMA by default);
  - a workdir: the EMA params of its newest train checkpoint (the weights its samples
    use), else its newest export;
  - a Wan 2.1 diffusers folder (with transformer/config.json of a WanTransformer3DModel),
    or that transformer folder: its weights through model/wan.py, each process reading
    only its devices' slices; its config.json must describe the config's model.
They enter the jitted step as an input that is neither donated nor differentiated (the
step's `param_transform` merges them with the adapters inside the loss) and are never
written again.
"""

import dataclasses
import json
import os
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from vdit_jax.config import resolve
from vdit_jax.model import spec as spec_lib

from vdit_jax.model import lora
from vdit_jax.model import wan
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import paths
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.generate import export as export_lib
from vdit_jax.train import metrics as metrics_lib
from vdit_jax.train import state as state_lib

# Model fields a base and its LoRA run must share (the params' shapes and meaning).
_SHARED_MODEL_FIELDS = ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size', 'pos_embed',
                        'qk_norm', 'scan_layers', 'param_dtype')


def enabled(config) -> bool:
  return config.lora.rank > 0


@dataclasses.dataclass(frozen=True)
class BaseSource:
  """Where the base params are: an export directory, a train checkpoint step, or a Wan
  2.1 diffusers folder."""
  kind: str                  # 'export' | 'checkpoint' | 'wan'
  path: str                  # the export directory, the checkpoint step's directory, or
                             # the Wan folder as given
  step: int                  # 0 for a Wan folder
  config_path: Optional[str]  # the base run's config.json (Wan: the transformer's)


def _latest_checkpoint(workdir: str) -> Optional[Tuple[str, int]]:
  directory = paths.join(workdir, 'checkpoints')
  if not paths.isdir(directory):
    return None
  steps = ocp.utils.checkpoint_steps(directory)  # finalised steps only
  if not steps:
    return None
  return paths.join(directory, str(max(steps))), int(max(steps))


def _export_source(directory: str) -> BaseSource:
  info = json.loads(paths.read_text(paths.join(directory, export_lib.INFO_FILENAME)))
  step = int(info['step'])
  config_path = paths.join(directory, export_lib.CONFIG_FILENAME)
  return BaseSource('export', directory, step,
                    config_path if paths.isfile(config_path) else None)


def _wan_config_path(path: str) -> Optional[str]:
  """The transformer config.json of a Wan 2.1 diffusers folder (path/transformer) or of
  the transformer folder itself, when its _class_name says WanTransformer3DModel; else
  None (a workdir's config.json is a run config, without that name)."""
  for folder in (paths.join(path, 'transformer'), path):
    config_path = paths.join(folder, 'config.json')
    if not paths.isfile(config_path):
      continue
    try:
      saved = json.loads(paths.read_text(config_path))
    except ValueError:
      continue
    if isinstance(saved, dict) and saved.get('_class_name') == wan.TRANSFORMER_CLASS:
      return config_path
  return None


def resolve_base(path: str) -> BaseSource:
  """The base params' source for config.lora.base_checkpoint=path (see the module doc)."""
  path = paths.normalize(path)
  if not paths.isdir(path):
    raise FileNotFoundError(f'config.lora.base_checkpoint={path!r} is not a directory: give '
                            'the workdir or the export directory of a trained model, or a '
                            'Wan 2.1 diffusers folder.')
  wan_config = _wan_config_path(path)
  if wan_config is not None:
    if not os.path.isdir(path):
      raise ValueError(f'config.lora.base_checkpoint={path!r}: Wan 2.1 weights are read from '
                       'a local folder; copy the folder to the host (or a mounted disk).')
    return BaseSource('wan', path, 0, wan_config)
  if export_lib.is_complete(path):
    return _export_source(path)
  latest = _latest_checkpoint(path)
  if latest is not None:
    config_path = paths.join(path, export_lib.CONFIG_FILENAME)
    return BaseSource('checkpoint', latest[0], latest[1],
                      config_path if paths.isfile(config_path) else None)
  export = export_lib.latest(path)
  if export is not None:
    return _export_source(export)
  raise FileNotFoundError(
      f'config.lora.base_checkpoint={path!r} holds no complete export '
      f'({export_lib.INFO_FILENAME}), no checkpoint under checkpoints/, no export under '
      f'{export_lib.EXPORT_DIRNAME}/ and no Wan transformer (transformer/config.json of a '
      f'{wan.TRANSFORMER_CLASS}): train the base model first.')


def check_base_config(source: BaseSource, config) -> None:
  """Raises ValueError when the base run's config.json describes another model, or a LoRA
  run (whose checkpoints and exports hold adapters only); for a Wan folder, when its
  transformer config.json is not the config's model (wan.check_spec_matches names the
  field)."""
  if source.kind == 'wan':
    where = f'config.lora.base_checkpoint={source.path!r}'
    try:
      hf = wan.read_config(source.path)
    except ValueError as e:
      raise ValueError(f'{where}: {e}') from None
    wan.check_spec_matches(spec_lib.from_config(config.model), hf, config.data.channels, where)
    return
  if source.config_path is None:
    return
  saved = json.loads(paths.read_text(source.config_path))
  base = resolve.complete(saved, strict=False)
  if base.lora.rank > 0:
    raise ValueError(
        f'config.lora.base_checkpoint: {source.config_path} is the config of a LoRA run '
        f'(lora.rank={base.lora.rank}), whose checkpoints and exports hold adapters '
        "only; fine-tune from that run's base, "
        f'{base.lora.base_checkpoint!r}, instead.')
  diffs = resolve.model_differences(saved.get('model', {}), config, label='base',
                                    fields=_SHARED_MODEL_FIELDS)
  base_channels = saved.get('data', {}).get('channels', config.data.channels)
  if base_channels != config.data.channels:
    diffs.append(f'data.channels: base {base_channels}, this config {config.data.channels}')
  if diffs:
    raise ValueError(
        f'config.lora.base_checkpoint: the base model ({source.config_path}) differs from '
        f'this config\'s model in {"; ".join(diffs)}. LoRA adapts the base as it is: set '
        'the model section to the base\'s.')


def _restore_ema_params(step_dir: str, abstract):
  """The `ema_params` of a train checkpoint step's `state` item, and nothing else."""
  item = {'ema_params': abstract}
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    restored = checkpointer.restore(
        paths.join(step_dir, 'state'),
        args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True))
  finally:
    checkpointer.close()
  changed = ckpt_lib.changed_leaves(step_dir, {'ema_params': restored['ema_params']})
  if changed:
    raise ValueError(f'config.lora.base_checkpoint: {step_dir} reads back other bytes than it '
                     f'saved (its fingerprint) in {", ".join(changed[:4])}: the checkpoint is '
                     'damaged; use another step of the base run.')
  return restored['ema_params']


def load_base(source: BaseSource, abstract, spec: Optional[spec_lib.ModelSpec] = None
              ) -> Tuple[Any, str]:
  """(base params restored into `abstract`'s shapes and shardings, what they are); a Wan
  folder's are mapped onto the model of `spec` (needed then)."""
  if source.kind == 'wan':
    if spec is None:
      raise ValueError(f'load_base: the Wan folder {source.path} needs the model spec to '
                       'map its weights onto.')
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    params = wan.load_params(source.path, spec, abstract, shardings)
    return params, f'the Wan transformer in {source.path}'
  if source.kind == 'export':
    params, info = export_lib.read(source.path, abstract)
    return params, f'{info["params"]} of step {source.step} exported in {source.path}'
  try:
    params = _restore_ema_params(source.path, abstract)
  except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore raise many kinds
    raise ValueError(
        f'could not restore the EMA params of checkpoint {source.path} as the base of LoRA '
        f'({type(e).__name__}: {str(e).strip()[:400]}). The config\'s model must be the '
        'base run\'s.') from e
  return params, f'EMA params of checkpoint step {source.step} in {source.path}'


class BoundStep:
  """train_step(state, batch, rng) (and .lower) of a jitted step(state, base, batch, rng)
  with the frozen base bound: the trainer calls it like the full-model step."""

  def __init__(self, jitted, base):
    self.jitted = jitted
    self.base = base

  def __call__(self, state, batch, rng):
    return self.jitted(state, self.base, batch, rng)

  def lower(self, state, batch, rng):
    return self.jitted.lower(state, self.base, batch, rng)


@dataclasses.dataclass
class LoraSetup:
  """The LoRA part of `loop.Setup`: adapter init, the frozen base and its shardings."""
  rank: int
  alpha: float
  targets: Tuple[str, ...]
  source: BaseSource          # where the base params are, resolved when built
  mesh: Any
  rules: Any
  base_abstract: Any          # unboxed ShapeDtypeStructs of the model params
  base_shardings: Any
  init_fn: Callable[[jax.Array], state_lib.TrainState]
  num_adapter_params: int
  spec: Optional[spec_lib.ModelSpec] = None  # the model's (maps a Wan folder's weights)
  _base: Any = None
  _merge_fn: Any = None

  def base_params(self):
    """The base params on the mesh, read on first use."""
    if self._base is None:
      abstract = state_lib.abstract_with_shardings(self.base_abstract, self.base_shardings)
      self._base, what = load_base(self.source, abstract, self.spec)
      total = state_lib.param_count(self.base_abstract)
      metrics_lib.log_line(
          f'LoRA rank {self.rank} (alpha {self.alpha:g}) on {",".join(self.targets)}: '
          f'{self.num_adapter_params:,} trainable params = '
          f'{100.0 * self.num_adapter_params / total:.2f}% of the {total:,} frozen base '
          f'params; base: {what}')
    return self._base

  def merged(self, adapters):
    """merge(base, adapters) on the mesh, in the base's shardings."""
    if self._merge_fn is None:
      self._merge_fn = jax.jit(lambda base, a: lora.merge(base, a, self.alpha, self.rank),
                               out_shardings=self.base_shardings)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._merge_fn(self.base_params(), adapters)

  def jit_train_step(self, make_step, state_shardings, batch_shardings) -> BoundStep:
    """The adapters-only step, jitted like the full-model one (state donated) with the
    base as a second, sharded input. `make_step(param_transform)` is `loop`'s builder of
    the step (step.make_train_step with the config's settings)."""

    def train_step(state, base, batch, rng):
      base = jax.lax.stop_gradient(base)
      merge = lambda adapters: lora.merge(base, adapters, self.alpha, self.rank)
      return make_step(merge)(state, batch, rng)

    replicated = mesh_lib.replicated(self.mesh)
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, self.base_shardings, batch_shardings, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0)
    return BoundStep(jitted, self.base_params())


def make_setup(model, tx, config, mesh, rules, *, abstract_source=None) -> LoraSetup:
  """Checks the base checkpoint's location and model (reads no params) and builds the
  adapters' init: rng -> TrainState of boxed adapters (logical names for shardings).

  `abstract_source` (tools.plan): a BaseSource that is not resolved or read; the base
  params are then their ShapeDtypeStructs in the model's shardings, bound as they are."""
  lora_cfg = config.lora
  source = abstract_source
  if source is None:
    source = resolve_base(lora_cfg.base_checkpoint)
    check_base_config(source, config)
  boxed = jax.eval_shape(state_lib.make_init_fn(model, tx, config.data),
                         jax.random.key(0)).params
  targets = lora.parse_targets(lora_cfg.targets)
  rank = int(lora_cfg.rank)
  specs = lora.adapter_specs(boxed, targets, rank)
  dtype = spec_lib.DTYPES[model.spec.param_dtype]

  def init(rng):
    adapters = lora.init_adapters(rng, boxed, targets, rank, dtype)
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=adapters,
                                opt_state=tx.init(adapters), ema_params=adapters)

  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  base = nn.unbox(boxed)
  return LoraSetup(rank=rank, alpha=float(lora_cfg.alpha), targets=targets,
                   source=source, mesh=mesh, rules=rules,
                   base_abstract=base, base_shardings=shardings, init_fn=init,
                   num_adapter_params=lora.num_adapter_params(specs), spec=model.spec,
                   _base=(None if abstract_source is None
                          else state_lib.abstract_with_shardings(base, shardings)))
