"""The package's import graph: layers whose imports point only down, and no cycle.

Every `import` and `from ... import` of vdit_jax in vdit_jax/ counts, those inside
functions too. A module may import modules of its own layer's package and of lower layers;
a lower layer never imports a higher one. docs/design.md draws the same layers.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / 'vdit_jax'

# Lowest first. A top-level module (vdit_jax/main.py) is its own entry.
LAYERS = (
    ('parallel', 'runtime'),   # logical axes, meshes, distributed set-up, paths, exits
    ('model',),                # the DiT and its spec
    ('diffusion',),            # schedules, objectives, samplers, given frames
    ('data',),                 # sources and the input pipeline
    ('vae',),                  # the video VAE, its checkpoints and latents
    ('convert',),              # pretrained weights (Wan 2.1's VAE, umT5) read into ours
    ('generate',),             # sampling driving loops, extension, multi-stage, export, serving
    ('config',),               # defaults, validation, resolve
    ('train',),                # state, step, loop, checkpoints, metrics, the VAE trainer
    ('modes',),                # a trained workdir's sample / extend / export
    ('tools',),                # command-line tools
    ('eval',),                 # detector and generation / multi-stage evaluation
    ('main',),                 # python -m vdit_jax.main
)
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules():
  return {_module_name(p): p for p in ROOT.rglob('*.py')}


def _imports(name: str, path: pathlib.Path, modules) -> set:
  """The vdit_jax modules `name` imports (a package's name where no module is named)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith('vdit_jax'))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        package = name.split('.')[:len(name.split('.')) - node.level
                                    + (path.name == '__init__.py')]
        base = '.'.join(package + ([base] if base else []))
      if base.startswith('vdit_jax'):
        for alias in node.names:
          full = f'{base}.{alias.name}'
          found.add(full if full in modules else base)
  return {m for m in found if m != name}


def _unit(module: str) -> str:
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else module


def _graph():
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_package_and_top_level_module_has_a_layer():
  units = {_unit(m) for m in _modules() if m != 'vdit_jax'}
  assert units - set(LAYER_OF) == set(), 'add the new package to LAYERS (and docs/design.md)'


def test_imports_point_only_down_the_layers():
  upward = [f'{a} -> {b}' for a, bs in _graph().items() for b in bs
            if a != 'vdit_jax' and b != 'vdit_jax'
            and LAYER_OF[_unit(b)] > LAYER_OF[_unit(a)]]
  assert upward == []


def test_each_layer_imports_no_other_package_of_its_own_layer():
  sideways = [f'{a} -> {b}' for a, bs in _graph().items() for b in bs
              if a != 'vdit_jax' and b != 'vdit_jax' and _unit(a) != _unit(b)
              and LAYER_OF[_unit(b)] == LAYER_OF[_unit(a)]]
  assert sideways == []


def test_no_import_cycle_between_modules():
  graph = _graph()
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = 'open'
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        cycles.append(' -> '.join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 'done'

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert cycles == []


@pytest.mark.parametrize('source, expected', [
    ('from vdit_jax.train import loop\nimport vdit_jax.model.dit\n',
     {'vdit_jax.train.loop', 'vdit_jax.model.dit'}),
    ('def f():\n  from vdit_jax.config import validate\n', {'vdit_jax.config.validate'}),
    ('from . import step\n', {'vdit_jax.train.step'}),
])
def test_the_walk_sees_plain_nested_and_relative_imports(tmp_path, source, expected):
  path = tmp_path / 'probe.py'
  path.write_text(source)
  assert _imports('vdit_jax.train.probe', path, _modules()) == expected


_CONFIG_NAME = re.compile(r'(^|\.)(config|cfg|\w+_cfg|\w+_config)(\.\w+)*$')


def _config_gets(path: pathlib.Path) -> list:
  """`x.get(...)` calls in `path` whose `x` reads as a run config or one of its sections
  (config, cfg, data_cfg, interp_config.model, ...)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == 'get' and _CONFIG_NAME.search(ast.unparse(node.func.value))):
      found.append(f'{path.relative_to(ROOT.parent)}:{node.lineno}: {ast.unparse(node)}')
  return found


def test_no_module_keeps_a_config_default_of_its_own():
  """Every default lives in config/defaults.py; config/resolve.py completes the config
  before any module reads it, so modules read fields, never `config.get(key, default)`."""
  files = [p for p in ROOT.rglob('*.py') if 'config' not in p.relative_to(ROOT).parts[:1]]
  for folder in ('bench', 'experiments'):
    files += sorted((ROOT.parent / folder).glob('*.py'))
  assert [hit for path in files for hit in _config_gets(path)] == []


def test_the_config_get_check_sees_sections_and_aliases():
  path = ROOT.parent / 'tests' / '_probe_config_get.py'
  try:
    path.write_text('a = config.model.get("width", 3)\nb = data_cfg.get("x")\n'
                    'c = manifest.get("fps", 8)\n')
    hits = _config_gets(path)
  finally:
    path.unlink()
  assert [h.split(': ', 1)[1] for h in hits] == ["config.model.get('width', 3)",
                                                  "data_cfg.get('x')"]
