"""Speed levers of BENCHMARKS.md keep the numbers: convolutions as matrix products, BN
folding for the attack, XLA flags.

``speed.matmul_conv`` (what ``conv_impl='auto'`` uses on CPU for 1x1 kernels and small
maps) is the same function as ``lax.conv``: equal values and gradients in float64, and
the same variables (names, shapes, initial values) whatever ``conv_impl``.
Folding the Adaptive Net's eval-mode BN into the convolutions (``speed.fold_eval_bn``,
``mode='folded'``) computes the same function with different rounding: in float64 the
logits, the PGD examples and a whole training step agree to ~1e-12; in float32 the
logits agree to float32 precision.
"""

import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_torch
from twins_jax import attacks, models, speed, xla_flags
from twins_jax import step as step_lib


@functools.lru_cache(maxsize=None)
def _setup(dtype_name: str, twin: bool):
  dtype = np.dtype(dtype_name)
  model = models.create_model('tiny_resnet', 10, twin=twin, dtype=dtype, param_dtype=dtype)
  variables = flax_torch.randomize_bn(models.init_variables(model, 0), seed=5)
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (6, 32, 32, 3)).astype(dtype)
  y = rng.integers(0, 10, 6).astype(np.int32)
  return model, variables, x, y


@pytest.mark.parametrize('twin', [True, False])
def test_folded_logits_equal_eval_float64(twin):
  with jax.enable_x64(True):
    model, variables, x, _ = _setup('float64', twin)
    folded = speed.fold_eval_bn(variables)
    ref = model.apply(variables, x, mode=models.EVAL)
    out = model.apply(folded, x, mode=models.FOLDED)
    assert out.dtype == jnp.float64
    assert flax_torch.rel_err(out, ref) < 1e-12
    # Only the convolution kernels and the Adaptive (or only) BN bias changed.
    changed = jax.tree_util.tree_map_with_path(
        lambda p, a, b: (jax.tree_util.keystr(p), not np.array_equal(a, b)), folded['params'],
        variables['params'])
    for name, moved in jax.tree.leaves(changed, is_leaf=lambda t: isinstance(t, tuple)):
      expect = name.endswith("['kernel']") and 'fc' not in name or (name.endswith("bias']") and
                                                                    'frozen' not in name and
                                                                    'fc' not in name)
      assert moved == expect, name
    for key in ('batch_stats', 'frozen_stats'):
      if key in variables:
        assert folded[key] is variables[key]


def test_folded_logits_equal_eval_float32():
  model, variables, x, _ = _setup('float32', True)
  ref = model.apply(variables, x, mode=models.EVAL)
  out = model.apply(speed.fold_eval_bn(variables), x, mode=models.FOLDED)
  assert flax_torch.rel_err(out, ref) < 1e-5


def test_folded_pgd_examples_equal_float64():
  with jax.enable_x64(True):
    model, variables, x, y = _setup('float64', True)
    kw = dict(eps=8 / 255, alpha=2 / 255, steps=3, start='uniform')
    key = jax.random.key(0)
    plain = step_lib.StepConfig(steps=3).attack_logits_fn(model, variables)
    folded = step_lib.StepConfig(steps=3, fold_bn_attack=True).attack_logits_fn(model, variables)
    x_plain = jax.jit(lambda x, y, k: attacks.pgd(plain, x, y, k, **kw))(x, y, key)
    x_fold = jax.jit(lambda x, y, k: attacks.pgd(folded, x, y, k, **kw))(x, y, key)
    np.testing.assert_array_equal(np.asarray(x_fold), np.asarray(x_plain))
    assert np.max(np.abs(np.asarray(x_plain) - x)) > 0.5 * 8 / 255  # the attack moved


@pytest.mark.slow  # two float64 train-step compiles per method (~35 s)
@pytest.mark.parametrize('method', ['twins_at', 'twins_trades'])
def test_train_step_with_folded_attack_equals_default_float64(method):
  with jax.enable_x64(True):
    model, variables, x, y = _setup('float64', True)
    tx, schedule = step_lib.make_optimizer(0.05, 5e-4)
    batch = {'image': x, 'label': y}
    states = []
    for fold in (False, True):
      config = step_lib.StepConfig(method=method, steps=2, fold_bn_attack=fold)
      train_step = jax.jit(step_lib.make_train_step(model, tx, config, schedule))
      state, metrics = train_step(step_lib.TrainState.create(variables, tx), batch,
                                  jax.random.key(3))
      states.append((state, metrics))
    (a, ma), (b, mb) = states
    assert float(ma['loss']) == pytest.approx(float(mb['loss']), rel=1e-10)
    for u, v in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
      assert flax_torch.rel_err(v, u) < 1e-10


def test_fold_rejects_a_bn_without_its_convolution():
  params = {'block': {'bn1': {'scale': jnp.ones(2), 'bias': jnp.zeros(2)}}}
  stats = {'block': {'bn1': {'mean': jnp.zeros(2), 'var': jnp.ones(2)}}}
  with pytest.raises(ValueError, match='conv1'):
    speed.fold_eval_bn({'params': params, 'batch_stats': stats})


def test_xla_flags_apply_keeps_user_settings(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_a=1 --xla_b=2')
  with pytest.warns(UserWarning, match='after JAX was imported'):
    out = xla_flags.apply(('--xla_b=3', '--xla_c=4'))
  assert out == '--xla_a=1 --xla_b=2 --xla_c=4'
  assert os.environ['XLA_FLAGS'] == out
  monkeypatch.delenv('XLA_FLAGS')
  assert xla_flags.apply(()) == ''
  assert 'XLA_FLAGS' not in os.environ


CONV_CASES = [  # (size, k, stride, cin, cout): stem, 3x3 on 8/2/1 maps, strided 1x1, odd sizes
    (32, 7, 2, 3, 4), (8, 3, 1, 4, 5), (2, 3, 2, 3, 4), (1, 3, 1, 3, 2), (2, 3, 1, 2, 3),
    (8, 1, 2, 3, 4), (7, 3, 2, 2, 3), (5, 1, 1, 3, 2), (3, 3, 2, 2, 2)
]


@pytest.mark.parametrize('size,k,stride,cin,cout', CONV_CASES)
def test_matmul_conv_equals_lax_conv_float64(size, k, stride, cin, cout):
  with jax.enable_x64(True):
    rng = np.random.default_rng(size * 31 + k)
    x = jnp.asarray(rng.standard_normal((2, size, size, cin)))
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)))
    p = k // 2
    ref_fn = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), (
        (p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    ours_fn = lambda x, w: speed.matmul_conv(x, w, stride, p)
    y_ref, vjp_ref = jax.vjp(ref_fn, x, w)
    y, vjp = jax.vjp(ours_fn, x, w)
    assert y.shape == y_ref.shape
    assert flax_torch.rel_err(y, y_ref) < 1e-13
    g = jnp.asarray(rng.standard_normal(y.shape))
    for a, b in zip(vjp(g), vjp_ref(g)):
      assert flax_torch.rel_err(a, b) < 1e-13


@pytest.mark.parametrize('size,k,stride,cin,cout', CONV_CASES + [(9, 7, 2, 3, 5), (6, 3, 2, 3, 3)])
def test_conv_each_pass_equals_lax_conv_float64(size, k, stride, cin, cout):
  """speed.conv with every combination of per-pass implementations (what
  conv_impl='auto' picks from) is lax.conv: values, input and weight gradients."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(size * 17 + k)
    x = jnp.asarray(rng.standard_normal((2, size, size, cin)))
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)))
    p = k // 2
    y_ref, vjp_ref = jax.vjp(lambda x, w: speed.lax_conv(x, w, stride, p), x, w)
    g = jnp.asarray(rng.standard_normal(y_ref.shape))
    grads_ref = vjp_ref(g)
    dx = speed.hwio_input_grad(g, w, (size, size), stride, p)
    assert flax_torch.rel_err(dx, grads_ref[0]) < 1e-13
    for impls in itertools.product(*speed.PASS_IMPLS.values()):
      y, vjp = jax.vjp(jax.jit(lambda x, w: speed.conv(x, w, stride, p, impls)), x, w)
      assert flax_torch.rel_err(y, y_ref) < 1e-13, impls
      for a, b in zip(vjp(g), grads_ref):
        assert flax_torch.rel_err(a, b) < 1e-13, impls
  with pytest.raises(ValueError, match='dx implementation'):
    speed.conv(x, w, stride, p, ('xla', 'cudnn', 'xla'))


@pytest.mark.parametrize('size,factor,k,stride', [(32, 7, 7, 2), (5, 7, 7, 2), (8, 2, 7, 2),
                                                  (6, 3, 3, 1), (7, 4, 3, 2), (4, 3, 5, 2),
                                                  (6, 2, 3, 2), (5, 5, 7, 3), (3, 2, 1, 2)])
def test_upsampled_conv_equals_conv_of_upsampled_float64(size, factor, k, stride):
  """speed.upsampled_conv (the stem after the 32 -> 224 resize with conv_impl='auto')
  is lax.conv of the nearest-upsampled image: values, input and weight gradients."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(size * 13 + factor)
    x = jnp.asarray(rng.standard_normal((2, size, size, 3)))
    w = jnp.asarray(rng.standard_normal((k, k, 3, 4)))
    p = k // 2
    ref_fn = lambda x, w: speed.lax_conv(models.nearest_resize(x, size * factor), w, stride, p)
    y_ref, vjp_ref = jax.vjp(ref_fn, x, w)
    y, vjp = jax.vjp(lambda x, w: speed.upsampled_conv(x, w, factor, stride, p), x, w)
    assert y.shape == y_ref.shape
    assert flax_torch.rel_err(y, y_ref) < 1e-13
    g = jnp.asarray(rng.standard_normal(y.shape))
    for a, b in zip(vjp(g), vjp_ref(g)):
      assert flax_torch.rel_err(a, b) < 1e-13


def test_resized_model_auto_equals_xla_float64():
  """A 32 -> 224 model with conv_impl='auto' (upsampled stem, per-pass convolutions) is
  the lax.conv model: logits, every parameter's gradient and the input gradient."""
  with jax.enable_x64(True):
    x = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3))
    out = {}
    for impl in ('xla', 'auto'):
      model = models.create_model('tiny_resnet', 10, resize=224, dtype=jnp.float64,
                                  param_dtype=jnp.float64, conv_impl=impl)
      variables = flax_torch.randomize_bn(models.init_variables(model, 0), seed=5)
      variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)

      def loss(params, x):
        logits = model.apply(dict(variables, params=params), x, mode=models.EVAL)
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

      logits = model.apply(variables, x, mode=models.EVAL)
      out[impl] = (logits, *jax.grad(loss, argnums=(0, 1))(variables['params'], x))
    for a, b in zip(jax.tree.leaves(out['auto']), jax.tree.leaves(out['xla'])):
      assert flax_torch.rel_err(a, b) < 1e-13


def test_conv_impls_share_variables_and_logits():
  x = np.random.default_rng(2).uniform(0, 1, (3, 32, 32, 3)).astype(np.float32)
  variables, logits = {}, {}
  for impl in speed.CONV_IMPLS:
    model = models.create_model('tiny_resnet', 10, conv_impl=impl)  # 3x3 and strided 1x1
    variables[impl] = models.init_variables(model, 0)
    logits[impl] = model.apply(variables[impl], x, mode=models.EVAL)
  for impl in ('auto', 'matmul'):
    assert (jax.tree_util.tree_structure(variables[impl]) == jax.tree_util.tree_structure(
        variables['xla']))
    for a, b in zip(jax.tree.leaves(variables[impl]), jax.tree.leaves(variables['xla'])):
      np.testing.assert_array_equal(a, b)
    assert flax_torch.rel_err(logits[impl], logits['xla']) < 1e-5
  with pytest.raises(ValueError, match='conv_impl'):
    models.create_model('tiny_resnet', 10, conv_impl='cudnn')


def test_auto_rule():
  assert speed.use_matmul_conv(1, 56, 56, 64)  # 1x1: always a matrix product
  assert speed.use_matmul_conv(3, 4, 4, 64)  # small maps
  assert speed.use_matmul_conv(3, 7, 7, 512)  # layer4 at 224
  assert not speed.use_matmul_conv(3, 8, 8, 64)  # layer1 at 32x32: XLA's convolution
  assert not speed.use_matmul_conv(7, 16, 16, 64)  # the stem
  assert speed.conv_passes(1, 56, 56, 64) == ('matmul',) * 3
  assert speed.conv_passes(3, 56, 56, 64) == ('xla', 'hwio', 'xla')


def test_levers_switch_and_restore():
  """``speed.levers`` switches a lever off only inside its block (what bench/ab_step.py
  measures), and the model traced there is still the same function."""
  assert speed.conv_passes(3, 56, 56, 64) == ('xla', 'hwio', 'xla')
  x = np.random.default_rng(3).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  model = models.create_model('tiny_resnet', 10, resize=64, conv_impl='auto')
  variables = models.init_variables(model, 0)
  on = model.apply(variables, x, mode=models.EVAL)
  with speed.levers(hwio_input_grad=False, upsampled_stem=False):
    assert speed.conv_passes(3, 56, 56, 64) == ('xla', 'xla', 'xla')
    off = model.apply(variables, x, mode=models.EVAL)
  assert speed.conv_passes(3, 56, 56, 64) == ('xla', 'hwio', 'xla')
  assert flax_torch.rel_err(on, off) < 1e-5
  with pytest.raises(ValueError, match='Unknown levers'):
    with speed.levers(fast_mode=True):
      pass


@pytest.mark.slow
@pytest.mark.parametrize('script, extra', [
    ('ab_step.py', ['--rounds', '2', '--variant', 'off=hwio_input_grad:0', '--variant', 'on=']),
    ('profile_step.py', ['--steps', '1']),
])
def test_step_benchmarks_run(tmp_path, script, extra):
  """bench/ab_step.py and bench/profile_step.py end to end on the tiny net (JAX side)."""
  import json
  import os
  import subprocess
  import sys
  from pathlib import Path
  root = Path(__file__).resolve().parents[1]
  out = tmp_path / 'out.json'
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # conftest's 8 simulated devices: the benchmarks use one
  proc = subprocess.run([
      sys.executable,
      str(root / 'bench' / script), '--arch', 'tiny_resnet', '--resize', 'none', '--batch', '4',
      '--attack-steps', '1', '--no-torch', '--json',
      str(out), *extra
  ], cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  if script == 'ab_step.py':
    assert set(result['images_per_s']) == {'off', 'on'}
    assert all(v > 0 for v in result['images_per_s'].values())
  else:
    assert result['jax']
