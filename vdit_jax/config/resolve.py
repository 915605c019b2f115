"""A config resolved once, at the entry point: every default filled in from one place.

`complete(config)` lays the user's values (a ConfigDict, or a run's saved config.json as a
dict) over `defaults.base_config()` (or `defaults.vae_base_config()` for a VAE run), so
every key a module reads is present and no module keeps a default of its own; a key the
defaults do not know is refused, naming it. `resolve(config)` completes, validates
(config/validate.py) and locks the config, and builds the model's frozen spec once.
"""

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import ml_collections

from vdit_jax.config import defaults
from vdit_jax.config import validate
from vdit_jax.model import spec as spec_lib

ConfigLike = Union[ml_collections.ConfigDict, Mapping[str, Any]]


def _as_dict(config: ConfigLike) -> dict:
  if isinstance(config, ml_collections.ConfigDict):
    return config.to_dict()
  return {k: _as_dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}


def _overlay(base: ml_collections.ConfigDict, values: Mapping[str, Any], where: str,
             strict: bool) -> None:
  for key, value in values.items():
    path = f'{where}.{key}' if where else key
    if key not in base:
      if not strict:
        continue  # a saved run's config may hold keys this version no longer reads
      raise ValueError(f'config.{path} is not a key vdit_jax knows (config/defaults.py lists '
                       'them all): check its spelling, or remove it.')
    default = base[key]
    if isinstance(default, ml_collections.ConfigDict):
      if value is None:
        continue
      if not isinstance(value, Mapping):
        raise ValueError(f'config.{path}={value!r} must be a section (a dict of fields).')
      _overlay(default, value, path, strict)
      continue
    if isinstance(value, list) and (isinstance(default, tuple) or default is None):
      value = _as_tuple(value)  # JSON has no tuples
    with base.ignore_type():
      base[key] = value


def _as_tuple(value):
  return tuple(_as_tuple(v) if isinstance(v, list) else v for v in value)


def base_for(config: ConfigLike) -> ml_collections.ConfigDict:
  """The defaults `config` completes: the VAE trainer's when it has a vae section."""
  return defaults.vae_base_config() if 'vae' in config else defaults.base_config()


def complete(config: ConfigLike, *, strict: bool = True) -> ml_collections.ConfigDict:
  """A new ConfigDict: `config`'s values over every default (see the module docstring).
  strict=False skips the keys the defaults do not know (a saved run's config.json, written
  by another version) instead of refusing them."""
  full = base_for(config)
  _overlay(full, _as_dict(config), '', strict)
  return full


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A run's complete, validated, locked config and the model's spec built from it."""
  config: ml_collections.ConfigDict
  model: spec_lib.ModelSpec


def resolve(config: ConfigLike, *, devices: Optional[Sequence[Any]] = None,
            process_count: Optional[int] = None) -> Resolved:
  """Completes and validates `config` for `devices` (default: jax.devices()) and
  `process_count` processes, before anything compiles."""
  full = complete(config)
  devices = list(jax.devices() if devices is None else devices)
  spec = validate.validate_config(
      full, len(devices), jax.process_count() if process_count is None else process_count,
      platform=devices[0].platform)
  full.lock()
  return Resolved(full, spec)


def model_differences(saved_model: Mapping[str, Any], config: ConfigLike, *,
                      label: str = 'saved', fields: Optional[Sequence[str]] = None) -> list:
  """'field: <label> X, this config Y' for each ModelSpec field (all, or `fields`) where a
  run's saved model section (its config.json's 'model', a dict) and `config`'s differ."""
  saved = spec_lib.from_config(complete({'model': dict(saved_model)}, strict=False).model)
  now = spec_lib.from_config(complete(config).model)
  names = fields or [f.name for f in dataclasses.fields(spec_lib.ModelSpec)]
  return [f'{k}: {label} {getattr(saved, k)!r}, this config {getattr(now, k)!r}'
          for k in names if getattr(saved, k) != getattr(now, k)]
