"""Fast tests of twins_jax.autoattack on a tiny MLP trained for a few seconds on digits.

Settings are cut down (few iterations / target classes / queries) and shared between
the single-attack tests and the suite test, so every compiled program is reused.
"""

import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twins_jax import autoattack as aa

_BENCH = os.path.join(os.path.dirname(__file__), '..', 'bench', 'autoattack_parity.py')
_spec = importlib.util.spec_from_file_location('autoattack_parity', _BENCH)
bench = importlib.util.module_from_spec(_spec)
sys.modules.setdefault('autoattack_parity', bench)
_spec.loader.exec_module(bench)

N = 48
N_ITER = 10
N_TC = 3
FAB_ITER = 10
N_QUERIES = 60
EPSS = {'Linf': (0., .05, .3), 'L2': (0., .4, 2.5)}
N_FLIPPED = 4  # labels made wrong on purpose: clean-misclassified points


@pytest.fixture(scope='module')
def setup():
  (xtr, ytr), (xte, yte) = bench.load_digits_split(n_test=200)
  model, params = bench.train(xtr, ytr, eps=0., epochs=4, batch=256, lr=5e-3, hidden=64)  # seconds
  fn = bench.logits_fn_for(model, params)
  x = jnp.asarray(xte[:N])
  y = np.asarray(yte[:N]).copy()
  y[:N_FLIPPED] = (y[:N_FLIPPED] + 1) % 10
  return fn, x, jnp.asarray(y)


def _run(name, fn, x, y, key, norm, eps, **kw):
  common = dict(norm=norm, eps=eps, **kw)
  if name == 'apgd-ce':
    return aa.apgd_with_robust(fn, x, y, key, loss='ce', n_iter=N_ITER, **common)
  if name == 'apgd-t':
    return aa.apgd_with_robust(fn, x, y, key, loss='dlr-targeted', n_iter=N_ITER,
                               n_target_classes=N_TC, **common)
  if name == 'fab-t':
    return aa.fab_t_with_robust(fn, x, y, key, n_iter=FAB_ITER, n_target_classes=N_TC, **common)
  return aa.square_with_robust(fn, x, y, key, n_queries=N_QUERIES, **common)


def _norm(v, norm):
  v = np.asarray(v).reshape(v.shape[0], -1)
  return np.abs(v).max(1) if norm == 'Linf' else np.sqrt((v**2).sum(1))


def _pred(fn, x):
  return np.asarray(jnp.argmax(fn(x), -1))


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
@pytest.mark.parametrize('name', ['apgd-ce', 'apgd-t', 'fab-t', 'square'])
def test_attack_contract(setup, name, norm):
  fn, x, y = setup
  y_np = np.asarray(y)
  clean_ok = _pred(fn, x) == y_np
  assert not clean_ok[:N_FLIPPED].any()
  accs = []
  for eps in EPSS[norm]:
    x_adv, robust = _run(name, fn, x, y, jax.random.PRNGKey(1), norm, eps)
    x_adv, robust = np.asarray(x_adv), np.asarray(robust)
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert np.all(_norm(x_adv - np.asarray(x), norm) <= eps + 1e-5)
    assert x_adv.min() >= 0. and x_adv.max() <= 1.
    pred = _pred(fn, x_adv)
    # Robust-counted points are classified correctly at the returned input, broken
    # ones are not; clean-misclassified points are never robust.
    np.testing.assert_array_equal(robust, pred == y_np)
    assert not np.any(robust & ~clean_ok)
    # Where the attack failed, the clean input comes back.
    np.testing.assert_array_equal(x_adv[robust], np.asarray(x)[robust])
    accs.append(robust.mean())
  assert accs[0] == clean_ok.mean()  # eps = 0 gives the clean accuracy
  assert all(a >= b for a, b in zip(accs, accs[1:])), accs
  assert accs[-1] < accs[0], accs  # the large eps must break something


@pytest.mark.parametrize('name', ['apgd-ce', 'square'])
def test_public_wrappers_and_active_mask(setup, name):
  fn, x, y = setup
  key = jax.random.PRNGKey(3)
  active = np.arange(N) % 2 == 0
  x_adv, robust = _run(name, fn, x, y, key, 'Linf', .3, active=jnp.asarray(active))
  x_adv, robust = np.asarray(x_adv), np.asarray(robust)
  np.testing.assert_array_equal(x_adv[~active], np.asarray(x)[~active])
  assert not robust[~active].any()
  if name == 'apgd-ce':
    plain = aa.apgd(fn, x, y, key, norm='Linf', eps=.3, n_iter=N_ITER)
  else:
    plain = aa.square(fn, x, y, key, norm='Linf', eps=.3, n_queries=N_QUERIES)
  assert plain.shape == x.shape


@pytest.mark.parametrize('name', ['apgd-t', 'fab-t', 'square'])
def test_per_example_independent_of_batch(setup, name):
  """Permuting the batch (keys travelling with their examples) permutes the result."""
  fn, x, y = setup
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(N))
  perm = np.random.default_rng(0).permutation(N)
  a, ra = _run(name, fn, x, y, keys, 'L2', .8)
  b, rb = _run(name, fn, x[perm], y[perm], keys[perm], 'L2', .8)
  np.testing.assert_array_equal(np.asarray(ra)[perm], np.asarray(rb))
  np.testing.assert_allclose(np.asarray(a)[perm], np.asarray(b), atol=1e-5)


@pytest.mark.parametrize('norm,version', [('Linf', 'standard'), ('L2', 'fast')])
def test_suite(setup, norm, version):
  fn, x, y = setup
  eps = EPSS[norm][1]
  msgs = []
  x_adv, robust, accs = aa.autoattack(fn, x, y, jax.random.PRNGKey(0), norm=norm, eps=eps,
                                      version=version, batch_size=N, progress=msgs.append,
                                      n_iter=N_ITER, n_target_classes=N_TC, fab_n_iter=FAB_ITER,
                                      n_queries=N_QUERIES)
  names = ['apgd-ce', 'apgd-t'] + (['fab-t', 'square'] if version == 'standard' else [])
  assert list(accs) == ['clean'] + names
  vals = list(accs.values())
  assert all(a >= b for a, b in zip(vals, vals[1:])), accs
  assert msgs
  x_adv, robust = np.asarray(x_adv), np.asarray(robust)
  y_np = np.asarray(y)
  clean_ok = _pred(fn, x) == y_np
  assert accs['clean'] == clean_ok.mean()
  assert not np.any(robust & ~clean_ok)
  np.testing.assert_array_equal(robust, _pred(fn, x_adv) == y_np)
  assert robust.mean() == vals[-1]
  assert np.all(_norm(x_adv - np.asarray(x), norm) <= eps + 1e-5)
  assert x_adv.min() >= 0. and x_adv.max() <= 1.


def test_suite_padding_and_batching(setup):
  """Smaller padded batches (the last one partial) give the same result."""
  fn, x, y = setup
  kw = dict(norm='Linf', eps=EPSS['Linf'][1], attacks=['apgd-ce'], n_iter=N_ITER)
  xa_full, r_full, acc_full = aa.autoattack(fn, x, y, jax.random.PRNGKey(0), batch_size=N, **kw)
  xa_small, r_small, acc_small = aa.autoattack(fn, x, y, jax.random.PRNGKey(0), batch_size=20, **kw)
  r_full, r_small = np.asarray(r_full), np.asarray(r_small)
  # Identical on CPU; allow one flip for accelerators whose matmuls depend on the shape.
  assert np.sum(r_full != r_small) <= 1
  same = r_full == r_small
  np.testing.assert_allclose(np.asarray(xa_full)[same], np.asarray(xa_small)[same], atol=1e-4)
  assert abs(acc_full['apgd-ce'] - acc_small['apgd-ce']) <= 1 / N + 1e-9


def test_square_schedule_and_eta():
  from twins_jax.autoattack import square_attack as sq
  assert sq.window_sides(.8, 32, 32, 3, 'Linf')[:3] == [29, 20, 14]
  assert all(s % 2 == 1 and s >= 3 for s in sq.window_sides(.8, 8, 8, 1, 'L2'))
  stages = [int(sq.p_stage(jnp.int32(i), 5000, False)) for i in (0, 10, 11, 50, 51, 8001)]
  assert stages == [0, 0, 1, 1, 2, 9]
  e = sq.eta(5)
  assert np.isclose((e**2).sum(), 1.) and (e[:2] >= 0).all() and (e[2:] <= 0).all()


def test_compile_time_does_not_grow_with_iterations():
  """Prints compile times for two iteration counts (not asserted: machine dependent)."""
  from twins_jax.autoattack.autopgd import apgd_core
  from twins_jax.autoattack._common import example_keys
  w = jax.random.normal(jax.random.PRNGKey(0), (64, 10))
  fn = jax.tree_util.Partial(lambda w, x: x.reshape(x.shape[0], -1) @ w, w)
  x = jax.random.uniform(jax.random.PRNGKey(1), (8, 8, 8, 1))
  y = jnp.arange(8) % 10
  keys = example_keys(jax.random.PRNGKey(0), 8)
  act = jnp.ones((8,), bool)
  times = {}
  for n_iter in (5, 500):
    t = time.time()
    apgd_core.lower(fn, x, y, keys, act, jnp.float32(.1), norm='Linf', loss='dlr-targeted',
                    n_iter=n_iter, n_restarts=1, n_target_classes=3, rho=.75).compile()
    times[n_iter] = time.time() - t
  print(f'\nAPGD-T compile time: n_iter=5: {times[5]:.2f} s, n_iter=500: {times[500]:.2f} s')


# ----------------------------------------------------------------------------- batching


def _projection_linf_sorted(t, w, b):
  """The reference's ``projection_linf`` (fab_projections.py), sort and binary search,
  in NumPy float64."""
  t, w, b = (np.asarray(a, np.float64) for a in (t, w, b))
  sign = np.where((w * t).sum(1) - b >= 0, 1., -1.)
  w = w * sign[:, None]
  b = b * sign
  a = (w < 0).astype(np.float64)
  d = (a - t) * (w != 0)
  p = a - t * (2 * a - 1)
  indp = np.argsort(p, axis=1, kind='stable')
  b = b - (w * t).sum(1)
  b0 = (w * d).sum(1)
  indp2 = indp[:, ::-1]
  ws = np.take_along_axis(w, indp2, 1)
  bs2 = -ws * np.take_along_axis(d, indp2, 1)
  s = np.cumsum(np.abs(ws), 1)
  sb = np.cumsum(bs2, 1) + b0[:, None]
  b2 = sb[:, -1] - s[:, -1] * np.take_along_axis(p, indp[:, :1], 1)[:, 0]
  c_l = b - b2 > 0
  c2 = (b - b0 > 0) & ~c_l
  rows = np.nonzero(c2)[0]
  lb = np.zeros(rows.size)
  ub = np.full(rows.size, w.shape[1] - 1.)
  for _ in range(int(np.ceil(np.log2(w.shape[1])))):
    mid = np.floor((lb + ub) / 2).astype(int)
    indcurr = indp[rows, w.shape[1] - 1 - mid]
    b2r = sb[rows, mid] - s[rows, mid] * p[rows, indcurr]
    c = b[rows] - b2r > 0
    lb = np.where(c, mid, lb)
    ub = np.where(c, ub, mid)
  lb = lb.astype(int)
  out = d.copy()
  lmbd = np.maximum((b - sb[:, -1]) / -s[:, -1], 0)[:, None]
  out[c_l] = ((2 * a - 1) * lmbd)[c_l]
  lmbd2 = np.maximum((b[rows] - sb[rows, lb]) / -s[rows, lb], 0)[:, None]
  out[rows] = np.minimum(lmbd2, d[rows]) * a[rows] + np.maximum(-lmbd2, d[rows]) * (1 - a[rows])
  return out * (w != 0), c_l, c2


@pytest.mark.parametrize('case', ['continuous', 'ties_and_zero_weights'])
def test_projection_linf_without_sort_matches_sorted_reference(case):
  """The bisection on values finds the reference's breakpoint: every branch (beyond
  the box, inside, no solution), ties in p, zero weights."""
  rng = np.random.default_rng(0)
  rows, dim = 96, 300
  t = rng.uniform(size=(rows, dim)).astype(np.float32)
  w = rng.normal(size=(rows, dim)).astype(np.float32)
  if case != 'continuous':
    t = np.round(t * 4) / 4  # many equal p
    w[:, ::3] = 0.
  b = (rng.normal(size=rows) * np.geomspace(.1, 400, rows)).astype(np.float32)
  ref, c_l, c2 = _projection_linf_sorted(t, w, b)
  assert c2.any() and (~c_l & ~c2).any() and (c_l.any() or case != 'continuous')
  got = np.asarray(aa.projection_linf(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)))
  np.testing.assert_allclose(got, ref, atol=2e-5)
  # The step reaches the hyperplane where the reference's does.
  tb = t + got
  np.testing.assert_allclose((w * tb).sum(1)[c2], b[c2], rtol=1e-4, atol=1e-3)


def test_bucket_ladder_and_plan():
  from twins_jax.autoattack.suite import bucket_sizes, plan_batches
  assert bucket_sizes(200) == (200, 104, 56, 32)
  assert bucket_sizes(200, 1) == (200,)
  assert bucket_sizes(48, 4, 8) == (48, 24, 16, 8)
  assert all(s % 8 == 0 for s in bucket_sizes(250, 4, 8))
  for sizes in (bucket_sizes(200), bucket_sizes(250, 3, 8), bucket_sizes(20), (64,)):
    for count in range(1, 3 * sizes[0]):
      plan = plan_batches(count, sizes)
      assert all(s in sizes for s in plan)
      assert 0 <= sum(plan) - count < sizes[-1], (count, plan)
  assert plan_batches(130, (200, 104, 56, 32)) == [104, 32]
  assert plan_batches(190, (200, 104, 56, 32)) == [200]


SUITE_KW = dict(norm='Linf', eps=EPSS['Linf'][1], version='standard', n_iter=N_ITER,
                n_target_classes=N_TC, fab_n_iter=FAB_ITER, n_queries=N_QUERIES)


class _CompileCounter:
  """Counts XLA compilations (backend compiles) while active."""

  def __enter__(self):
    self.n = 0

    def listener(name, _secs, **_):
      if name == '/jax/core/compile/backend_compile_duration':
        self.n += 1

    self._listener = listener
    jax.monitoring.register_event_duration_secs_listener(listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


def test_suite_second_call_compiles_nothing(setup):
  """Every batch size of the ladder is compiled on first use, so a call with another
  key (other robust counts, so other batches) compiles nothing, and a chunk of another
  size reuses the same attack programs."""
  from twins_jax.autoattack.suite import _Batches
  fn, x, y = setup
  aa.autoattack(fn, x, y, jax.random.PRNGKey(0), batch_size=N, **SUITE_KW)
  with _CompileCounter() as c:
    aa.autoattack(fn, x, y, jax.random.PRNGKey(1), batch_size=N, **SUITE_KW)
  assert c.n == 0, f'{c.n} compilations in the second call'
  programs = set(_Batches._compiled)
  xs, ys = np.asarray(x)[:40], np.asarray(y)[:40]
  aa.autoattack(fn, xs, ys, jax.random.PRNGKey(2), batch_size=N, index_offset=8, **SUITE_KW)
  assert _Batches._compiled == programs


def test_suite_chunk_equals_whole(setup):
  """A chunk attacked alone with its global indices gets exactly what it gets inside
  the call on the whole set (a resumable, chunked evaluation depends on it)."""
  fn, x, y = setup
  key = jax.random.PRNGKey(4)
  xa, r, _ = aa.autoattack(fn, x, y, key, batch_size=N, **SUITE_KW)
  xa, r = np.asarray(xa), np.asarray(r)
  lo, hi = 13, 41
  xc, rc, _ = aa.autoattack(fn, x[lo:hi], y[lo:hi], key, batch_size=N, index_offset=lo, **SUITE_KW)
  np.testing.assert_array_equal(np.asarray(rc), r[lo:hi])
  np.testing.assert_allclose(np.asarray(xc), xa[lo:hi], atol=1e-6)
  # Any order, any subset, given the global indices.
  sel = np.random.default_rng(1).permutation(N)[:20]
  xs, rs, _ = aa.autoattack(fn, x[sel], y[sel], key, batch_size=N, global_index=sel, **SUITE_KW)
  np.testing.assert_array_equal(np.asarray(rs), r[sel])
  np.testing.assert_allclose(np.asarray(xs), xa[sel], atol=1e-6)
  assert r.any() and (~r).any()


def test_suite_mesh_8_devices_equals_1(setup):
  """With the 8 simulated CPU devices: a mesh over all of them (every batch sharded,
  the model replicated) gives the result of a mesh over one."""
  from twins_jax import parallel
  fn, x, y = setup
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices (tests/conftest.py simulates them on CPU)')
  key = jax.random.PRNGKey(5)
  kw = dict(SUITE_KW, batch_size=N, n_buckets=2)
  out = {}
  for n_dev in (8, 1):
    mesh = parallel.data_mesh(jax.devices()[:n_dev])
    out[n_dev] = aa.autoattack(fn, x, y, key, mesh=mesh, **kw)
  (x8, r8, a8), (x1, r1, a1) = out[8], out[1]
  assert a8 == a1
  np.testing.assert_array_equal(np.asarray(r8), np.asarray(r1))
  np.testing.assert_allclose(np.asarray(x8), np.asarray(x1), atol=1e-5)
  assert x8.sharding.num_devices >= 1 and np.asarray(r8).any()
