"""vdit_jax/eval/posthoc_ema.py: EMA profiles rebuilt from kept params."""

import jax.numpy as jnp
import numpy as np
import pytest

from vdit_jax.eval import posthoc_ema
from vdit_jax.train import step as step_lib


@pytest.mark.parametrize('sigma_rel, gamma', [(0.05, 16.97), (0.10, 6.94)])
def test_power_gamma_is_edm2s(sigma_rel, gamma):
  # EDM2 (Karras et al. 2024), sec. 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
  assert posthoc_ema.power_gamma(sigma_rel) == pytest.approx(gamma, abs=0.01)


@pytest.mark.parametrize('decay', [0.9, 0.99, 0.999])
def test_weights_of_every_step_snapshots_are_the_trainers_ema(decay):
  rng = np.random.default_rng(0)
  num_updates = 300
  p = rng.normal(size=num_updates)  # params after update u = 1..300
  e = p[0]  # the recursion starts from the first snapshot (the trainer: from the init)
  for u in range(1, num_updates + 1):
    d = float(step_lib.ema_decay(jnp.asarray(u - 1), decay))
    e = d * e + (1.0 - d) * p[u - 1]
  w = posthoc_ema.snapshot_weights(f'exp:{decay}', list(range(1, num_updates + 1)),
                                   num_updates)
  assert w.sum() == pytest.approx(1.0)
  assert float(w @ p) == pytest.approx(e, rel=1e-6)


def test_coarse_snapshots_take_their_interval_updates_weight():
  fine = posthoc_ema.snapshot_weights('power:0.1', list(range(1, 101)), 100)
  coarse = posthoc_ema.snapshot_weights('power:0.1', [25, 50, 75, 100], 100)
  np.testing.assert_allclose(coarse, [fine[:25].sum(), fine[25:50].sum(), fine[50:75].sum(),
                                      fine[75:].sum()], rtol=1e-9)
  np.testing.assert_array_equal(posthoc_ema.snapshot_weights('raw', [25, 50], 50), [0, 1])


@pytest.mark.parametrize('profile, message', [
    ('ema:0.9', "profile 'ema:0.9': expected raw, exp:DECAY or power:SIGMA_REL"),
    ('power:0.5', r'power:0.5: the relative width must be in \(0, 0.2887\)')])
def test_bad_profile_names_itself(profile, message):
  with pytest.raises(ValueError, match=message):
    posthoc_ema.decays(profile, 10)
