"""Wan LoRA adapters in diffusers' format (model/wan_lora.py), both ways, against diffusers
0.42's WanTransformer3DModel with peft: a LoRA made here changes diffusers' output as the
merged adapters change ours, a LoRA made by peft and saved by diffusers reads back to the
same output here, to 1e-5 in fp32; files round-trip bit-identical; bad keys are named."""

import os
import types

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from vdit_jax.model import lora
from vdit_jax.model import wan
from vdit_jax.model import wan_lora

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
peft = pytest.importorskip('peft')

from tests import wan_test  # pylint: disable=g-import-not-at-top  # needs torch

T2V = wan_test.T2V
ATOL = 1e-5
# diffusers' modules of every target the project has for Wan's blocks (peft matches ends).
ALL_MODULES = ['to_q', 'to_k', 'to_v', 'to_out.0', 'ffn.net.0.proj', 'ffn.net.2']


@pytest.fixture(scope='module')
def ref(tmp_path_factory):
  """A tiny Wan transformer saved as diffusers does, the project's model of it (scanned,
  with its params; unrolled, without), inputs, and both models' outputs without LoRA."""
  folder = str(tmp_path_factory.mktemp('wan_lora_ref'))
  reference = wan_test.make_reference(folder, T2V, seed=0)
  x = wan_test.inputs(T2V)
  out = {'folder': folder, 'x': x, 'base_torch': wan_test.reference_forward(reference, x)}
  _, spec, model = wan_test.project_model(folder)
  params = wan.load_params(folder, spec, wan_test.abstract_params(model, x))
  out[True] = (spec, model, params)
  out[False] = wan_test.project_model(folder, scan_layers=False)[1:] + (None,)
  out['base_ours'] = wan_test.project_forward(model, params, x)
  print(f"base: max |ours - diffusers| = "
        f"{np.abs(out['base_ours'] - out['base_torch']).max():.2e}")
  np.testing.assert_allclose(out['base_ours'], out['base_torch'],
                             atol=ATOL * np.abs(out['base_torch']).max(), rtol=0)
  return out


def fresh_reference(folder):
  """diffusers' transformer read back from the folder (fp32), with no adapter."""
  return diffusers.WanTransformer3DModel.from_pretrained(
      os.path.join(folder, 'transformer')).eval()


def random_adapters(params, targets, rank, seed=0):
  """model/lora.py's adapters of `targets`, b drawn at random (init_adapters zeros it)."""
  adapters = lora.init_adapters(jax.random.key(seed), params, lora.parse_targets(targets), rank)
  rng = np.random.default_rng(seed)
  flat = {path: (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32) if path[-1] == 'b'
          else np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(adapters).items()}
  return traverse_util.unflatten_dict(flat)


def merged_forward(ref, adapters, alpha, rank):
  _, model, params = ref[True]
  return wan_test.project_forward(model, lora.merge(params, adapters, alpha, rank),
                                  ref['x'])


def assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_lora_made_here_changes_diffusers_as_ours(ref, tmp_path):
  spec, _, params = ref[True]
  adapters = random_adapters(params, 'attn,mlp', rank=3, seed=1)
  wan_lora.save(str(tmp_path / 'ours.safetensors'), adapters, spec, alpha=5.0, rank=3)

  pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                               transformer=fresh_reference(ref['folder']))
  pipe.load_lora_weights(str(tmp_path), weight_name='ours.safetensors', adapter_name='ours')
  loaded = pipe.transformer.peft_config['ours']
  assert (loaded.r, loaded.lora_alpha) == (3, 5.0)
  want = wan_test.reference_forward(pipe.transformer, ref['x'])
  got = merged_forward(ref, adapters, 5.0, 3)
  change = (got - ref['base_ours']) - (want - ref['base_torch'])
  print(f'made here: max |ours - diffusers| = {np.abs(got - want).max():.2e}, '
        f'max |LoRA - base| = {np.abs(want - ref["base_torch"]).max():.2e}, '
        f'the changes differ by {np.abs(change).max():.2e}')
  np.testing.assert_allclose(got, want, atol=ATOL * np.abs(want).max(), rtol=0)
  assert np.abs(want - ref['base_torch']).max() > 1000 * ATOL  # the LoRA does change it


@pytest.mark.parametrize('kind', ['uniform', 'patterns', 'rslora'])
def test_a_peft_lora_saved_by_diffusers_reads_here(ref, tmp_path, kind):
  spec, _, _ = ref[True]
  extra = {'uniform': {},
           'patterns': dict(rank_pattern={'ffn.net.0.proj': 2, 'blocks.1.attn1.to_v': 3},
                            alpha_pattern={'attn2.to_k': 3.0}),
           'rslora': dict(use_rslora=True)}[kind]
  reference = fresh_reference(ref['folder'])
  torch.manual_seed(2)  # peft draws lora_A from torch's global generator
  reference.add_adapter(peft.LoraConfig(r=4, lora_alpha=6.0, target_modules=ALL_MODULES,
                                        **extra))
  gen = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for name, p in reference.named_parameters():
      if 'lora_B' in name:
        p.copy_(0.05 * torch.randn(p.shape, generator=gen))
  want = wan_test.reference_forward(reference, ref['x'])
  diffusers.WanPipeline.save_lora_weights(
      str(tmp_path), transformer_lora_layers=peft.get_peft_model_state_dict(reference),
      transformer_lora_adapter_metadata=reference.peft_config['default'].to_dict())
  file = str(tmp_path / 'pytorch_lora_weights.safetensors')

  adapters, alpha, rank = wan_lora.load(file, spec)
  got = merged_forward(ref, adapters, alpha, rank)
  print(f'{kind}: max |ours - diffusers| = {np.abs(got - want).max():.2e}, '
        f'max |LoRA - base| = {np.abs(want - ref["base_torch"]).max():.2e}')
  np.testing.assert_allclose(got, want, atol=ATOL * np.abs(want).max(), rtol=0)
  assert np.abs(want - ref['base_torch']).max() > 1000 * ATOL
  assert rank == 4
  if kind == 'uniform':  # the same keys and alpha as diffusers writes, and back unchanged
    assert alpha == 6.0
    stored, metadata = wan_lora.read_file(file)
    ours, our_metadata = wan_lora.to_diffusers(adapters, spec, alpha, rank)
    assert sorted(ours) == sorted(stored)
    assert all(ours[k].shape == stored[k].shape for k in ours)
    jax.tree.map(np.testing.assert_array_equal, ours, stored)
    for key in ('transformer.r', 'transformer.lora_alpha'):
      assert (wan_lora.peft_kwargs_of(our_metadata)[key[12:]]
              == wan_lora.peft_kwargs_of(metadata)[key[12:]])


def test_round_trip_is_identical_and_layouts_agree(ref, tmp_path):
  (spec, _, params), (spec_u, _, _) = ref[True], ref[False]
  adapters = random_adapters(params, 'attn,mlp', rank=2, seed=4)
  state, metadata = wan_lora.to_diffusers(adapters, spec, alpha=7.5, rank=2)
  assert len(state) == T2V['num_layers'] * 10 * 2
  assert state['transformer.blocks.1.attn2.to_out.0.lora_A.weight'].shape == (2, 24)  # [r, in]
  assert state['transformer.blocks.0.ffn.net.0.proj.lora_B.weight'].shape == (40, 2)  # [out, r]
  back, alpha, rank = wan_lora.from_diffusers(state, spec, metadata=metadata)
  assert (alpha, rank) == (7.5, 2)
  assert_trees_equal(back, adapters)

  # Unrolled blocks: the same file, and back to blocks_<i>.
  unrolled, _, _ = wan_lora.from_diffusers(state, spec_u, metadata=metadata)
  assert sorted(unrolled) == ['blocks_0', 'blocks_1']
  state_u, _ = wan_lora.to_diffusers(unrolled, spec_u, alpha=7.5, rank=2)
  jax.tree.map(np.testing.assert_array_equal, state_u, state)
  np.testing.assert_array_equal(unrolled['blocks_1']['cross_attn']['attn']['out_kernel']['b'],
                                adapters['blocks']['cross_attn']['attn']['out_kernel']['b'][1])

  # Through a file, and keys without the `transformer.` prefix.
  path = wan_lora.save(str(tmp_path / 'a.safetensors'), adapters, spec, 7.5, 2)
  assert_trees_equal(wan_lora.load(path, spec)[0], adapters)
  half = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), adapters)  # as bf16 runs keep them
  path = wan_lora.save(str(tmp_path / 'b.safetensors'), half, spec, 7.5, 2)
  assert wan_lora.read_file(path)[0]['transformer.blocks.0.ffn.net.2.lora_B.weight'].dtype == (
      ml_dtypes.bfloat16)
  assert_trees_equal(wan_lora.load(path, spec, dtype=ml_dtypes.bfloat16)[0], half)
  bare = {k[len('transformer.'):]: v for k, v in state.items()}
  assert_trees_equal(wan_lora.from_diffusers(bare, spec, metadata=metadata)[0], adapters)

  # A partial LoRA completed to init_adapters' tree for the run's targets (zeros elsewhere).
  some = {k: v for k, v in state.items() if 'attn1.to_q' in k or 'ffn.net.2' in k}
  assert wan_lora.targets_of(some) == ('query', 'fc2')
  full, _, _ = wan_lora.from_diffusers(some, spec, targets='attn,mlp', metadata=metadata)
  assert jax.tree.structure(full) == jax.tree.structure(adapters)
  np.testing.assert_array_equal(full['blocks']['attn']['query_kernel']['a'],
                                adapters['blocks']['attn']['query_kernel']['a'])
  assert not full['blocks']['cross_attn']['attn']['query_kernel']['b'].any()


def test_original_wan_and_kohya_layouts_read_as_diffusers_converts_them(ref):
  spec, _, params = ref[True]
  adapters = random_adapters(params, 'attn,mlp', rank=2, seed=5)
  state, _ = wan_lora.to_diffusers(adapters, spec, alpha=3.0, rank=2)
  original = {'attn1.to_q': 'self_attn.q', 'attn1.to_k': 'self_attn.k',
              'attn1.to_v': 'self_attn.v', 'attn1.to_out.0': 'self_attn.o',
              'attn2.to_q': 'cross_attn.q', 'attn2.to_k': 'cross_attn.k',
              'attn2.to_v': 'cross_attn.v', 'attn2.to_out.0': 'cross_attn.o',
              'ffn.net.0.proj': 'ffn.0', 'ffn.net.2': 'ffn.2'}
  kohya = {}
  for key, value in state.items():
    module, factor = key[len('transformer.'):].rsplit('.lora_', 1)
    block, name = module.split('.', 2)[1], module.split('.', 2)[2]
    renamed = f'diffusion_model.blocks.{block}.{original[name]}'
    kohya[f'{renamed}.lora_{"down" if factor[0] == "A" else "up"}.weight'] = value
    kohya[f'{renamed}.alpha'] = np.array(3.0, np.float32)
  back, alpha, rank = wan_lora.from_diffusers(kohya, spec)
  assert (alpha, rank) == (3.0, 2)
  assert_trees_equal(back, adapters)
  musubi = {k.replace('diffusion_model.', 'lora_unet_').replace('.', '_', 3)
            .replace('_lora_', '.lora_').replace('_alpha', '.alpha'): v for k, v in kohya.items()}
  assert 'lora_unet_blocks_0_self_attn_q.lora_down.weight' in musubi
  assert_trees_equal(wan_lora.from_diffusers(musubi, spec)[0], adapters)

  # diffusers' own converter (alpha folded into the factors, then scale 1) agrees.
  converted = diffusers.WanPipeline.lora_state_dict(
      {k: torch.from_numpy(np.asarray(v)) for k, v in kohya.items()})
  theirs, alpha_t, rank_t = wan_lora.from_diffusers(
      {k: v.numpy() for k, v in converted.items()}, spec)
  assert (alpha_t, rank_t) == (2.0, 2)  # no metadata: alpha = r
  want = lora.merge(params, adapters, 3.0, 2)
  got = lora.merge(params, theirs, alpha_t, rank_t)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=0), got, want)


def test_bad_keys_and_shapes_are_named(ref):
  spec, _, params = ref[True]
  adapters = random_adapters(params, 'attn,mlp', rank=2, seed=6)
  state, _ = wan_lora.to_diffusers(adapters, spec, alpha=2.0, rank=2)
  q_b = 'transformer.blocks.0.attn1.to_q.lora_B.weight'
  cases = {
      'transformer.condition_embedder.time_proj.lora_A.weight': 'not a LoRA target',
      'transformer.blocks.0.attn2.add_k_proj.lora_A.weight': 'not a LoRA target',
      'transformer.blocks.2.attn1.to_q.lora_A.weight': "past the model's 2 blocks",
      'transformer.blocks.0.attn1.to_q.lora_B.bias': 'not a LoRA factor',
  }
  for key, message in cases.items():
    with pytest.raises(ValueError, match=f'{key}.*{message}'):
      wan_lora.from_diffusers(dict(state, **{key: np.zeros((2, 24), np.float32)}), spec)
  wrong = dict(state, **{q_b: np.zeros((25, 2), np.float32)})
  with pytest.raises(ValueError, match=rf'{q_b}.*\(25, 2\).*\[24, 2\]'):
    wan_lora.from_diffusers(wrong, spec)
  without_b = {k: v for k, v in state.items() if k != q_b}
  with pytest.raises(ValueError, match='attn1.to_q has no lora_B'):
    wan_lora.from_diffusers(without_b, spec)
  with pytest.raises(ValueError, match=r'rank=1 must be an integer >= 2'):
    wan_lora.from_diffusers(state, spec, rank=1)
  with pytest.raises(ValueError, match="adapts a fc1 kernel, not one of the targets"):
    wan_lora.from_diffusers(state, spec, targets='attn')
  with pytest.raises(ValueError, match='use_dora=True'):
    wan_lora.from_diffusers(state, spec, metadata={'transformer.use_dora': True})
  # The other way: the wrong rank, or an adapter outside Wan's modules, names the path.
  with pytest.raises(ValueError, match=r'blocks/attn/key_kernel has factors.*rank 3'):
    wan_lora.to_diffusers(adapters, spec, alpha=2.0, rank=3)
  odd = {'blocks': {'attn_temporal': adapters['blocks']['attn']}}
  with pytest.raises(ValueError, match='blocks/attn_temporal/key_kernel adapts no Wan module'):
    wan_lora.to_diffusers(odd, spec, alpha=2.0, rank=2)


def test_tool_imports_as_an_export_of_a_lora_run_and_exports_it_back(ref, tmp_path,
                                                                     monkeypatch):
  from vdit_jax.config import defaults  # pylint: disable=g-import-not-at-top
  from vdit_jax.generate import export as export_lib  # pylint: disable=g-import-not-at-top
  from vdit_jax.tools import wan_lora as tool  # pylint: disable=g-import-not-at-top
  spec, _, params = ref[True]
  adapters = random_adapters(params, 'query,value,fc1', rank=2, seed=8)
  file = wan_lora.save(str(tmp_path / 'in.safetensors'), adapters, spec, 4.0, 2)
  config = defaults.base_config()
  wan.apply_overrides(config.model, wan.read_config(ref['folder']))
  config.data.channels = T2V['out_channels']
  config.lora.rank, config.lora.alpha, config.lora.targets = 3, 6.0, 'attn,mlp'
  directory = tool.import_adapters(file, config, str(tmp_path / 'run'))
  assert directory == export_lib.export_dir(str(tmp_path / 'run'), 0)
  expected = lora.init_adapters(jax.random.key(0), params, lora.parse_targets('attn,mlp'), 3)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), expected)
  restored, info = export_lib.read(directory, abstract)
  assert info == {'step': 0, 'params': 'ema_params'}
  # rank 2 -> 3 and alpha 4 -> 6 (b folded by (4/2) / (6/3) = 1): the same merged model.
  want = lora.merge(params, adapters, 4.0, 2)
  got = lora.merge(params, restored, 6.0, 3)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=0), got, want)

  # Back out, from the run's workdir and from its export: the restore is modes._restored's
  # (it builds the whole run, which needs the base model and data; stood in for here).
  calls = []

  def fake_restored(config, workdir, checkpoint, step):
    calls.append((workdir, checkpoint, step, config.lora.rank))
    adapters, _ = export_lib.read(checkpoint or export_lib.latest(workdir), abstract)
    setup = types.SimpleNamespace(
        model=types.SimpleNamespace(spec=spec),
        lora=types.SimpleNamespace(alpha=config.lora.alpha, rank=config.lora.rank,
                                   targets=lora.parse_targets(config.lora.targets)))
    return setup, adapters, 0, 'sample_name'

  monkeypatch.setattr(tool.modes, '_restored', fake_restored)
  run = str(tmp_path / 'run')
  for source in (run, directory):
    out = tool.export_adapters(source, str(tmp_path / 'out.safetensors'))
    back, alpha, rank = wan_lora.load(out, spec)
    assert (alpha, rank) == (6.0, 3)
    assert_trees_equal(back, jax.tree.map(np.asarray, restored))
  assert calls == [(run, None, None, 3), (run, directory, None, 3)]
