"""Where configs/mvtec.py follows RD4AD's code (hq-deng/RD4AD): the switches and what
each of them does."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import config_file
from data_fixtures import make_mvtec_tree

from msrd_jax import config as config_lib
from msrd_jax import run_all, teacher, train
from msrd_jax.coord_attention import CoordAttention, mip_channels
from msrd_jax.data import DataError, EvalLoader, list_mvtec, resize_mask
from msrd_jax.decoder import DecoderBlock
from msrd_jax.layers import Layers
from msrd_jax.model import student_from_config

# ------------------------------------------------------------------------- the switches


def test_mvtec_config_follows_rd4ad_and_base_keeps_the_earlier_behaviour():
  base, paper = config_lib.base_config(), config_file('mvtec')
  assert (
    base.model.init,
    base.train.steps_per_epoch,
    base.eval.align_corners,
    base.eval.mask_resize,
  ) == ('kaiming', 'stream', False, 'nearest')
  assert (
    paper.model.init,
    paper.train.steps_per_epoch,
    paper.eval.align_corners,
    paper.eval.mask_resize,
  ) == ('pytorch', 'ceil', True, 'bilinear')
  config_lib.validate(base)
  config_lib.validate(paper)


@pytest.mark.parametrize(
  'field,value',
  [('model.init', 'xavier'), ('train.steps_per_epoch', 'floor'), ('eval.mask_resize', 'area')],
)
def test_new_fields_refuse_unknown_values(field, value):
  config = config_lib.base_config()
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=f'{field}.*{value}'):
    config_lib.validate(config)


def test_attention_in_fusion_needs_msff():
  config = config_lib.base_config()
  config.model.fusion = 'mff'  # coord_attention is still ('fusion', 'decoder')
  with pytest.raises(config_lib.ConfigError, match="'fusion', which needs model.fusion = 'msff'"):
    config_lib.validate(config)
  config.model.coord_attention = ('decoder',)
  config_lib.validate(config)


# --------------------------------------------------------------------------- steps


def test_step_count_follows_rd4ad_with_ceil():
  # MVTec AD's bottle: 209 training images, batch 16, 200 epochs.
  config = config_lib.base_config()
  assert train.total_steps(config, 209) == math.ceil(200 * 209 / 16) == 2613
  config.train.steps_per_epoch = 'ceil'
  assert train.total_steps(config, 209) == 200 * 14 == 2800  # RD4AD: 14 batches per epoch
  config.train.steps = 5
  assert train.total_steps(config, 209) == 5  # an explicit count wins
  config.train.steps, config.train.epochs = None, 3
  assert train.total_steps(config, 32) == 6  # no partial batch: both counts agree


# ---------------------------------------------------------------------------- masks


def test_bilinear_mask_resize_thresholds_like_rd4ad():
  # Halving an 8 x 8 mask: PIL's bilinear filter averages about four input columns per
  # output column, with weights 1/8, 3/8, 3/8, 1/8 inside the image.
  line = np.zeros((8, 8), bool)
  line[:, 3] = True  # one pixel wide: covers 3/8 < 1/2 of output column 1
  assert resize_mask(line, 4, 'nearest')[:, 1].all()  # nearest copies input column 3
  assert not resize_mask(line, 4, 'bilinear').any()  # RD4AD's gt > 0.5 loses it
  band = np.zeros((8, 8), bool)
  band[:, 2:5] = True  # covers 3/8 + 3/8 + 1/8 = 7/8 of output column 1
  assert resize_mask(band, 4, 'bilinear')[:, 1].all()
  assert not resize_mask(band, 4, 'bilinear')[:, [0, 3]].any()
  # Enlarging keeps a block a block, either way.
  block = np.zeros((4, 4), bool)
  block[1:3, 1:3] = True
  for method in ('nearest', 'bilinear'):
    np.testing.assert_array_equal(resize_mask(block, 8, method), np.kron(block, np.ones((2, 2))))
  with pytest.raises(ValueError, match='method'):
    resize_mask(block, 8, 'area')


def test_eval_loader_resizes_masks_as_asked(tmp_path):
  make_mvtec_tree(tmp_path, 'w', n_train=1, n_test_good=1, defects=(('crack', 1),), size=(12, 10))
  samples = list_mvtec(tmp_path, 'w', 'test')
  expected = np.zeros((10, 12), bool)
  expected[2:5, 3:6] = True  # the fixture's box
  for method in ('nearest', 'bilinear'):
    batch = next(iter(EvalLoader(samples, 8, 2, resolution=7, num_threads=1, mask_resize=method)))
    np.testing.assert_array_equal(batch['mask'][0], resize_mask(expected, 7, method))
  with pytest.raises(DataError, match='mask_resize'):
    EvalLoader(samples, 8, 2, mask_resize='area')


def test_images_docstring_no_longer_says_rd4ad_uses_nearest_masks():
  from msrd_jax.data import images

  assert 'nearest neighbour, as RD4AD' not in images.resize_mask.__doc__
  assert 'gt > 0.5' in images.resize_mask.__doc__


# ----------------------------------------------------------------------- initialization


def _block_params(init: str, c_in: int = 128, planes: int = 64):
  block = DecoderBlock('basic', planes, upsample=True, attention=True, layers=Layers(init=init))
  x = jnp.zeros((1, 4, 4, c_in), jnp.float32)
  return jax.tree_util.tree_map(np.asarray, block.init(jax.random.key(1), x)['params'])


def test_pytorch_init_of_transposed_convs_and_coordinate_attention():
  torch = pytest.importorskip('torch')
  c_in, planes = 128, 64
  mip = mip_channels(planes)
  p = _block_params('pytorch', c_in, planes)
  # torch's fan_in of a ConvTranspose2d weight (in, out, k, k) is out * k * k.
  deconv = torch.nn.ConvTranspose2d(c_in, planes, 2, stride=2, bias=False)
  fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(deconv.weight)
  assert fan_in == planes * 4
  cases = [
    (p['conv1']['kernel'], fan_in),  # the block's 2x2/2 transposed conv
    (p['upsample_0']['kernel'], fan_in),  # and its shortcut
    (p['attention']['conv1']['kernel'], planes),  # Conv2d(C, mip, 1): fan_in C
    (p['attention']['conv_h']['kernel'], mip),  # Conv2d(mip, C, 1): fan_in mip
    (p['attention']['conv_w']['kernel'], mip),
    (p['attention']['conv_h']['bias'], mip),
    (p['attention']['conv_w']['bias'], mip),
  ]
  for value, fan in cases:
    bound = 1 / math.sqrt(fan)  # kaiming_uniform_(a=sqrt(5)) and the bias' uniform
    assert np.abs(value).max() <= bound
    if value.size >= 1000:  # uniform(-b, b) has variance b^2 / 3
      assert value.var() == pytest.approx(bound**2 / 3, rel=0.1)
    else:
      assert np.abs(value).max() > 0.5 * bound  # spread over the range, not zeros
  # The same bound as torch's own module draws.
  assert float(deconv.weight.detach().abs().max()) <= 1 / math.sqrt(fan_in)
  assert float(deconv.weight.detach().abs().max()) > 0.9 / math.sqrt(fan_in)


def test_kaiming_init_has_about_six_times_the_variance():
  planes = 64
  kaiming = _block_params('kaiming', 128, planes)
  pytorch = _block_params('pytorch', 128, planes)
  # kaiming normal, fan_out = planes * 4 (Flax's fan_out of the (2, 2, in, out) kernel).
  var = kaiming['upsample_0']['kernel'].var()
  assert var == pytest.approx(2 / (4 * planes), rel=0.1)
  ratio = var / pytorch['upsample_0']['kernel'].var()
  assert ratio == pytest.approx(6.0, rel=0.15)
  # Coordinate attention under 'kaiming' keeps Flax's defaults: zero biases.
  assert not kaiming['attention']['conv_h']['bias'].any()


def test_model_init_reaches_the_layers():
  config = config_file('mvtec')
  assert student_from_config(config).layers.init == 'pytorch'
  assert student_from_config(config_lib.base_config()).layers.init == 'kaiming'
  with pytest.raises(ValueError, match='init'):
    Layers(init='xavier')


def test_attention_module_alone_takes_the_init_of_its_layers():
  x = jnp.ones((1, 4, 4, 64), jnp.float32)
  params = CoordAttention(layers=Layers(init='pytorch')).init(jax.random.key(0), x)['params']
  assert 'bias' not in params['conv1']  # the BatchNorm after it removes a bias
  assert np.abs(np.asarray(params['conv_w']['bias'])).max() > 0


# --------------------------------------------------------------------- random teacher


def test_teacher_seed_pins_the_random_teacher(monkeypatch):
  drawn = []
  monkeypatch.setattr(teacher, 'init_teacher', lambda arch, seed, warn: drawn.append(seed))
  config = config_lib.base_config()
  config.seed = 1
  teacher.from_config(config)  # follows the run's seed
  config.model.teacher_seed = 0
  teacher.from_config(config)
  assert drawn == [1, 0]


# --------------------------------------------------------- the demo config on own data


def test_synthetic_config_reads_a_folder_of_ones_own_data(tmp_path):
  make_mvtec_tree(tmp_path / 'parts', 'widget')
  config = config_lib.base_config()
  config.data.dataset = 'synthetic'
  config.data.root = str(tmp_path / 'parts')
  assert config_lib.resolve_data(config) == ('mvtec', str(tmp_path / 'parts'))
  assert run_all.discover_categories(config) == ['widget']
