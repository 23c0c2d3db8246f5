"""The AutoAttack ensemble (Croce & Hein, ICML 2020), as ``run_standard_evaluation``.

``standard``: APGD-CE (100 iterations, 1 restart), APGD-T (100 iterations, 9 target
classes, 1 restart each), FAB-T (100 iterations, 9 target classes, 1 restart), Square
(5000 queries, p_init 0.8). ``fast``: APGD-CE and APGD-T only.

Like the reference, every run (each restart, each target class of APGD-T and FAB-T,
each range of Square's queries) attacks only the points still robust, and a point
stops being robust once an attack returns an input that the model misclassifies; that
input is kept.

Batching. The cost of a run follows the number of points it attacks, not the size of
the input: before every run the points still robust are gathered (compacted) and cut
into batches whose sizes come from a small fixed ladder, ``batch_size`` and its
halvings (``n_buckets`` sizes, the smaller ones rounded up to multiples of 8 and of the
device count). A count is covered by the largest sizes that fit, and the rest by one
padded batch, so the padding is less than the smallest size. Each attack is one
compiled program per batch size, whatever the run (restart, target class and query
range are traced arguments), and all the sizes of the ladder are compiled the first
time a program is needed: later calls, chunks and keys compile nothing. Square, whose
query loop ends when every point is fooled, is cut into query ranges so that fooled
points leave the batches too.

Every example's randomness is derived from ``key``, the attack and the example's global
index (``index_offset + i`` or ``global_index[i]``), so the result for an example does
not depend on the batch it lands in, nor on which other examples are attacked with it:
attacking examples 1000..1999 as one chunk (``index_offset=1000``) gives them exactly
what they get inside a call on the whole set, which is what a resumable, chunked
evaluation needs.

With a ``mesh`` (1-D, axis 'data', see :func:`twins_jax.parallel.data_mesh`) every
batch is sharded over its devices and the model replicated; the batch sizes are then
multiples of the device count and the result equals that of a single device.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._common import _typed, as_partial, check_norm, flat_norm
from .autopgd import LOSSES, _check_loss, apgd_batch_step, apgd_empty_state
from .fab_attack import _check_targets, fab_empty_state, fab_t_batch_step
from .square_attack import _THRESHOLDS, square_batch

ATTACK_IDS = {'apgd-ce': 0, 'apgd-t': 1, 'fab-t': 2, 'square': 3}
VERSIONS = {
    'standard': ('apgd-ce', 'apgd-t', 'fab-t', 'square'),
    'fast': ('apgd-ce', 'apgd-t'),
}
# Square's query ranges: the points fooled in a range leave the batches of the next.
# Most are fooled early, hence the schedule's thresholds first, then every 500 queries.
SQUARE_RANGE = 500


def bucket_sizes(batch_size: int, n_buckets: int = 4, n_devices: int = 1) -> tuple:
  """The batch-size ladder, largest first: ``batch_size`` (rounded up to a multiple of
  ``n_devices``) and ``n_buckets - 1`` halvings, rounded up to multiples of
  ``lcm(8, n_devices)`` (whole vector registers on CPU, whole shards on a mesh)."""
  if batch_size < 1 or n_buckets < 1:
    raise ValueError(f'batch_size and n_buckets must be positive, got {batch_size}, {n_buckets}')
  top = -(-batch_size // n_devices) * n_devices
  align = math.lcm(8, n_devices)
  sizes = {top}
  for k in range(1, n_buckets):
    s = -(-batch_size // 2**k)
    s = -(-s // align) * align
    if s < top:
      sizes.add(s)
  return tuple(sorted(sizes, reverse=True))


def plan_batches(count: int, sizes: Sequence[int]) -> list:
  """Batch sizes (from ``sizes``, largest first) that cover ``count`` points: the
  largest size that fits, repeatedly, until one padded batch covers the rest with less
  padding than the smallest size."""
  out = []
  smallest = sizes[-1]
  while count > 0:
    up = [s for s in sizes if s >= count]
    if up and up[-1] - count < smallest:
      out.append(up[-1])
      break
    s = next(s for s in sizes if s <= count)
    out.append(s)
    count -= s
  return out


class _Batches:
  """Runs a jitted per-batch program over any subset of the points, in the ladder's
  batch sizes: gathers and pads the subset, places it (sharded on a mesh), compiles
  every batch size of a program the first time it is used, and scatters back.

  A program is either called once per batch, or (``loop``) once per iteration with a
  state that stays on the device between calls: dispatch is asynchronous, so the host
  only waits at the end of the batch. On a mesh the program runs under ``shard_map``:
  every device attacks its own slice of the batch with no communication at all (each
  example is independent; Square's early exit is then per device).
  """

  # (program, static args, batch size, argument shapes, model structure, mesh)
  # already compiled, and the shard_map wrappers: shared by every call.
  _compiled: set = set()
  _wrapped: dict = {}

  def __init__(self, fn, sizes, mesh, log):
    self.sizes = sizes
    self.mesh = mesh
    self.log = log
    self.compile_s = 0.
    if mesh is not None:
      from jax.sharding import NamedSharding, PartitionSpec as P
      if len(mesh.axis_names) != 1:
        raise ValueError(f'autoattack needs a 1-D mesh, got axes {mesh.axis_names}')
      self.axis = mesh.axis_names[0]
      self.data = NamedSharding(mesh, P(self.axis))
      self.repl = NamedSharding(mesh, P())
      fn = jax.device_put(fn, self.repl)
    self.fn = fn
    fn_leaves, self.fn_tree = jax.tree_util.tree_flatten(fn)
    self.fn_sig = tuple((tuple(a.shape), str(a.dtype)) for a in fn_leaves)

  def _sharding(self, a):
    """Every array with a batch axis has it first; scalars are replicated."""
    if self.mesh is None:
      return None
    return self.data if np.ndim(a) else self.repl

  def place(self, tree):
    if self.mesh is None:
      return tree
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, self._sharding(a)), tree)

  def replicate(self, a):
    return a if self.mesh is None else jax.device_put(a, self.repl)

  def _abstract(self, tree):
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a),
                                       np.asarray(a).dtype, sharding=self._sharding(a)), tree)

  def _target(self, program, statics, extra):
    """The function to call as ``f(fn, args, scalars, extra)``: the program itself, or
    on a mesh its ``shard_map`` over the batch axis (``extra``: the loop state and
    iteration, whose scalars are replicated)."""
    if self.mesh is None:
      return lambda fn, args, scalars, extra: program(fn, **args, **scalars, **extra, **statics)
    leaves, tree = jax.tree_util.tree_flatten(extra)
    key = (program, tuple(sorted(statics.items())), self.mesh, tree,
           tuple(np.ndim(a) for a in leaves))
    f = _Batches._wrapped.get(key)
    if f is None:
      from jax.sharding import PartitionSpec as P
      specs = jax.tree_util.tree_map(lambda a: P(self.axis) if np.ndim(a) else P(), extra)

      def body(fn, args, scalars, extra):
        return program(fn, **args, **scalars, **extra, **statics)

      # check_vma=False: the loop state's scalars (APGD's checkpoint counters) come out
      # of per-device computations but only depend on replicated inputs.
      f = jax.jit(
          jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(self.axis), P(), specs),
                        out_specs=specs['state'] if 'state' in extra else P(self.axis),
                        check_vma=False))
      _Batches._wrapped[key] = f
    return f

  def _ensure_compiled(self, program, statics, per_ex, scalars, sizes, loop):
    sig = tuple((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in per_ex.items())
    todo = []
    for size in sizes:
      key = (program, tuple(sorted(statics.items())), size, sig, self.fn_tree, self.fn_sig,
             self.mesh)
      if key not in _Batches._compiled:
        todo.append((key, size))
    if not todo:
      return
    t = time.time()
    for key, size in todo:
      batch = {k: np.zeros((size,) + v.shape[1:], v.dtype) for k, v in per_ex.items()}
      args = _accepted(program, batch)
      extra = {} if loop is None else dict(state=loop[0](batch), i=np.int32(0))
      target = self._target(program, statics, extra)
      if self.mesh is None:
        lowered = program.lower(self.fn, **self._abstract(args), **scalars, **self._abstract(extra),
                                **statics)
      else:
        lowered = target.lower(self.fn, self._abstract(args), scalars, self._abstract(extra))
      lowered.compile()
      _Batches._compiled.add(key)
    dt = time.time() - t
    self.compile_s += dt
    self.log(f'compiled {getattr(program, "__name__", "program")} for batch sizes '
             f'{[s for _, s in todo]} in {dt:.1f} s')

  def run(self, program, idx, per_ex, scalars=None, statics=None, top_only=False, loop=None):
    """``program(fn, **per_ex[idx], **scalars, **statics)`` over the points ``idx``.

    ``per_ex``: arrays over all points (first axis), gathered at ``idx``; only the
    entries the program takes are passed to it. The padding repeats ``idx[0]``; it is
    masked by an ``active`` entry where there is one, and its outputs are dropped. ``top_only``: batches of the largest size only (for a
    single forward pass, where padding costs less than compiling more sizes).
    ``loop = (init, iterations, finish)``: call ``program(..., state=state, i=i)`` for
    ``i`` in ``iterations`` from ``state = init(batch)`` (host arrays) and return
    ``finish(state, batch)`` (``batch``: the gathered host arrays). Returns the outputs
    (a pytree of arrays over ``idx``)."""
    scalars = scalars or {}
    statics = statics or {}
    sizes = self.sizes[:1] if top_only else self.sizes
    self._ensure_compiled(program, statics, per_ex, scalars, sizes, loop)
    outs = []
    start = 0
    for size in plan_batches(idx.size, sizes):
      chunk = idx[start:start + size]
      m = chunk.size
      padded = np.concatenate([chunk, np.full((size - m,), chunk[0], chunk.dtype)])
      batch = {k: v[padded] for k, v in per_ex.items()}
      if 'active' in batch:
        batch['active'] = batch['active'] & (np.arange(size) < m)
      args = self.place(_accepted(program, batch))
      if loop is None:
        out = self._target(program, statics, {})(self.fn, args, scalars, {})
      else:
        init, iterations, finish = loop
        state = self.place(init(batch))
        target = None
        for i in iterations:
          extra = dict(state=state, i=np.int32(i))
          target = target or self._target(program, statics, extra)
          state = target(self.fn, args, scalars, extra)
        out = finish(jax.tree_util.tree_map(np.asarray, state), batch)
      outs.append(jax.tree_util.tree_map(lambda o: np.asarray(o)[:m], out))
      start += m
    return jax.tree_util.tree_map(lambda *o: np.concatenate(o), *outs)


def _accepted(program, batch):
  """The entries of ``batch`` that ``program`` takes (``active`` may be host-only)."""
  params = inspect.signature(program).parameters
  return {k: v for k, v in batch.items() if k in params}


@jax.jit
def logits_batch(fn, x):
  return fn(x)


def autoattack(logits_fn: Callable, x, y, key, *, norm: str, eps: float, version: str = 'standard',
               batch_size: Optional[int] = None, progress=None,
               attacks: Optional[Sequence[str]] = None, n_iter: int = 100, n_restarts: int = 1,
               n_target_classes: int = 9, fab_n_iter: int = 100, n_queries: int = 5000,
               p_init: float = .8, rho: float = .75, mesh=None, index_offset: int = 0,
               global_index=None, n_buckets: int = 4, stats: Optional[dict] = None):
  """Runs AutoAttack and reports robust accuracy after each attack.

  Args:
    logits_fn: pure ``x -> logits`` (per-example independent, e.g. eval-mode BN). For
      big models pass ``jax.tree_util.Partial(apply_fn, params)`` so the parameters
      are traced arguments rather than compiled-in constants (and a new set of
      parameters does not recompile).
    x: ``(N, H, W, C)`` images in [0, 1]; y: ``(N,)`` int labels; key: one PRNG key.
    norm: 'Linf' or 'L2'; eps: radius.
    version: 'standard' or 'fast'; ``attacks`` overrides the list (names from
      'apgd-ce', 'apgd-t', 'fab-t', 'square').
    batch_size: the largest batch (default ``min(N, 250)``, the reference's 250); the
      points still robust run in batches of this size and its halvings (see the
      module docstring).
    progress: None/False (silent), True (print), or a callable receiving a string.
    n_iter, n_restarts, n_target_classes, fab_n_iter, n_queries, p_init, rho: attack
      settings; the defaults are the reference 'standard' ones (``n_restarts`` is the
      APGD-CE restarts; APGD-T, FAB-T and Square use one restart per target, as in the
      reference). ``n_target_classes`` is capped at ``n_classes - 1``.
    mesh: optional 1-D ``jax.sharding.Mesh`` (axis 'data') whose devices this process
      can address: the batches are sharded over it, the model replicated.
    index_offset: global index of ``x[0]``: example ``i`` draws its randomness from
      ``(key, attack, index_offset + i)``, so a chunk of a larger set gets exactly
      what it gets inside a call on the whole set.
    global_index: ``(N,)`` global indices instead (overrides ``index_offset``).
    n_buckets: number of batch sizes in the ladder (1: always ``batch_size``, padded).
    stats: optional dict, filled with the seconds spent on ``'clean'`` and on each
      attack, and ``'compile'``: the part of those spent compiling.
  Returns:
    ``(x_adv, robust, accs)``: adversarial inputs (clean where no attack succeeded),
    the per-example robust mask (True only where the model classifies ``x_adv``
    correctly, so never for clean-misclassified points), and a dict of robust
    accuracies: ``'clean'`` then one entry per attack in order.
  """
  check_norm(norm)
  if attacks is None:
    if version not in VERSIONS:
      raise ValueError(f'version must be one of {tuple(VERSIONS)}, got {version!r}')
    attacks = VERSIONS[version]
  for a in attacks:
    if a not in ATTACK_IDS:
      raise ValueError(f'unknown attack {a!r}')
  if progress is True:
    log = print
  elif callable(progress):
    log = progress
  else:
    log = lambda _: None

  fn = as_partial(logits_fn)
  x_np = np.asarray(x, np.float32)
  y_np = np.asarray(y).astype(np.int32)
  n = x_np.shape[0]
  if global_index is None:
    gidx = np.arange(n, dtype=np.int64) + int(index_offset)
  else:
    gidx = np.asarray(global_index).astype(np.int64)
    if gidx.shape != (n,):
      raise ValueError(f'global_index must have shape ({n},), got {gidx.shape}')
  if n and (gidx.min() < 0 or gidx.max() >= 2**31):
    raise ValueError('global indices must lie in [0, 2**31)')
  gidx = gidx.astype(np.int32)
  bs = int(batch_size) if batch_size else max(1, min(n, 250))
  n_dev = 1 if mesh is None else mesh.devices.size
  batches = _Batches(fn, bucket_sizes(bs, n_buckets, n_dev), mesh, log)
  key = _typed(key)
  if key.ndim != 0:
    raise ValueError('autoattack takes a single key')
  eps32 = np.float32(eps)

  t0 = time.time()
  n_cls = int(
      jax.eval_shape(fn, jax.ShapeDtypeStruct((1,) + x_np.shape[1:], jnp.float32)).shape[-1])
  ones = np.ones((n,), bool)
  logits = batches.run(logits_batch, np.arange(n), dict(x=x_np), top_only=True) if n else \
      np.zeros((0, n_cls), np.float32)
  robust = np.argmax(logits, -1) == y_np
  # Target classes of APGD-T and FAB-T: the t-th most likely (stable ascending
  # argsort, like jnp.argsort in the single attacks).
  order = np.argsort(logits, axis=-1, kind='stable').astype(np.int32)
  accs = {'clean': float(robust.mean()) if n else 0.}
  log(f'clean accuracy: {accs["clean"]:.2%}')
  if stats is not None:
    stats['clean'] = time.time() - t0
  n_tc = max(1, min(int(n_target_classes), n_cls - 1))
  if 'apgd-t' in attacks:
    _check_loss('dlr-targeted', n_tc, n_cls)
  if 'fab-t' in attacks:
    _check_targets(n_tc, n_cls)

  per_ex = dict(x=x_np, y=y_np, index=gidx, active=ones)
  x_adv = x_np.copy()

  def record(idx, fooled, adv):
    x_adv[idx[fooled]] = adv[fooled]
    robust[idx[fooled]] = False

  for name in attacks:
    t_attack = time.time()
    attack_key = batches.replicate(jax.random.fold_in(key, ATTACK_IDS[name]))
    if name in ('apgd-ce', 'apgd-t'):
      targeted = name == 'apgd-t'
      loss_id = LOSSES.index('dlr-targeted' if targeted else 'ce')
      runs = n_tc if targeted else int(n_restarts)
      n_iter_ = int(n_iter)
      statics = dict(norm=norm, n_iter=n_iter_, rho=float(rho))
      for j in range(runs):
        idx = np.nonzero(robust)[0]
        if idx.size == 0:
          break
        y_t = order[:, n_cls - 2 - j] if targeted else y_np
        adv, fooled = batches.run(
            apgd_batch_step, idx, dict(per_ex, y_target=y_t),
            dict(key=attack_key, eps=eps32, j=np.int32(j), loss_id=np.int32(loss_id)), statics,
            loop=(lambda b: apgd_empty_state(b['x'], n_iter_, np), range(-1, n_iter_), lambda s, b:
                  (s['x_best_adv'], b['active'] & ~s['acc'])))
        record(idx, fooled, adv)
        log(f'{name} - run {j + 1}/{runs} - {int(fooled.sum())} out of {idx.size} '
            f'successfully perturbed')
    elif name == 'fab-t':
      statics = dict(norm=norm, alpha_max=.1, eta=1.05, beta=.9)
      for j in range(n_tc):
        idx = np.nonzero(robust)[0]
        if idx.size == 0:
          break
        adv, fooled = batches.run(
            fab_t_batch_step, idx, dict(per_ex, y_target=order[:, n_cls - 2 - j]),
            dict(key=attack_key, eps=eps32, j=np.int32(j), rand_start=np.bool_(False)), statics,
            loop=(lambda b: fab_empty_state(b['x'], np), range(int(fab_n_iter)), lambda s, b:
                  (s[1], b['active'] & (s[2] <= eps32))))
        record(idx, fooled, adv)
        log(f'{name} - target {j + 1}/{n_tc} - {int(fooled.sum())} out of {idx.size} '
            f'successfully perturbed')
    else:
      _square(batches, per_ex, robust, record, attack_key, eps32, norm, int(n_queries),
              float(p_init), log)
    accs[name] = float(robust.mean()) if n else 0.
    if stats is not None:
      stats[name] = time.time() - t_attack
    log(f'robust accuracy after {name.upper()}: {accs[name]:.2%} '
        f'({time.time() - t_attack:.1f} s, total time {time.time() - t0:.1f} s)')

  # A point counted robust must be classified correctly at the returned input (it is
  # its clean input, so this holds by construction; checked for the robust points).
  idx = np.nonzero(robust)[0]
  if idx.size:
    robust[idx] &= np.argmax(batches.run(logits_batch, idx, dict(x=x_adv), top_only=True),
                             -1) == y_np[idx]
  if stats is not None:
    stats['compile'] = batches.compile_s
  x_adv = jnp.asarray(x_adv)
  if progress:
    pert = np.asarray(flat_norm(x_adv - jnp.asarray(x_np), norm))
    log(f'max {norm} perturbation: {pert.max() if n else 0.:.5f}, '
        f'robust accuracy: {robust.mean() if n else 0.:.2%}')
  return x_adv, jnp.asarray(robust), accs


def square_ranges(n_queries: int) -> list:
  """Query ranges ``(start, stop)`` of a Square run: the starting point (query -1) and
  the schedule's thresholds, then every :data:`SQUARE_RANGE` queries."""
  bounds = sorted({t for t in _THRESHOLDS if t < n_queries} |
                  set(range(SQUARE_RANGE, n_queries, SQUARE_RANGE)) | {n_queries})
  return list(zip([-1] + bounds[:-1], bounds))


def _square(batches, per_ex, robust, record, key, eps, norm, n_queries, p_init, log):
  """Square (one restart, the reference's unrescaled schedule) on the robust points,
  dropping the fooled ones between query ranges."""
  idx = np.nonzero(robust)[0]
  if idx.size == 0:
    return
  n = per_ex['x'].shape[0]
  # Query state over all points (only idx's rows are used).
  state = dict(x_best=per_ex['x'].copy(), margin_min=np.ones((n,), np.float32), loss_min=np.ones(
      (n,), np.float32))
  statics = dict(norm=norm, n_queries=n_queries, p_init=p_init, rescale_schedule=False)
  for start, stop in square_ranges(n_queries):
    live = idx[state['margin_min'][idx] > 0]
    if live.size == 0:
      break
    out = batches.run(
        square_batch, live, dict(per_ex, **state),
        dict(key=key, eps=eps, j=np.int32(0), start=np.int32(start), stop=np.int32(stop)), statics)
    for k, v in zip(('x_best', 'margin_min', 'loss_min'), out):
      state[k][live] = v
  # Fooled: the returned point is misclassified (a margin <= 0; an exact tie is
  # decided by the prediction, as in the reference).
  cand = idx[state['margin_min'][idx] <= 0]
  fooled = np.zeros((0,), bool)
  if cand.size:
    logits = batches.run(logits_batch, cand, dict(x=state['x_best']), top_only=True)
    fooled = np.argmax(logits, -1) != per_ex['y'][cand]
    record(cand, fooled, state['x_best'][cand])
  log(f'square - {int(fooled.sum())} out of {idx.size} successfully perturbed')
