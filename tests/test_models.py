"""Twin BatchNorm semantics, PyTorch's nearest resize, and the read-only frozen statistics."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flax_torch
from twins_jax import models


@pytest.fixture(scope='module')
def tiny():
  model = models.create_model('tiny_resnet', 10)
  variables = flax_torch.randomize_bn(models.init_variables(model, 0), seed=3)
  x = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
  return model, variables, x


@pytest.mark.parametrize('size_in,size_out', [(32, 224), (16, 24), (32, 100), (10, 7)])
def test_nearest_resize_equals_torch(size_in, size_out):
  x = np.random.default_rng(0).uniform(0, 1, (2, size_in, size_in, 3)).astype(np.float32)
  ours = np.asarray(models.nearest_resize(jnp.asarray(x), size_out))
  theirs = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(size_out, size_out),
                         mode='nearest').numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(ours, theirs)


def test_modes_differ_and_only_train_updates(tiny):
  model, variables, x = tiny
  outs = {m: model.apply(variables, x, mode=m, mutable=['batch_stats']) for m in models.MODES}
  for m in (models.FROZEN, models.BATCH, models.EVAL):
    for a, b in zip(jax.tree.leaves(outs[m][1]), jax.tree.leaves(variables['batch_stats'])):
      np.testing.assert_array_equal(a, b)
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), outs[models.TRAIN][1]['batch_stats'],
                       variables['batch_stats'])
  assert all(jax.tree.leaves(moved))
  logits = {m: np.asarray(o[0]) for m, o in outs.items()}
  np.testing.assert_allclose(logits[models.TRAIN], logits[models.BATCH], rtol=1e-6)
  assert not np.allclose(logits[models.FROZEN], logits[models.EVAL])
  assert not np.allclose(logits[models.BATCH], logits[models.EVAL])


def test_running_variance_is_unbiased(tiny):
  model, variables, x = tiny
  _, updates = model.apply(variables, x, mode=models.TRAIN, mutable=['batch_stats'])

  # bn1 sees the stem convolution's output: recompute its batch statistics by hand.
  def conv_out(mdl, x):
    h = (models.nearest_resize(x, 32) - jnp.asarray(models.IMAGENET_MEAN)) / jnp.asarray(
        models.IMAGENET_STD)
    return models.torch_conv(8, 7, 2, name='conv1')(h)

  feats = np.asarray(nn_apply(conv_out, variables, x), np.float64)
  n = feats.size // feats.shape[-1]
  mean, var = feats.mean((0, 1, 2)), feats.var((0, 1, 2)) * n / (n - 1)
  old = variables['batch_stats']['bn1']
  new = updates['batch_stats']['bn1']
  np.testing.assert_allclose(new['mean'], 0.9 * old['mean'] + 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new['var'], 0.9 * old['var'] + 0.1 * var, rtol=1e-5, atol=1e-6)


def nn_apply(fn, variables, x):
  import flax.linen as nn

  class Stem(nn.Module):

    @nn.compact
    def __call__(self, x):
      return fn(self, x)

  return Stem().apply({'params': {'conv1': variables['params']['conv1']}}, x)


def test_writing_frozen_statistics_fails(tiny):
  """No training code can write the frozen collection: Flax refuses the write."""
  model, variables, x = tiny

  def overwrite(module, x):
    module(x, mode=models.TRAIN)  # an ordinary training forward first
    zeros = jax.tree.map(jnp.zeros_like, variables['frozen_stats']['bn1'])
    module.put_variable('frozen_stats', 'bn1', zeros)  # then an attempted write

  with pytest.raises(flax.errors.ModifyScopeVariableError, match='frozen_stats'):
    model.apply(variables, x, method=overwrite, mutable=['batch_stats'])


def test_frozen_stats_never_returned_as_update(tiny):
  model, variables, x = tiny
  _, updates = model.apply(variables, x, mode=models.FROZEN, mutable=['batch_stats'])
  assert set(updates) == {'batch_stats'}


def test_share_affine_and_plain_models():
  shared = models.create_model('tiny_resnet', 10, share_affine=True)
  v = models.init_variables(shared, 0)
  assert set(v['params']['bn1']) == {'scale', 'bias'} and 'frozen_stats' in v
  plain = models.create_model('tiny_resnet', 10, twin=False)
  v = models.init_variables(plain, 0)
  assert 'frozen_stats' not in v
  with pytest.raises(ValueError, match='twin'):
    plain.apply(v, jnp.zeros((1, 32, 32, 3)), mode=models.FROZEN)


def test_bad_inputs():
  with pytest.raises(ValueError, match='Unknown architecture'):
    models.create_model('resnet7', 10)
  model = models.create_model('tiny_resnet', 10)
  v = models.init_variables(model, 0)
  with pytest.raises(ValueError, match='mode'):
    model.apply(v, jnp.zeros((1, 32, 32, 3)), mode='training')
  with pytest.raises(ValueError, match='NHWC'):
    model.apply(v, jnp.zeros((1, 3, 32, 32)), mode=models.EVAL)
