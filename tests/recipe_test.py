"""configs/tiny.py carries the recipe measured in BUILD_NOTES.md ("Recipe: what buys quality
per unit of compute"); each lever's unit behaviour is tested where it lives (x0 output and
min-SNR in diffusion_test.py, class tokens in model_test.py, their FLOPs in plan_test.py,
the shape fit in detect_test.py). A change to the recipe should be deliberate: re-measure,
then change this test and the notes together."""

from configs import tiny
from configs import tiny_text
from vdit_jax.model import dit

RECIPE = {
    ('data', 'bounce'): False,            # straight paths: the label's direction in every frame
    ('model', 'class_tokens'): 4,         # the label also as cross-attended tokens
    ('diffusion', 'prediction'): 'x0',    # the network outputs the clean clip
    ('diffusion', 'input_scale'): 'signal',  # the noisy input scaled by its signal level
    ('diffusion', 'objective'): 'v',
    ('diffusion', 'shift'): 2.0,
    ('diffusion', 'loss_weighting'): 'none',  # min-SNR-5 measured worse
    ('model', 'mlp_conv'): (3, 3, 3),
    ('train', 'num_steps'): 2400,
    ('train', 'batch_size'): 8,
}


def test_tiny_config_carries_the_measured_recipe():
  config = tiny.get_config()
  got = {key: config[key[0]][key[1]] for key in RECIPE}
  got[('model', 'mlp_conv')] = tuple(got[('model', 'mlp_conv')])
  assert got == RECIPE
  dit.check_spec(dit.resolve_spec(config.model))


def test_previous_recipe_sets_the_new_levers_back():
  config = tiny.previous_recipe(tiny.get_config())
  assert config.data.bounce is True and config.model.class_tokens == 0
  assert config.diffusion.prediction == 'target' and config.diffusion.input_scale == 'none'


def test_text_config_keeps_its_measured_recipe():
  config = tiny_text.get_config()
  assert config.model.conditioning == 'text' and config.model.class_tokens == 0
  assert config.diffusion.prediction == 'target'
  dit.check_spec(dit.resolve_spec(config.model))
