"""From a config to train / val / test sources: the dataset registry and the validation split.

:func:`build_datasets` reads ``dataset`` (one of :data:`DATASETS`), ``data_dir``,
``folder_train`` / ``folder_test``, ``digits_classes``, ``val_fraction``, ``seed``,
``augment``, ``image_size`` and ``resize_size``. The validation set (``val_fraction > 0``)
is held out of the *training* split, deterministically for ``seed``; the test split is
only for reporting. :class:`Datasets` then builds the pipelines
(:mod:`twins_jax.data.pipeline`) for its splits.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any, Optional

import numpy as np

from twins_jax.data import pipeline, sources
from twins_jax.data.transforms import AUGMENTATIONS, default_resize_size
from twins_jax.errors import ConfigError, DataError

# TFDS name -> (training splits, test split). DTD's official split 1 has train, validation and
# test of 1880 images each; train + validation is the training pool.
TFDS_DATASETS = {
    'cifar10': (('train',), 'test'),
    'cifar100': (('train',), 'test'),
    'caltech_birds2011': (('train',), 'test'),
    'stanford_dogs': (('train',), 'test'),
    'dtd': (('train', 'validation'), 'test'),
}
LOW_RES_DATASETS = ('cifar10', 'cifar100')
DATASETS = tuple(TFDS_DATASETS) + ('folder', 'digits')
_TAG_VAL_SPLIT = 0x7661


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, val indices), both sorted; ``round(val_fraction * n)`` validation
  examples (at least one when ``val_fraction > 0``), a function of ``(n, val_fraction, seed)``."""
  check_val_fraction(val_fraction)
  n_val = int(round(val_fraction * n))
  if val_fraction > 0:
    n_val = max(n_val, 1)
  if n_val >= n:
    raise DataError(f'val_fraction={val_fraction} leaves no training examples out of {n}; '
                    'lower it')
  perm = np.random.default_rng([_TAG_VAL_SPLIT, pipeline._seed_int(seed)]).permutation(n)  # pylint: disable=protected-access
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def check_val_fraction(val_fraction: float) -> None:
  if (isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or
      not 0.0 <= float(val_fraction) < 0.5):
    raise ConfigError(f'val_fraction must be in [0, 0.5), got {val_fraction!r} (it is the '
                      'fraction of the training set held out to choose the best checkpoint)')


@dataclasses.dataclass
class Datasets:
  """Train / val / test sources and how to read them."""
  name: str
  train: Any
  val: Optional[Any]
  test: Any
  num_classes: int
  image_size: int
  resize_size: int
  augment: str
  seed: int
  val_fraction: float
  class_names: Optional[list] = None
  origin: str = ''

  def _split(self, split: str):
    if split not in ('val', 'test', 'train'):
      raise ValueError(f"split must be 'val', 'test' or 'train', got {split!r}")
    source = getattr(self, split)
    if source is None:
      raise DataError(f'there is no {split} split (val_fraction={self.val_fraction})')
    return source

  def train_plan(self, global_batch_size: int, *, last_batch: str = 'partial',
                 process_index: int = 0, process_count: int = 1,
                 shard_multiple: Optional[int] = None) -> pipeline.TrainPlan:
    return pipeline.TrainPlan(len(self.train), int(global_batch_size), last_batch, process_index,
                              process_count, shard_multiple)

  def train_batches(self, plan: pipeline.TrainPlan, *, seed: Optional[int] = None,
                    start_step: int = 0, num_steps: Optional[int] = None,
                    **options) -> pipeline.Batches:
    """This host's training batches from ``start_step`` (see :func:`pipeline.train_pipeline`;
    ``options``: ``worker_count``, ``threads``, ``prefetch``)."""
    num_steps = plan.steps_per_epoch if num_steps is None else num_steps
    ds = pipeline.train_pipeline(self.train, plan, seed=self.seed if seed is None else seed,
                                 augment=self.augment, image_size=self.image_size,
                                 resize_size=self.resize_size, start_step=start_step,
                                 num_steps=num_steps, **options)
    return pipeline.Batches(ds, num_steps)

  def eval_batches(self, split: str, global_batch_size: int, process_index: int = 0,
                   process_count: int = 1, source=None, **options) -> pipeline.Batches:
    """This host's evaluation batches of ``split`` (or of ``source``, e.g. a subset of it),
    every example once, the last batch padded and masked."""
    source = self._split(split) if source is None else source
    ds = pipeline.eval_pipeline(source, global_batch_size, augment=self.augment,
                                image_size=self.image_size, resize_size=self.resize_size,
                                process_index=process_index, process_count=process_count, **options)
    return pipeline.Batches(ds, pipeline.num_eval_batches(len(source), global_batch_size))

  def describe(self) -> str:
    n_val = 0 if self.val is None else len(self.val)
    val = (f'val {n_val} (held out of the training split, val_fraction={self.val_fraction}, '
           f'seed={self.seed}; chooses best_model)'
           if n_val else 'no validation split (the reference protocol: every training image)')
    lines = [
        f'dataset {self.name}: {self.num_classes} classes; {self.origin}',
        f'  train {len(self.train)} | {val} | test {len(self.test)} (reporting only)',
        f'  images {self.image_size}x{self.image_size}x3 float32 in [0, 1]; augment='
        f'{self.augment!r}' + (f' (resize {self.resize_size}, crop {self.image_size})'
                               if self.augment == 'imagenet' else ''),
    ]
    return '\n'.join(lines)


def _cfg(config: Any, name: str, default: Any = None) -> Any:
  """``config[name]``, or ``default`` where it is absent or None."""
  if config is None:
    return default
  value = config.get(name, default) if hasattr(config, 'get') else getattr(config, name, default)
  return default if value is None else value


def build_datasets(config: Any) -> Datasets:
  """Train / val / test sources from ``config`` (an ``ml_collections.ConfigDict`` or dict).

  Fields (defaults): ``dataset`` (required; one of :data:`DATASETS`), ``data_dir`` (None: TFDS's
  default), ``folder_train`` / ``folder_test`` (for ``'folder'``), ``val_fraction`` (0: none),
  ``seed`` (0), ``digits_classes`` (None: all ten), ``augment`` ('cifar' for CIFAR, 'imagenet'
  for the high-resolution and folder datasets, 'none' for digits), ``image_size`` (32 for CIFAR
  and digits, 224 otherwise), ``resize_size`` (256 for 224, in proportion otherwise),
  ``skip_bad_images`` (False: an unreadable image is an error naming it).
  """
  name = _cfg(config, 'dataset')
  if name not in DATASETS:
    raise ConfigError(f'unknown dataset {name!r}; valid datasets: {", ".join(DATASETS)}')
  val_fraction = _cfg(config, 'val_fraction', 0.0)
  check_val_fraction(val_fraction)
  val_fraction = float(val_fraction)
  seed = pipeline._seed_int(_cfg(config, 'seed', 0))  # pylint: disable=protected-access

  low_res = name in LOW_RES_DATASETS or name == 'digits'
  image_size = int(_cfg(config, 'image_size', 32 if low_res else 224))
  augment = _cfg(
      config, 'augment',
      'cifar' if name in LOW_RES_DATASETS else 'none' if name == 'digits' else 'imagenet')
  if augment not in AUGMENTATIONS:
    raise ConfigError(f'unknown augment {augment!r}; valid: {", ".join(AUGMENTATIONS)}')
  resize_size = int(_cfg(config, 'resize_size', default_resize_size(image_size)))
  if augment == 'imagenet' and resize_size < image_size:
    raise ConfigError(f'resize_size ({resize_size}) must be >= image_size ({image_size})')

  if name in TFDS_DATASETS:
    data_dir = _cfg(config, 'data_dir')
    data_dir = os.path.expanduser(str(data_dir)) if data_dir else None
    train_splits, test_split = TFDS_DATASETS[name]
    parts = [sources.TfdsSource(name, s, data_dir) for s in train_splits]
    pool = parts[0] if len(parts) == 1 else sources.ConcatSource(parts)
    test = sources.TfdsSource(name, test_split, data_dir)
    num_classes, class_names = parts[0].num_classes, parts[0].class_names
    origin = (f"TFDS '{name}' ({'+'.join(train_splits)} / {test_split}) from "
              f"{data_dir or 'the default TFDS data_dir'}")
  elif name == 'folder':
    train_root, test_root = _cfg(config, 'folder_train'), _cfg(config, 'folder_test')
    for field, root in (('folder_train', train_root), ('folder_test', test_root)):
      if not root:
        raise ConfigError(f"dataset 'folder' needs config.{field} (a folder of class "
                          'subfolders of images)')
      if not os.path.isdir(os.path.expanduser(str(root))):
        raise DataError(f'config.{field}={root!r} is not an existing directory')
    skip = bool(_cfg(config, 'skip_bad_images', False))
    pool = sources.FolderSource(os.path.expanduser(str(train_root)), skip_unreadable=skip)
    test = sources.FolderSource(os.path.expanduser(str(test_root)), classes=pool.class_names,
                                skip_unreadable=skip)
    num_classes, class_names = pool.num_classes, pool.class_names
    origin = f'image folders {train_root} / {test_root}'
  else:  # digits
    classes = _cfg(config, 'digits_classes')
    classes = None if classes is None else [int(c) for c in classes]
    pool, test = sources.digits_splits(size=image_size, classes=classes)
    num_classes, class_names = pool.num_classes, pool.class_names
    origin = (f'scikit-learn digits, classes {classes if classes is not None else "0-9"} '
              f'relabelled 0..{num_classes - 1}, 8x8 upsampled (nearest) to {image_size}, '
              f'fixed test split ({sources.DIGITS_TEST_FRACTION:.0%})')

  if num_classes is None:
    raise DataError(f'cannot tell the number of classes of {name!r}')
  for split, source in (('training', pool), ('test', test)):
    if len(source) == 0:
      raise DataError(f'the {split} split of {name!r} is empty ({origin}); point the config at '
                      'a prepared dataset with examples in it')
  train_idx, val_idx = split_train_val(len(pool), val_fraction, seed)
  train = sources.SubsetSource(pool, train_idx)
  val = sources.SubsetSource(pool, val_idx) if len(val_idx) else None
  return Datasets(name=name, train=train, val=val, test=test, num_classes=int(num_classes),
                  image_size=image_size, resize_size=resize_size, augment=augment, seed=seed,
                  val_fraction=val_fraction, class_names=class_names, origin=origin)
