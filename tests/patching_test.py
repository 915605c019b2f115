import jax
import numpy as np
import pytest

from vdit_jax.model import patching

PATCHES = [(1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 2, 8)]


@pytest.mark.parametrize('patch', PATCHES)
def test_patchify_shape(patch):
  video = np.random.default_rng(0).normal(size=(2, 8, 16, 32, 3)).astype(np.float32)
  tokens = patching.patchify(video, patch)
  pt, ph, pw = patch
  assert tokens.shape == (2, (8 // pt) * (16 // ph) * (32 // pw), pt * ph * pw * 3)


@pytest.mark.parametrize('patch', PATCHES)
def test_unpatchify_inverts_patchify(patch):
  video = np.random.default_rng(1).normal(size=(2, 8, 16, 32, 3)).astype(np.float32)
  grid = patching.token_grid(video.shape[1:4], patch)
  back = patching.unpatchify(patching.patchify(video, patch), grid, patch, 3)
  np.testing.assert_array_equal(np.asarray(back), video)


def test_token_order_is_t_h_w():
  # With patch (1, 1, 1) token n is pixel (t, h, w) with n = (t * H + h) * W + w.
  video = np.arange(2 * 3 * 4).reshape(1, 2, 3, 4, 1).astype(np.float32)
  tokens = patching.patchify(video, (1, 1, 1))
  np.testing.assert_array_equal(np.asarray(tokens)[0, :, 0], np.arange(24))


def test_first_token_holds_first_tubelet():
  video = np.random.default_rng(2).normal(size=(1, 4, 4, 4, 2)).astype(np.float32)
  tokens = patching.patchify(video, (2, 2, 2))
  np.testing.assert_array_equal(np.asarray(tokens)[0, 0], video[0, :2, :2, :2, :].ravel())


@pytest.mark.parametrize('shape,patch,name', [
    ((8, 16, 15), (1, 2, 2), 'W=15'),
    ((7, 16, 16), (2, 2, 2), 'T=7'),
    ((8, 10, 16), (1, 4, 4), 'H=10'),
])
def test_indivisible_patch_is_rejected(shape, patch, name):
  with pytest.raises(ValueError, match=name):
    patching.check_patch(shape, patch)


def test_patch_embed_shape_and_param_axes():
  embed = patching.PatchEmbed(width=32, patch=(2, 4, 4))
  video = np.zeros((2, 4, 8, 8, 3), np.float32)
  variables = embed.init(jax.random.key(0), video)
  out = embed.apply(variables, video)
  assert out.shape == (2, 2 * 2 * 2, 32)
  assert variables['params']['proj']['kernel'].names == ('patch', 'embed')
