"""``best_model`` is replaced atomically, and a save killed between its renames is recovered."""

import os

import jax
import numpy as np

from twins_jax import checkpointing, model_io, models

SPEC = models.ModelSpec(arch='tiny_resnet', num_classes=3, resize=None, twin=True,
                        share_affine=False)


def _variables(seed):
  return models.init_variables(SPEC.build(), seed)


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_best_model_replaced_and_recovered_after_a_kill_between_renames(tmp_path):
  first, second = _variables(0), _variables(1)
  checkpointing.save_best_model(tmp_path, first, SPEC, {'step': 1})
  checkpointing.save_best_model(tmp_path, second, SPEC, {'step': 2})
  assert sorted(os.listdir(tmp_path)) == ['best_model']
  _, loaded, meta = model_io.load_model_dir(tmp_path / 'best_model')
  _assert_equal(loaded, second)
  assert checkpointing.recover_best_model(tmp_path) is None  # nothing to recover

  # A kill after "best_model -> best_model.old" and before "tmp -> best_model".
  os.replace(tmp_path / 'best_model', tmp_path / 'best_model.old')
  recovered = checkpointing.recover_best_model(tmp_path)
  assert recovered == tmp_path / 'best_model'
  assert sorted(os.listdir(tmp_path)) == ['best_model']
  _, loaded, _ = model_io.load_model_dir(recovered)
  _assert_equal(loaded, second)

  # The next save works from the recovered state.
  checkpointing.save_best_model(tmp_path, first, SPEC, {'step': 3})
  _, loaded, _ = model_io.load_model_dir(tmp_path / 'best_model')
  _assert_equal(loaded, first)


def test_recover_leaves_an_existing_best_model_alone(tmp_path):
  checkpointing.save_best_model(tmp_path, _variables(0), SPEC, {'step': 1})
  (tmp_path / 'best_model.old').mkdir()
  assert checkpointing.recover_best_model(tmp_path) is None
  assert (tmp_path / 'best_model').is_dir()
  assert checkpointing.recover_best_model(tmp_path / 'missing') is None
