"""The training and evaluation pipelines, on grain.

**Training** (:func:`train_pipeline`): batch ``k`` of a run is a pure function of
``(seed, k)``. Step ``k`` is batch ``k % steps_per_epoch`` of epoch ``k // steps_per_epoch``;
the epoch visits the source in the order of a permutation drawn from ``(seed, epoch)``, and
every random draw of the example at ``position`` of that epoch comes from
:func:`~twins_jax.data.transforms.example_rng` ``(seed, epoch, position)``. As grain
datasets::

  records = source -> _EpochShuffle(seed) -> map_with_index(_SeededTransform)   # flat index
  batches = _HostBatches(records, plan)[start_step:]                             # step index
          -> to_iter_dataset(threads, prefetch) [-> mp_prefetch(worker processes)]

Nothing depends on the number of hosts, worker processes or threads, or on restarts: the
step number alone is the pipeline's position, so resuming a run is slicing at its step.
Each host reads only its own rows ``[i * b / P, (i + 1) * b / P)`` of the global batch of
``b`` examples (what :func:`twins_jax.parallel.shard_batch` expects); a partial last batch
that does not split evenly over the devices is read whole by every host (it is then
computed replicated). :class:`TrainPlan` holds that arithmetic.

**Evaluation** (:func:`eval_pipeline`): every example once, in order; the last batch is
padded to the full size with a ``mask`` (1 real, 0 padding), so shapes stay static.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Optional

import grain
import numpy as np

from twins_jax.data.transforms import EvalTransform, TrainTransform, example_rng

LAST_BATCH = ('partial', 'drop')
_TAG_EPOCH_PERM = 0x7065  # keeps the epoch-order stream apart from the others


def host_rows(global_batch_size: int, process_index: int, process_count: int) -> range:
  """Host ``process_index``'s contiguous rows of a global batch."""
  if global_batch_size <= 0:
    raise ValueError(f'global_batch_size must be positive, got {global_batch_size}')
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f'bad process_index={process_index} / process_count={process_count}')
  if global_batch_size % process_count:
    raise ValueError(f'the global batch size {global_batch_size} must be divisible by the '
                     f'number of processes {process_count}')
  per_host = global_batch_size // process_count
  return range(process_index * per_host, (process_index + 1) * per_host)


def _seed_int(seed: Any) -> int:
  seed = int(seed)
  if seed < 0:
    raise ValueError(f'seeds must be non-negative integers, got {seed}')
  return seed


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """Which examples every training step reads: the epoch structure and each host's rows.

  ``last_batch`` says what happens to the ``num_examples % global_batch_size`` examples left
  at the end of an epoch:

  * ``'partial'`` (the reference: PyTorch's ``DataLoader(drop_last=False)``): they form a last,
    shorter batch, so an epoch is ``ceil(n / B)`` steps and sees every example once (a lone
    leftover example is dropped: a batch of one can be neither split into a Frozen and an
    Adaptive half nor batch-normalised);
  * ``'drop'``: they are skipped this epoch (``n // B`` steps of one static shape).

  ``shard_multiple`` is the number of devices a batch is split over (default: the number of
  processes).
  """
  num_examples: int
  global_batch_size: int
  last_batch: str = 'partial'
  process_index: int = 0
  process_count: int = 1
  shard_multiple: Optional[int] = None

  def __post_init__(self):
    if self.last_batch not in LAST_BATCH:
      raise ValueError(f'last_batch must be one of {LAST_BATCH}, got {self.last_batch!r}')
    host_rows(self.global_batch_size, self.process_index, self.process_count)
    if self.devices % self.process_count:
      raise ValueError(f'shard_multiple ({self.devices}) must be a multiple of the number of '
                       f'processes ({self.process_count})')
    if self.num_examples == 0:
      raise ValueError('the training source is empty')
    if self.last_batch == 'drop' and self.num_examples < self.global_batch_size:
      raise ValueError(f'the training set ({self.num_examples} examples) is smaller than one '
                       f'batch ({self.global_batch_size}); use last_batch="partial" or a '
                       'smaller batch')

  @property
  def devices(self) -> int:
    return int(self.shard_multiple or self.process_count)

  @property
  def steps_per_epoch(self) -> int:
    full, rest = divmod(self.num_examples, self.global_batch_size)
    return full + (self.last_batch == 'partial' and rest >= 2)

  def batch_size_at(self, step: int) -> int:
    """The global size of batch ``step`` (smaller only for a partial last batch)."""
    k = int(step) % self.steps_per_epoch
    return min(self.global_batch_size, self.num_examples - k * self.global_batch_size)

  def sharded(self, step: int) -> bool:
    """Whether batch ``step`` splits evenly over the devices (else every host reads the
    whole batch and it is computed replicated)."""
    return self.batch_size_at(step) % self.devices == 0

  def host_positions(self, step: int) -> tuple[int, np.ndarray]:
    """``(epoch, positions in the epoch's order of this host's rows of batch step)``."""
    if step < 0:
      raise ValueError(f'step must be non-negative, got {step}')
    epoch, k = divmod(int(step), self.steps_per_epoch)
    size = self.batch_size_at(step)
    if size == self.global_batch_size or self.sharded(step):
      rows = host_rows(size, self.process_index, self.process_count)
    else:
      rows = range(size)
    return epoch, k * self.global_batch_size + np.asarray(rows, np.int64)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order in which ``epoch`` visits a source of ``n`` examples."""
  return np.random.default_rng([_TAG_EPOCH_PERM, _seed_int(seed), int(epoch)]).permutation(n)


class _EpochShuffle(grain.MapDataset):
  """Element ``epoch * n + position``: the parent's example at ``position`` of ``epoch``'s
  permutation (:func:`epoch_permutation`)."""

  def __init__(self, parent: grain.MapDataset, seed: int, num_epochs: int):
    super().__init__(parent)
    self._n, self._seed, self._epochs = len(parent), seed, num_epochs

  def __len__(self) -> int:
    return self._n * self._epochs

  def _permutation(self, epoch: int) -> np.ndarray:
    return _cached_permutation(self._seed, epoch, self._n)

  def _source_index(self, index: int) -> int:
    epoch, position = divmod(int(index), self._n)
    return int(self._permutation(epoch)[position])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._source_index(index)]

  def _getitems(self, indices):
    return self._parent._getitems([self._source_index(i) for i in indices])  # pylint: disable=protected-access


@functools.lru_cache(maxsize=4)
def _cached_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return epoch_permutation(seed, epoch, n)


@dataclasses.dataclass(frozen=True)
class _SeededTransform(grain.transforms.MapWithIndex):
  """Applies a ``RandomMap`` with the generator of ``(seed, epoch, position)``, where the
  element's flat index is ``epoch * n + position``: index-pure, host-independent randomness."""
  transform: grain.transforms.RandomMap
  seed: int
  n: int

  def map_with_index(self, index: int, element):
    epoch, position = divmod(int(index), self.n)
    return self.transform.random_map(element, example_rng(self.seed, epoch, position))


class _HostBatches(grain.MapDataset):
  """Element ``step``: this host's rows of global batch ``step``, stacked."""

  def __init__(self, records: grain.MapDataset, plan: TrainPlan, num_steps: int):
    super().__init__(records)
    self._plan, self._steps = plan, num_steps

  def __len__(self) -> int:
    return self._steps

  def __getitem__(self, step):
    if isinstance(step, slice):
      return self.slice(step)
    epoch, positions = self._plan.host_positions(step)
    out = self._parent._getitems([int(epoch * self._plan.num_examples + p) for p in positions])  # pylint: disable=protected-access
    return _stack(out)


def _stack(records) -> dict:
  return {
      'image': np.stack([x for x, _ in records]).astype(np.float32, copy=False),
      'label': np.asarray([y for _, y in records], np.int32)
  }


def _iterate(ds: grain.MapDataset, worker_count: int, threads: int, prefetch: int):
  threads = max(1, int(threads))
  it_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, int(prefetch))))
  if worker_count:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; a library caller may not parse any
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count)))
  return it_ds


def train_pipeline(source, plan: TrainPlan, *, seed: int, augment: str, image_size: int,
                   resize_size: Optional[int] = None, start_step: int = 0,
                   num_steps: Optional[int] = None, worker_count: int = 0, threads: int = 1,
                   prefetch: int = 2) -> grain.IterDataset:
  """The training batches ``start_step, start_step + 1, ...`` of this host.

  Each element is ``{'image': float32 (b, H, W, 3) in [0, 1], 'label': int32 (b,)}`` with
  ``b`` this host's rows of the step's global batch (see :class:`TrainPlan`).
  ``num_steps`` (default: one epoch from ``start_step``) bounds the iteration;
  ``worker_count`` grain worker processes (0: the calling process) each build whole
  batches, ``threads`` threads per process read ahead, ``prefetch`` batches deep.
  """
  if len(source) != plan.num_examples:
    raise ValueError(f'the plan is for {plan.num_examples} examples, the source has '
                     f'{len(source)}')
  seed = _seed_int(seed)
  num_steps = plan.steps_per_epoch if num_steps is None else int(num_steps)
  stop = start_step + num_steps
  epochs = -(-stop // plan.steps_per_epoch)
  records = _EpochShuffle(grain.MapDataset.source(source), seed, epochs).map_with_index(
      _SeededTransform(TrainTransform(augment, image_size, resize_size), seed, plan.num_examples))
  batches = _HostBatches(records, plan, stop)[start_step:stop]
  return _iterate(batches, worker_count, threads, prefetch)


class _PaddedBatches(grain.MapDataset):
  """Element ``k``: this host's rows of evaluation batch ``k``; rows past the end are zero
  images with ``mask`` 0."""

  def __init__(self, records: grain.MapDataset, global_batch_size: int, rows: range,
               image_shape: tuple[int, int, int]):
    super().__init__(records)
    self._b, self._rows, self._shape = global_batch_size, rows, image_shape

  def __len__(self) -> int:
    return -(-len(self._parent) // self._b)

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    positions = [k * self._b + r for r in self._rows]
    real = [p for p in positions if p < len(self._parent)]
    records = list(self._parent._getitems(real))  # pylint: disable=protected-access
    pad = len(positions) - len(real)
    records += [(np.zeros(self._shape, np.float32), 0)] * pad
    batch = _stack(records)
    batch['mask'] = np.asarray([1.0] * len(real) + [0.0] * pad, np.float32)
    return batch


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  return -(-num_examples // global_batch_size)


def eval_pipeline(source, global_batch_size: int, *, image_size: int, augment: str = 'none',
                  resize_size: Optional[int] = None, process_index: int = 0, process_count: int = 1,
                  worker_count: int = 0, threads: int = 1, prefetch: int = 2) -> grain.IterDataset:
  """Every example of ``source`` once, in order, in batches of ``global_batch_size`` (this
  host's rows); elements ``{'image', 'label', 'mask'}``, the last batch padded (mask 0).
  There are :func:`num_eval_batches` of them."""
  rows = host_rows(int(global_batch_size), process_index, process_count)
  records = grain.MapDataset.source(source).map(EvalTransform(augment, image_size, resize_size))
  batches = _PaddedBatches(records, int(global_batch_size), rows, (image_size, image_size, 3))
  return _iterate(batches, worker_count, threads, prefetch)


class Batches:
  """An iterator over a grain dataset that can be closed (stops worker processes) and knows
  its length."""

  def __init__(self, dataset: grain.IterDataset, length: int):
    self._it: Iterator = iter(dataset)
    self.num_batches = length

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._it)

  def __len__(self) -> int:
    return self.num_batches

  def close(self) -> None:
    close = getattr(self._it, 'close', None)
    if close is not None:
      close()
