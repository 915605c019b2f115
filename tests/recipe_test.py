"""configs/tiny.py carries the recipe measured in BUILD_NOTES.md ("Recipe: what buys quality
per unit of compute"); each lever's unit behaviour is tested where it lives (x0 output and
min-SNR in diffusion_test.py, class tokens in model_test.py, their FLOPs in plan_test.py,
the shape fit in detect_test.py). A change to the recipe should be deliberate: re-measure,
then change this test and the notes together."""

from configs import tiny
from configs import tiny_buckets
from configs import tiny_extend
from configs import tiny_interpolate
from configs import tiny_keyframes
from configs import tiny_text
from vdit_jax.model import spec as spec_lib
from vdit_jax.model import dit

RECIPE = {
    ('data', 'bounce'): False,            # straight paths: the label's direction in every frame
    ('data', 'shape_weights'): (2.0, 1.0, 1.0),  # squares in half the clips: squares 0.90 of
                                          # 384 clips against equal shares' 0.73
    ('model', 'class_tokens'): 4,         # the label also as cross-attended tokens
    ('diffusion', 'prediction'): 'x0',    # the network outputs the clean clip
    ('diffusion', 'input_scale'): 'signal',  # the noisy input scaled by its signal level
    ('diffusion', 'objective'): 'flow',   # rectified flow: the class's shape 0.67 against
    ('diffusion', 't_sampling'): 'logit_normal',  # v's 0.50, one object in every frame
    ('diffusion', 'shift'): 3.0,          # the time shift (SD3's resolution shift): crisp
                                          # clips 0.34 against shift 2's 0.21, 1's 0.02
    ('sample', 'sampler'): 'euler',
    ('diffusion', 'loss_weighting'): 'none',  # min-SNR-5 measured worse
    ('model', 'mlp_conv'): (3, 3, 3),
    ('model', 'refiner_width'): 0,        # the pixel refiner: crisp 0.45 against 0.47 on
                                          # the flow recipe, a third more wall time
    ('train', 'num_steps'): 2400,
    ('train', 'batch_size'): 8,
    ('train', 'lr_schedule'): 'wsd',      # warmup-stable-decay: the class's shape 0.86 of
    ('train', 'decay_fraction'): 0.2,     # 192 clips against cosine's 0.77
    ('train', 'learning_rate'): 2e-3,     # its peak: shape 0.91 of 384 clips against 1e-3's 0.86
    ('sample', 'cfg_scale'): 1.5,         # crisp clips 0.44 of 384 against guidance 2's 0.39
    ('model', 'self_condition'): False,   # at equal FLOPs (2050 steps): shape 0.57
    ('model', 'loss_uncertainty'): True,  # EDM2's learned weighting: crisp clips 0.51 of 384
                                          # against 0.43, squares 0.95 against 0.90
}


def test_tiny_config_carries_the_measured_recipe():
  config = tiny.get_config()
  got = {key: config[key[0]][key[1]] for key in RECIPE}
  got[('model', 'mlp_conv')] = tuple(got[('model', 'mlp_conv')])
  got[('data', 'shape_weights')] = tuple(got[('data', 'shape_weights')])
  assert config.train.optimizer == 'adamw'  # Muon: BUILD_NOTES, third round
  assert got == RECIPE
  spec_lib.check_spec(spec_lib.from_config(config.model))


def test_no_config_chains_a_previous_recipe():
  """The generation configs build on this recipe; a config that needs another states its
  own settings (configs/tiny_latent.py)."""
  for module in (tiny_extend, tiny_keyframes, tiny_interpolate, tiny_buckets):
    config = module.get_config()
    for key in (('data', 'bounce'), ('diffusion', 'prediction'), ('diffusion', 'input_scale'),
                ('model', 'mlp_conv')):
      value = config[key[0]][key[1]]
      assert (tuple(value) if key[1] == 'mlp_conv' else value) == RECIPE[key], (module, key)


def test_configs_measured_with_v_loss_keep_it():
  """Extension, buckets and latents were measured with v loss on the shifted cosine schedule
  and DDIM: they state it, not tiny's rectified flow."""
  from configs import tiny_latent  # pylint: disable=g-import-not-at-top
  for module in (tiny_extend, tiny_buckets, tiny_latent):
    config = module.get_config()
    got = (config.diffusion.objective, config.diffusion.schedule,
           config.diffusion.t_sampling, config.sample.sampler, config.diffusion.shift)
    shift = 1.0 if module is tiny_latent else 2.0  # tiny_latent: the unshifted schedule
    assert got == ('v', 'cosine', 'uniform', 'ddim', shift), (module, got)
    assert config.train.lr_schedule == 'cosine', module  # measured with it (tiny: wsd)
    assert config.train.learning_rate == 1e-3, module    # measured at it (tiny: 2e-3)
    assert config.sample.cfg_scale == 2.0, module      # measured with it (tiny: 1.5)
    if module is not tiny_latent:  # latent shards: the synthetic shares are not read
      assert tuple(config.data.shape_weights) == (), module  # measured with equal shares
    assert config.model.loss_uncertainty is False, module  # measured without it


def test_text_config_trains_tinys_flow_recipe_with_its_measured_settings():
  """tiny_text on tiny's recipe (BUILD_NOTES, seventh round: shape 0.77 over two training
  seeds at guidance 3, against the v recipe's 0.62 at guidance 10), with captions, width 256,
  image-to-video training, 4800 steps at peak 1e-3."""
  config, base = tiny_text.get_config(), tiny.get_config()
  for key in RECIPE:
    if key not in (('model', 'class_tokens'), ('train', 'num_steps'), ('data', 'shape_weights'),
                   ('train', 'learning_rate'), ('sample', 'cfg_scale'),
                   ('model', 'loss_uncertainty')):
      assert config[key[0]][key[1]] == base[key[0]][key[1]], key
  assert config.sample.use_ema is False and config.data.bounce is False
  assert config.model.conditioning == 'text' and config.model.class_tokens == 0
  assert (config.model.width, config.model.context_frames_max) == (256, 1)
  assert (config.train.num_steps, config.train.learning_rate) == (4800, 1e-3)
  assert config.sample.cfg_scale == 3.0  # guidance 10 (the v recipe's): shape 0.42
  assert tuple(config.data.shape_weights) == ()  # measured with equal shares (tiny: 2, 1, 1)
  assert config.model.loss_uncertainty is False  # measured without it
  spec_lib.check_spec(spec_lib.from_config(config.model))


def test_keyframe_config_is_the_text_config_at_a_quarter_of_the_frame_rate():
  """tiny_keyframes trains tiny_text as it is on every 4th frame (BUILD_NOTES, seventh round:
  84 keyframe clips, colour and direction 1.00, shape 0.93 against the v recipe's chance)."""
  config, text = tiny_keyframes.get_config(), tiny_text.get_config()
  assert (config.data.time_stride, config.sample.fps) == (4.0, 2)
  assert tiny_interpolate.get_config().sample.fps == config.sample.fps * 4
  config.data.time_stride, config.sample.fps = text.data.time_stride, text.sample.fps
  assert config.to_dict() == text.to_dict()


def test_interpolation_config_trains_the_text_configs_flow_recipe():
  """tiny_interpolate on tiny_text's (so tiny's) recipe: centroids 0.31 px from the true
  ones between true keyframes against the v recipe's 0.40 (BUILD_NOTES, seventh round)."""
  config, text = tiny_interpolate.get_config(), tiny_text.get_config()
  for section, key in (('diffusion', 'objective'), ('diffusion', 't_sampling'),
                       ('diffusion', 'shift'), ('diffusion', 'prediction'),
                       ('sample', 'sampler'), ('sample', 'use_ema'), ('train', 'lr_schedule'),
                       ('train', 'learning_rate')):
    assert config[section][key] == text[section][key], key
  assert config.diffusion.objective == 'flow'
  assert (config.train.num_steps, config.sample.cfg_scale) == (1200, 1.0)


def test_extension_config_trains_muon_at_the_length_that_fits():
  """tiny_extend: Muon at 2000 steps (velocity error 0.35 against AdamW's 0.52 at 2400;
  its dearer step keeps the time of AdamW's 2400)."""
  config = tiny_extend.get_config()
  assert (config.train.optimizer, config.train.num_steps) == ('muon', 2000)
  assert tiny.get_config().train.optimizer == 'adamw'  # stated here, not inherited
