"""Train state, optimizer, and sharded initialisation."""

import dataclasses
from typing import Any, Callable, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from optax import contrib as optax_contrib
from jax.sharding import Mesh

from vdit_jax.config import defaults



class TrainState(flax.struct.PyTreeNode):
  step: jnp.ndarray          # int32 scalar
  params: Any
  opt_state: Any
  ema_params: Any


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warm-up to the peak, then to end_lr_fraction * peak at num_steps by
  train.lr_schedule: 'cosine' decay, or 'wsd' (warmup-stable-decay: the peak held until
  the last decay_fraction of the steps, then the 1 - sqrt cooldown of Hagele et al. 2024,
  "Scaling Laws and Compute-Optimal Training beyond Fixed Training Durations")."""
  peak = train_cfg.learning_rate
  end = peak * train_cfg.end_lr_fraction
  kind = train_cfg.lr_schedule
  if kind not in defaults.LR_SCHEDULES:  # config/validate.py refuses it before this
    raise ValueError(f'train.lr_schedule={kind!r} must be one of {defaults.LR_SCHEDULES}.')
  warmup, total = train_cfg.warmup_steps, max(train_cfg.num_steps, train_cfg.warmup_steps + 1)
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total,
        end_value=end)
  fraction = train_cfg.decay_fraction
  decay_start = max(warmup, total - int(round(fraction * total)))
  decay_len = max(total - decay_start, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    rise = peak * step / max(warmup, 1)
    progress = jnp.clip((step - decay_start) / decay_len, 0.0, 1.0)
    cooldown = end + (peak - end) * (1.0 - jnp.sqrt(progress))
    return jnp.where(step < warmup, rise, cooldown)

  return schedule


# Transformer-block kernels Muon orthogonalises: leaf name -> (reduction axes, output axes),
# counted from the end so scanned blocks' leading 'layers' axis is a batch axis.
_MUON_AXES = {
    'query_kernel': ((-3,), (-2, -1)),   # [embed, heads, kv]
    'key_kernel': ((-3,), (-2, -1)),
    'value_kernel': ((-3,), (-2, -1)),
    'out_kernel': ((-3, -2), (-1,)),     # [heads, kv, embed]
}
_MUON_DENSE = ('fc1', 'fc2', 'proj')     # MLP and adaLN modulation: [in, out]


def muon_dimension_numbers(params):
  """Muon's reduction / output axes for each block matrix; None (AdamW) for the rest.

  Only the hidden matrices inside the transformer blocks take Muon: the patch
  embedding, the output projection, the timestep and label embeddings, biases, norm
  scales and convolution kernels stay on AdamW, as the Muon papers train them. Works on
  boxed (init) and plain (update) trees alike: it reads only the path and the rank.
  """
  def dims(path, leaf):
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    if not keys or not keys[0].startswith('blocks'):
      return None
    name = keys[-1]
    if name in _MUON_AXES:
      reduction, output = _MUON_AXES[name]
    elif name == 'kernel' and len(keys) >= 2 and keys[-2] in _MUON_DENSE:
      reduction, output = (-2,), (-1,)
    else:
      return None
    if leaf.ndim < len(reduction) + len(output):
      return None
    return optax_contrib.MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)

  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: dims(path, x.value if is_box(x) else x), params, is_leaf=is_box)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """Global-norm clipping (grad_clip=0 turns it off), then AdamW or Muon.

  optimizer='muon': the block matrices (muon_dimension_numbers) take Muon's
  orthogonalised momentum, scaled to AdamW's update RMS (consistent_rms=0.2, as Moonlight
  does) with momentum 0.95, so the same learning_rate and schedule serve both; the rest take AdamW.
  """
  parts = []
  if train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  schedule = learning_rate_schedule(train_cfg)
  name = train_cfg.optimizer
  if name == 'adamw':
    parts.append(optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2,
                             weight_decay=train_cfg.weight_decay))
  elif name == 'muon':
    parts.append(optax_contrib.muon(
        schedule, beta=0.95, weight_decay=train_cfg.weight_decay,
        adam_b1=train_cfg.b1, adam_b2=train_cfg.b2, adam_weight_decay=train_cfg.weight_decay,
        muon_weight_dimension_numbers=muon_dimension_numbers, consistent_rms=0.2))
  else:
    raise ValueError(f'train.optimizer={name!r} is not one of {defaults.OPTIMIZERS}.')
  return optax.chain(*parts)


def model_inputs(data_cfg, batch: int):
  """Dummy (video, t, labels) of the config's shapes, for init and tracing."""
  video = jnp.zeros((batch, data_cfg.num_frames, data_cfg.height, data_cfg.width,
                     data_cfg.channels), jnp.float32)  # [B, T, H, W, C]
  return video, jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32)


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation, data_cfg
                 ) -> Callable[[jax.Array], TrainState]:
  """rng -> TrainState whose param leaves are still boxed with logical names.

  Init traces the model on a batch of 1, which no batch-sharded mesh axis
  divides; sequence-parallel attention (no params of its own) would reject that,
  so init runs the plain attention: the params are the same.
  """
  if getattr(model, 'spec', None) is not None and model.spec.sequence_parallel != 'none':
    model = model.clone(spec=dataclasses.replace(model.spec, sequence_parallel='none'))

  audio = getattr(getattr(model, 'spec', None), 'audio', None)

  def init(rng):
    inputs = model_inputs(data_cfg, 1)
    if audio is not None:  # the audio-video DiT: its audio stream's params too
      mel = jnp.zeros((1, data_cfg.num_frames * audio.mel_frames_per_frame, audio.mel_bins),
                      jnp.float32)  # [1, F, M]
      params = model.init(rng, *inputs, audio=mel, t_audio=inputs[1])['params']
    else:
      params = model.init(rng, *inputs)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), ema_params=params)

  return init


def state_shardings(init_fn, mesh: Mesh, rules):
  """(abstract unboxed state, NamedSharding tree) from the logical annotations."""
  abstract_boxed = jax.eval_shape(init_fn, jax.random.key(0))
  logical = nn.get_partition_spec(abstract_boxed)
  shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
  return nn.unbox(abstract_boxed), shardings


def jit_init(init_fn, shardings):
  """rng -> state born in `shardings`; call (and lower) it inside the mesh and rules."""
  return jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)


def create_state(init_fn, rng, mesh: Mesh, rules) -> Tuple[TrainState, Any]:
  """Initialises the state directly into its shardings: never whole on one device."""
  _, shardings = state_shardings(init_fn, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jit_init(init_fn, shardings)(rng)
  return state, shardings


def _empty_node(x) -> bool:
  """A pytree node with no leaves (optax's MaskedNode in a partitioned optimizer's state)."""
  return x is not None and not isinstance(x, jax.ShapeDtypeStruct) and not jax.tree.leaves(x)


def abstract_with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying target shardings, for restoring onto a mesh.

  Where the state holds an empty node (Muon's masked half of the optimizer state), the
  sharding tree has a leaf; the empty node is kept as it is.
  """
  return jax.tree.map(
      lambda a, s: a if _empty_node(a) else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings, is_leaf=_empty_node)


def param_count(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


