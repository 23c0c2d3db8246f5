"""Deterministic, resumable, multi-host input pipeline (numpy batches, no TensorFlow).

Sources are random-access sequences: ``len(source)`` and ``source[i] -> (image, label)``
with ``image`` a ``uint8`` array ``HxWx3`` and ``label`` a Python ``int``:

* :class:`TfdsSource`: a prepared TFDS dataset read through ``tfds.data_source`` (ArrayRecord
  files, decoded with PIL; TensorFlow is *not* needed to read). ``cifar10``, ``cifar100``,
  ``caltech_birds2011`` (CUB-200), ``stanford_dogs``, ``dtd``.
* :class:`FolderSource`: ``root/<class_name>/<image files>`` (classes sorted by name), e.g.
  Caltech-256 split into train/test folders.
* :class:`ArraySource`: images and labels held in memory.
* :func:`digits_source`: scikit-learn's 8x8 handwritten digits, optionally on a subset of the
  classes (relabelled ``0..k-1``) and upsampled with nearest neighbour.

:func:`build_datasets` turns a config into train / val / test sources. The validation set is
held out of the *training* split (deterministic for ``config.seed``) and is what checkpoint
selection must use; the test split is only for reporting.

:class:`TrainLoader` makes batch ``k`` of the run a pure function of ``(seed, k)``: epoch
``e = k // steps_per_epoch`` visits the training set in the order of a permutation drawn from
``(seed, e)``, and every random augmentation of an example is drawn from a numpy ``Generator``
seeded with ``(seed, e, position of the example in the epoch)``. The number of hosts, the
number of worker threads and restarts therefore change nothing, and the step number alone is
the pipeline's position for checkpoint/resume. Each host gets the contiguous rows
``[i * B / P, (i + 1) * B / P)`` of the global batch (what ``parallel.shard_batch`` expects).

:func:`eval_batches` visits every example exactly once, in order, padding the last batch to the
full size with a ``mask`` (1 real, 0 padding) so that shapes stay static.

Augmentations (``augment``):

* ``'cifar'``: train: zero-pad 4 pixels on each side, random crop back to the image size, then
  horizontal flip with probability 1/2; test: none.
* ``'imagenet'``: train: resize the shorter side to ``resize_size`` (bilinear with antialiasing,
  like torchvision on PIL images), ``RandomResizedCrop(image_size)`` (scale (0.08, 1), ratio
  (3/4, 4/3), 10 tries then torchvision's central fallback), horizontal flip; test: resize the
  shorter side to ``resize_size``, center crop ``image_size``.
* ``'none'``: no augmentation (images whose size is not ``image_size`` are resized to it).

Random draws for one training example, in order (see :func:`example_rng`): ``'cifar'``: top
offset ``integers(0, 2 * pad + 1)``, left offset ``integers(0, 2 * pad + 1)``, flip
``random() < 0.5``; ``'imagenet'``: up to 10 tries of (``uniform(*scale)``,
``uniform(log ratio_min, log ratio_max)``, and on success ``integers(0, H - h + 1)``,
``integers(0, W - w + 1)``), then flip ``random() < 0.5``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import numbers
import os
import queue
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# Dataset registry.

# TFDS name -> (training splits, test split). DTD's official split 1 has train, validation and
# test of 1880 images each; train + validation is the training pool (our own validation set is
# held out of it, like for every other dataset).
TFDS_DATASETS = {
    'cifar10': (('train',), 'test'),
    'cifar100': (('train',), 'test'),
    'caltech_birds2011': (('train',), 'test'),
    'stanford_dogs': (('train',), 'test'),
    'dtd': (('train', 'validation'), 'test'),
}
LOW_RES_DATASETS = ('cifar10', 'cifar100')
DATASETS = tuple(TFDS_DATASETS) + ('folder', 'digits')
AUGMENTATIONS = ('cifar', 'imagenet', 'none')

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm',
                    '.pgm', '.pbm')

CIFAR_PAD = 4
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)

# Fixed seed of the digits train/test split: the test set must not move with the run's seed.
DIGITS_SPLIT_SEED = 20230
DIGITS_TEST_FRACTION = 0.25

# Stream tags that keep the independent random streams apart.
_TAG_VAL_SPLIT = 0x7661
_TAG_EPOCH_PERM = 0x7065
_TAG_AUGMENT = 0x6175


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not prepared (as ArrayRecord) in the data directory."""


# --------------------------------------------------------------------------------------------
# Sources.

def _to_rgb(image: Any) -> np.ndarray:
  """``uint8`` HxWx3 from HxW, HxWx1, HxWx3 or HxWx4 (alpha dropped)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise TypeError(f'images must be uint8, got {image.dtype}')
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3:
    raise ValueError(f'expected an HxWxC image, got shape {image.shape}')
  channels = image.shape[-1]
  if channels == 1:
    image = np.repeat(image, 3, axis=-1)
  elif channels == 4:
    image = image[:, :, :3]
  elif channels != 3:
    raise ValueError(f'expected 1, 3 or 4 channels, got shape {image.shape}')
  return image


class ArraySource:
  """Images (``uint8``, NxHxW, NxHxWx1 or NxHxWx3, or a list of HxWxC arrays) and labels.

  ``nearest_size`` upsamples each image on access (nearest neighbour) to that square size.
  """

  def __init__(self, images: Any, labels: Sequence[int], num_classes: Optional[int] = None,
               class_names: Optional[Sequence[str]] = None, nearest_size: Optional[int] = None):
    if len(images) != len(labels):
      raise ValueError(f'{len(images)} images but {len(labels)} labels')
    self.images = images
    self.labels = np.asarray(labels, np.int64)
    if num_classes is None:
      num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
    self.num_classes = int(num_classes)
    self.class_names = None if class_names is None else list(class_names)
    self.nearest_size = nearest_size

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    image = _to_rgb(self.images[i])
    if self.nearest_size is not None and image.shape[:2] != (self.nearest_size,) * 2:
      image = upsample_nearest(image[None], self.nearest_size)[0]
    return image, int(self.labels[i])

  def __repr__(self) -> str:
    return f'ArraySource({len(self)} examples)'


class SubsetSource:
  """The examples ``indices`` of ``source`` (in that order)."""

  def __init__(self, source, indices: Sequence[int]):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(source)):
      raise IndexError('subset indices out of range')
    self.num_classes = getattr(source, 'num_classes', None)
    self.class_names = getattr(source, 'class_names', None)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    return self.source[int(self.indices[i])]

  def __repr__(self) -> str:
    return f'SubsetSource({len(self)} of {self.source!r})'


class ConcatSource:
  """Several sources one after the other."""

  def __init__(self, sources: Sequence[Any]):
    self.sources = list(sources)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
    self.num_classes = getattr(self.sources[0], 'num_classes', None)
    self.class_names = getattr(self.sources[0], 'class_names', None)

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(i)
    k = int(np.searchsorted(self.offsets, i, side='right')) - 1
    return self.sources[k][i - int(self.offsets[k])]

  def __repr__(self) -> str:
    return f'ConcatSource({", ".join(repr(s) for s in self.sources)})'


def _prepare_command(name: str, data_dir: Optional[str]) -> str:
  dir_arg = repr(str(data_dir)) if data_dir else 'None'
  return ('pip install tensorflow-cpu  # needed to prepare, not to train\n'
          'python -c "import tensorflow_datasets as tfds; '
          f"tfds.builder('{name}', data_dir={dir_arg}, file_format='array_record')"
          '.download_and_prepare()"')


def _not_prepared_message(name: str, split: str, data_dir: Optional[str],
                          error: Exception) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets (the default)'
  lines = [f"The TFDS dataset '{name}' (split '{split}') cannot be read from data_dir={where}."]
  manual = None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    manual = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
    if builder.is_prepared():
      lines.append(
          f'It is prepared at {builder.data_dir} but not in a random-access format (found '
          f'{builder.info.file_format}); this pipeline reads ArrayRecord files. Prepare it again '
          'with file_format="array_record" in another data_dir (or delete that folder first):')
    else:
      lines.append(f'It is not prepared there (nothing usable at {builder.data_dir}). '
                   'Prepare it once (this downloads it), on a machine with network access:')
  except Exception:  # pylint: disable=broad-except
    lines.append('Prepare it once (this downloads it), on a machine with network access:')
  lines.append(_prepare_command(name, data_dir))
  if manual:
    lines.append('This dataset needs a manual download: put the files in '
                 f'{os.path.join(str(data_dir or "~/tensorflow_datasets"), "downloads", "manual")} '
                 f'first. Instructions:\n{manual}')
  lines.append('Then pass that data_dir as config.data_dir. Nothing is ever downloaded at '
               'training time.')
  lines.append(f'(underlying error: {type(error).__name__}: {error})')
  return '\n'.join(lines)


class TfdsSource:
  """One split of a prepared TFDS dataset, read with ``tfds.data_source`` (no TensorFlow).

  The dataset must have been prepared as ArrayRecord (``file_format='array_record'``); this
  never downloads or prepares anything.
  """

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None,
               image_key: str = 'image', label_key: str = 'label'):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"Reading the TFDS dataset '{name}' needs tensorflow-datasets "
                        '(pip install tensorflow-datasets); TensorFlow is not needed.') from e
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.label_key = image_key, label_key
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
      self._length = len(self._ds)
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetNotPreparedError(_not_prepared_message(name, split, data_dir, e)) from e
    feature = None
    try:
      feature = self._ds.dataset_info.features[label_key]
    except Exception:  # pylint: disable=broad-except
      pass
    self.num_classes = getattr(feature, 'num_classes', None)
    names = getattr(feature, 'names', None)
    self.class_names = list(names) if names else None

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    example = self._ds[int(i)]
    return _to_rgb(example[self.image_key]), int(example[self.label_key])

  def __repr__(self) -> str:
    return f"TfdsSource('{self.name}', split='{self.split}', {len(self)} examples)"


def _is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def folder_classes(root: str) -> list[str]:
  """The class folders of ``root``, sorted by name."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'image folder {root!r} does not exist or is not a directory')
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
  if not classes:
    raise FileNotFoundError(f'image folder {root!r} has no class subfolders '
                            '(expected root/<class_name>/<image files>)')
  return classes


class FolderSource:
  """``root/<class_name>/*.{jpg,png,...}`` read with PIL and converted to RGB.

  Classes are the subfolders sorted by name (or ``classes``, e.g. the training folder's
  classes for the test folder), files sorted by path.
  """

  def __init__(self, root: str, classes: Optional[Sequence[str]] = None):
    self.root = str(root)
    found = folder_classes(self.root)
    if classes is None:
      classes = found
    else:
      classes = list(classes)
      unknown = sorted(set(found) - set(classes))
      if unknown:
        raise ValueError(f'{self.root!r} has classes that the training folder lacks: '
                         f'{unknown[:10]}')
    self.class_names = list(classes)
    self.num_classes = len(classes)
    files, labels = [], []
    for label, name in enumerate(classes):
      folder = os.path.join(self.root, name)
      if not os.path.isdir(folder):
        continue
      for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
          if _is_image_file(f):
            files.append(os.path.join(dirpath, f))
            labels.append(label)
    if not files:
      raise FileNotFoundError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) under '
                              f'{self.root!r}')
    self.files = files
    self.labels = np.asarray(labels, np.int64)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(self.files[i]) as img:
      image = np.asarray(img.convert('RGB'), np.uint8)
    return image, int(self.labels[i])

  def __repr__(self) -> str:
    return f'FolderSource({self.root!r}, {len(self)} images, {self.num_classes} classes)'


def upsample_nearest(images: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize of NxHxWxC images to ``size`` (PyTorch's 'nearest' rule)."""
  h, w = images.shape[1:3]
  rows = np.floor(np.arange(size) * (h / size)).astype(np.int64)
  cols = np.floor(np.arange(size) * (w / size)).astype(np.int64)
  return images[:, rows][:, :, cols]


def _check_digit_classes(classes: Optional[Sequence[int]]) -> Optional[list[int]]:
  if classes is None:
    return None
  try:
    classes = [int(c) for c in classes]
  except (TypeError, ValueError) as e:
    raise ValueError(f'digits_classes must be a list of digits 0..9, got {classes!r}') from e
  if not classes or len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes):
    raise ValueError(f'digits_classes must be distinct digits 0..9, got {classes}')
  return classes


def load_digits_arrays(classes: Optional[Sequence[int]] = None
                       ) -> tuple[np.ndarray, np.ndarray]:
  """All 1797 scikit-learn digits as ``uint8`` Nx8x8x3 images and their labels.

  The 17 grey levels 0..16 map to ``round(v * 255 / 16)``. ``classes`` keeps those digits and
  relabels ``classes[k] -> k`` (in the order given).
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  classes = _check_digit_classes(classes)
  digits = load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  images = np.repeat(images, 3, axis=-1)
  labels = digits.target.astype(np.int64)
  if classes is not None:
    keep = np.isin(labels, classes)
    images, labels = images[keep], _relabel(labels[keep], classes)
  return np.ascontiguousarray(images), labels


def _relabel(labels: np.ndarray, classes: list[int]) -> np.ndarray:
  table = np.full(10, -1, np.int64)
  table[classes] = np.arange(len(classes))
  return table[labels]


def digits_source(size: Optional[int] = None,
                  classes: Optional[Sequence[int]] = None) -> ArraySource:
  """All digits (see :func:`load_digits_arrays`), upsampled on access to ``size``."""
  classes = _check_digit_classes(classes)
  images, labels = load_digits_arrays(classes)
  names = [str(c) for c in (classes if classes is not None else range(10))]
  return ArraySource(images, labels, num_classes=len(names), class_names=names,
                     nearest_size=size)


def digits_splits(size: Optional[int] = None, classes: Optional[Sequence[int]] = None,
                  test_fraction: float = DIGITS_TEST_FRACTION) -> tuple[ArraySource, ArraySource]:
  """(train, test) digits. The test part is a fixed random subset of all 1797 digits that
  depends on no run seed; with ``classes`` both parts keep only those classes (so the test
  examples of a class are the same whichever subset it belongs to)."""
  classes = _check_digit_classes(classes)
  images, labels = load_digits_arrays(None)
  order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
  is_test = np.zeros(len(labels), bool)
  is_test[order[:int(round(test_fraction * len(labels)))]] = True
  keep = np.ones(len(labels), bool)
  names = [str(c) for c in range(10)]
  if classes is not None:
    keep = np.isin(labels, classes)
    labels = np.where(keep, _relabel(labels, classes), -1)
    names = [str(c) for c in classes]

  def make(sel):
    return ArraySource(images[sel], labels[sel], num_classes=len(names), class_names=names,
                       nearest_size=size)

  return make(keep & ~is_test), make(keep & is_test)


# --------------------------------------------------------------------------------------------
# Validation split.

def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, val indices), both sorted; ``round(val_fraction * n)`` validation
  examples (at least one when ``val_fraction > 0``), a function of ``(n, val_fraction, seed)``."""
  _check_val_fraction(val_fraction)
  n_val = int(round(val_fraction * n))
  if val_fraction > 0:
    n_val = max(n_val, 1)
  if n_val >= n:
    raise ValueError(f'val_fraction={val_fraction} leaves no training examples out of {n}')
  perm = np.random.default_rng([_TAG_VAL_SPLIT, _seed_int(seed)]).permutation(n)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _check_val_fraction(val_fraction: float) -> None:
  if (isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real)
      or not 0.0 <= float(val_fraction) < 0.5):
    raise ValueError(f'val_fraction must be in [0, 0.5), got {val_fraction!r} (it is the '
                     'fraction of the training set held out to choose the best checkpoint)')


def _seed_int(seed: Any) -> int:
  seed = int(seed)
  if seed < 0:
    raise ValueError(f'seeds must be non-negative integers, got {seed}')
  return seed


# --------------------------------------------------------------------------------------------
# Transforms (uint8 in, float32 in [0, 1] out).

def example_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
  """The generator for every random draw of the example at ``position`` of ``epoch``."""
  return np.random.default_rng([_TAG_AUGMENT, _seed_int(seed), int(epoch), int(position)])


def _pil_image(image: np.ndarray):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return Image.fromarray(np.ascontiguousarray(image))


def _resize_pil(pil, height: int, width: int):
  """Bilinear (antialiased) resize of a PIL image, as torchvision does for PIL images."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if pil.size == (width, height):
    return pil
  return pil.resize((width, height), Image.BILINEAR)


def _pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear (antialiased) resize of a uint8 array."""
  if image.shape[0] == height and image.shape[1] == width:
    return image
  return np.asarray(_resize_pil(_pil_image(image), height, width), np.uint8)


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """torchvision ``Resize(size)``'s output (height, width): the shorter side becomes ``size``,
  the longer one ``int(size * long / short)``."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision ``Resize(size)`` (bilinear) of a uint8 array."""
  return _pil_resize(image, *shorter_side_size(image.shape[0], image.shape[1], size))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision ``CenterCrop(size)`` (zero-pads first if the image is smaller)."""
  h, w = image.shape[:2]
  if h < size or w < size:
    ph, pw = max(size - h, 0), max(size - w, 0)
    image = np.pad(image, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
    h, w = image.shape[:2]
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def random_resized_crop_params(height: int, width: int, rng: np.random.Generator,
                               scale: tuple[float, float] = RRC_SCALE,
                               ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
  """torchvision ``RandomResizedCrop.get_params``: (top, left, h, w)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def cifar_crop_flip(image: np.ndarray, rng: np.random.Generator, pad: int = CIFAR_PAD) -> np.ndarray:
  """``RandomCrop(size, padding=pad)`` with zero padding, then a horizontal flip w.p. 1/2."""
  h, w = image.shape[:2]
  top = int(rng.integers(0, 2 * pad + 1))
  left = int(rng.integers(0, 2 * pad + 1))
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  out = padded[top:top + h, left:left + w]
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def default_resize_size(image_size: int) -> int:
  """256 for 224, in proportion otherwise."""
  return int(round(image_size * 256 / 224))


def transform(image: np.ndarray, *, train: bool, augment: str, image_size: int,
              resize_size: Optional[int] = None,
              rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """One example: ``uint8`` HxWx3 -> ``float32`` (image_size)x(image_size)x3 in [0, 1]."""
  if augment not in AUGMENTATIONS:
    raise ValueError(f'unknown augment {augment!r}; valid: {AUGMENTATIONS}')
  image = _to_rgb(image)
  if augment == 'imagenet':
    # Kept as a PIL image until the end (flips and copies of PIL images are cheap).
    from PIL import Image  # pylint: disable=g-import-not-at-top
    resize_size = resize_size or default_resize_size(image_size)
    height, width = shorter_side_size(image.shape[0], image.shape[1], resize_size)
    pil = _resize_pil(_pil_image(image), height, width)
    if train:
      top, left, h, w = random_resized_crop_params(height, width, rng)
      pil = _resize_pil(pil.crop((left, top, left + w, top + h)), image_size, image_size)
      if rng.random() < 0.5:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
      image = np.asarray(pil, np.uint8)
    elif height >= image_size and width >= image_size:
      top = int(round((height - image_size) / 2.0))
      left = int(round((width - image_size) / 2.0))
      image = np.asarray(pil.crop((left, top, left + image_size, top + image_size)), np.uint8)
    else:
      image = center_crop(np.asarray(pil, np.uint8), image_size)
  else:
    image = _pil_resize(image, image_size, image_size)
    if train and augment == 'cifar':
      image = cifar_crop_flip(image, rng)
  return image.astype(np.float32) / np.float32(255.0)  # like torchvision ToTensor


# --------------------------------------------------------------------------------------------
# Loaders.

def _host_rows(global_batch_size: int, process_index: int, process_count: int) -> range:
  if global_batch_size <= 0:
    raise ValueError(f'global_batch_size must be positive, got {global_batch_size}')
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f'bad process_index={process_index} / process_count={process_count}')
  if global_batch_size % process_count:
    raise ValueError(f'the global batch size {global_batch_size} must be divisible by the '
                     f'number of processes {process_count}')
  per_host = global_batch_size // process_count
  return range(process_index * per_host, (process_index + 1) * per_host)


def _default_workers(image_size: int, augment: str) -> int:
  if augment != 'imagenet' and image_size <= 64:
    return 1  # numpy on tiny images: threads would cost more than they save
  return max(1, min(16, (os.cpu_count() or 2) - 1))


def _produce(make: Callable[[int], Any], steps: Iterator[int], out: queue.Queue,
             stop: threading.Event) -> None:
  def put(item) -> bool:
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  try:
    for k in steps:
      if stop.is_set() or not put(('ok', make(k))):
        return
    put(('end', None))
  except BaseException as e:  # pylint: disable=broad-except
    put(('error', e))


class _Prefetcher:
  """Runs ``make(k)`` for ``k`` in ``steps`` on a background thread, ``depth`` ahead.

  The thread starts at once (so the first batches are ready early) and stops when the
  iteration ends, is closed or is garbage-collected.
  """

  def __init__(self, make: Callable[[int], Any], steps: Iterator[int], depth: int):
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=_produce, args=(make, steps, self._queue, self._stop),
                                     daemon=True, name='twins-data-prefetch')
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._stop.is_set():
      raise StopIteration
    kind, value = self._queue.get()
    if kind == 'ok':
      return value
    self.close()
    if kind == 'error':
      raise value
    raise StopIteration

  def close(self) -> None:
    self._stop.set()
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=10)

  def __del__(self):
    self._stop.set()


class _Batcher:
  """Shared machinery: decoding + transforms on a deterministic ordered thread pool."""

  def __init__(self, source, augment: str, image_size: int, resize_size: Optional[int],
               num_workers: Optional[int], prefetch: int):
    if augment not in AUGMENTATIONS:
      raise ValueError(f'unknown augment {augment!r}; valid: {AUGMENTATIONS}')
    if image_size is None or int(image_size) <= 0:
      raise ValueError(f'image_size must be a positive int, got {image_size!r}')
    self.source = source
    self.augment = augment
    self.image_size = int(image_size)
    self.resize_size = int(resize_size) if resize_size else default_resize_size(self.image_size)
    self.num_workers = int(num_workers) if num_workers else _default_workers(self.image_size,
                                                                              augment)
    self.prefetch = int(prefetch)
    self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
    self._pool_lock = threading.Lock()

  def _map(self, fn, items):
    if self.num_workers <= 1 or len(items) <= 1:
      return [fn(item) for item in items]
    with self._pool_lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers,
                                                           thread_name_prefix='twins-data')
      pool = self._pool
    return list(pool.map(fn, items))  # ordered: the result does not depend on scheduling

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True)
      self._pool = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _empty_image(self) -> np.ndarray:
    return np.zeros((self.image_size, self.image_size, 3), np.float32)


LAST_BATCH = ('partial', 'drop')


class TrainLoader(_Batcher):
  """Training batches as a pure function of ``(seed, step)``; this host's rows only.

  Step ``k`` is batch ``k % steps_per_epoch`` of epoch ``k // steps_per_epoch``; the epoch's
  order is a permutation drawn from ``(seed, epoch)``. ``last_batch`` says what happens to the
  ``len(source) % global_batch_size`` examples left at the end of an epoch:

  * ``'partial'`` (the reference: PyTorch's ``DataLoader(drop_last=False)``): they form a last,
    shorter batch, so an epoch is ``ceil(len / B)`` steps and sees every example once (a
    lone leftover example is dropped: a batch of one can be neither split into a Frozen and
    an Adaptive half nor batch-normalised);
  * ``'drop'``: they are skipped this epoch (``len // B`` steps of one static shape).

  ``shard_multiple`` is the number of devices a batch is split over. A partial batch whose
  size it does not divide cannot be sharded; every host then reads all of its rows (it is
  computed replicated, see :meth:`sharded`).
  """

  def __init__(self, source, global_batch_size: int, seed: int, augment: str = 'none',
               image_size: Optional[int] = None, process_index: int = 0, process_count: int = 1,
               last_batch: str = 'partial', *, resize_size: Optional[int] = None,
               num_workers: Optional[int] = None, prefetch: int = 2,
               shard_multiple: Optional[int] = None):
    if image_size is None:
      first, _ = source[0]
      image_size = first.shape[0]
    super().__init__(source, augment, image_size, resize_size, num_workers, prefetch)
    if last_batch not in LAST_BATCH:
      raise ValueError(f'last_batch must be one of {LAST_BATCH}, got {last_batch!r}')
    self.global_batch_size = int(global_batch_size)
    self.rows = _host_rows(self.global_batch_size, process_index, process_count)
    self.process_index, self.process_count = process_index, process_count
    self.shard_multiple = int(shard_multiple or process_count)
    if self.shard_multiple % process_count:
      raise ValueError(f'shard_multiple ({self.shard_multiple}) must be a multiple of the '
                       f'number of processes ({process_count})')
    self.seed = _seed_int(seed)
    self.last_batch = last_batch
    self.num_examples = len(source)
    if self.num_examples == 0:
      raise ValueError('the training source is empty')
    if last_batch == 'drop' and self.num_examples < self.global_batch_size:
      raise ValueError(f'the training set ({self.num_examples} examples) is smaller than one '
                       f'batch ({self.global_batch_size}); use last_batch="partial" or a '
                       'smaller batch')
    self._perms: dict[int, np.ndarray] = {}
    self._perm_lock = threading.Lock()

  @property
  def steps_per_epoch(self) -> int:
    full, rest = divmod(self.num_examples, self.global_batch_size)
    return full + (self.last_batch == 'partial' and rest >= 2)

  def batch_size_at(self, step: int) -> int:
    """The global size of batch ``step`` (smaller only for a partial last batch)."""
    k = int(step) % self.steps_per_epoch
    return min(self.global_batch_size, self.num_examples - k * self.global_batch_size)

  def sharded(self, step: int) -> bool:
    """Whether batch ``step`` splits evenly over ``shard_multiple`` devices (else every host
    reads the whole batch and it is computed replicated)."""
    return self.batch_size_at(step) % self.shard_multiple == 0

  def _host_rows_at(self, step: int) -> range:
    size = self.batch_size_at(step)
    if size == self.global_batch_size:
      return self.rows
    if not self.sharded(step):
      return range(size)
    return _host_rows(size, self.process_index, self.process_count)

  @property
  def local_batch_size(self) -> int:
    return len(self.rows)

  def permutation(self, epoch: int) -> np.ndarray:
    """The order in which ``epoch`` visits the source."""
    with self._perm_lock:
      perm = self._perms.get(epoch)
      if perm is None:
        rng = np.random.default_rng([_TAG_EPOCH_PERM, self.seed, int(epoch)])
        perm = rng.permutation(self.num_examples)
        if len(self._perms) >= 4:
          self._perms.pop(next(iter(self._perms)))
        self._perms[epoch] = perm
      return perm

  def _positions(self, step: int) -> tuple[int, np.ndarray]:
    if step < 0:
      raise ValueError(f'step must be non-negative, got {step}')
    epoch, k = divmod(int(step), self.steps_per_epoch)
    positions = k * self.global_batch_size + np.asarray(self._host_rows_at(step), np.int64)
    return epoch, positions

  def indices(self, step: int) -> np.ndarray:
    """The source indices of this host's rows of batch ``step``."""
    epoch, positions = self._positions(step)
    return self.permutation(epoch)[positions]

  def batch(self, step: int) -> dict:
    """This host's share of global batch ``step``: ``image`` float32 NHWC, ``label`` int32."""
    epoch, positions = self._positions(step)
    perm = self.permutation(epoch)

    def one(position):
      image, label = self.source[int(perm[position])]
      rng = example_rng(self.seed, epoch, position)
      return transform(image, train=True, augment=self.augment, image_size=self.image_size,
                       resize_size=self.resize_size, rng=rng), label

    out = self._map(one, [int(p) for p in positions])
    return {'image': np.stack([x for x, _ in out]).astype(np.float32, copy=False),
            'label': np.asarray([y for _, y in out], np.int32)}

  def iterate(self, start_step: int = 0, num_steps: Optional[int] = None) -> Iterator[dict]:
    """Batches ``start_step, start_step + 1, ...`` (forever if ``num_steps`` is None),
    prepared ``prefetch`` steps ahead on a background thread (call ``.close()`` on the
    returned iterator, or drop it, to stop early)."""
    if num_steps is None:
      steps = _count(start_step)
    else:
      steps = iter(range(start_step, start_step + int(num_steps)))
    return _Prefetcher(self.batch, steps, self.prefetch)

  def __repr__(self) -> str:
    return (f'TrainLoader({len(self.source)} examples, global batch {self.global_batch_size}, '
            f'{self.steps_per_epoch} steps/epoch, augment={self.augment!r}, '
            f'image_size={self.image_size}, host {self.process_index}/{self.process_count})')


def _count(start: int) -> Iterator[int]:
  k = int(start)
  while True:
    yield k
    k += 1


class EvalBatches(_Batcher):
  """Every example once, in order; the last batch padded, with a ``mask``. Iterable (again)."""

  def __init__(self, source, global_batch_size: int, image_size: int, augment: str = 'none',
               process_index: int = 0, process_count: int = 1, *,
               resize_size: Optional[int] = None, num_workers: Optional[int] = None,
               prefetch: int = 2):
    super().__init__(source, augment, image_size, resize_size, num_workers, prefetch)
    self.global_batch_size = int(global_batch_size)
    self.rows = _host_rows(self.global_batch_size, process_index, process_count)
    self.process_index, self.process_count = process_index, process_count
    self.num_examples = len(source)

  @property
  def num_batches(self) -> int:
    return -(-self.num_examples // self.global_batch_size)

  def __len__(self) -> int:
    return self.num_batches

  def batch(self, k: int) -> dict:
    """This host's share of eval batch ``k``: ``image``, ``label`` (int32), ``mask`` (float32)."""
    if not 0 <= k < self.num_batches:
      raise IndexError(f'eval batch {k} out of range [0, {self.num_batches})')
    positions = [k * self.global_batch_size + r for r in self.rows]

    def one(position):
      if position >= self.num_examples:
        return self._empty_image(), 0, 0.0
      image, label = self.source[position]
      return transform(image, train=False, augment=self.augment, image_size=self.image_size,
                       resize_size=self.resize_size), label, 1.0

    out = self._map(one, positions)
    return {'image': np.stack([x for x, _, _ in out]).astype(np.float32, copy=False),
            'label': np.asarray([y for _, y, _ in out], np.int32),
            'mask': np.asarray([m for _, _, m in out], np.float32)}

  def __iter__(self) -> Iterator[dict]:
    return _Prefetcher(self.batch, iter(range(self.num_batches)), self.prefetch)

  def __repr__(self) -> str:
    return (f'EvalBatches({self.num_examples} examples, {self.num_batches} batches of '
            f'{self.global_batch_size}, host {self.process_index}/{self.process_count})')


def eval_batches(source, global_batch_size: int, image_size: int, augment: str = 'none',
                 process_index: int = 0, process_count: int = 1, **kwargs) -> EvalBatches:
  """Evaluation batches of ``source`` (test transform of ``augment``); see :class:`EvalBatches`."""
  return EvalBatches(source, global_batch_size, image_size, augment, process_index,
                     process_count, **kwargs)


# --------------------------------------------------------------------------------------------
# Config -> datasets.

def _cfg(config: Any, name: str, default: Any = None, none_is_default: bool = True) -> Any:
  if config is None:
    return default
  if isinstance(config, dict) or hasattr(config, 'get'):
    value = config.get(name, default)
  else:
    value = getattr(config, name, default)
  if value is None and none_is_default:
    return default
  return value


@dataclasses.dataclass
class Datasets:
  """Train / val / test sources and what the loaders need to read them."""
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

  def train_loader(self, global_batch_size: int, seed: Optional[int] = None,
                   process_index: int = 0, process_count: int = 1,
                   last_batch: str = 'partial', **kwargs) -> TrainLoader:
    return TrainLoader(self.train, global_batch_size, self.seed if seed is None else seed,
                       self.augment, self.image_size, process_index, process_count,
                       last_batch, resize_size=self.resize_size, **kwargs)

  def eval_batches(self, split: str, global_batch_size: int, process_index: int = 0,
                   process_count: int = 1, **kwargs) -> EvalBatches:
    if split not in ('val', 'test', 'train'):
      raise ValueError(f"split must be 'val', 'test' or 'train', got {split!r}")
    source = getattr(self, split)
    if source is None:
      raise ValueError(f'there is no {split} split (val_fraction={self.val_fraction})')
    return EvalBatches(source, global_batch_size, self.image_size, self.augment, process_index,
                       process_count, resize_size=self.resize_size, **kwargs)

  def describe(self) -> str:
    n_val = 0 if self.val is None else len(self.val)
    lines = [
        f'dataset {self.name}: {self.num_classes} classes; {self.origin}',
        f'  train {len(self.train)} | val {n_val} (held out of the training split, '
        f'val_fraction={self.val_fraction}, seed={self.seed}; used for checkpoint selection) '
        f'| test {len(self.test)} (reporting only)',
        f'  images {self.image_size}x{self.image_size}x3 float32 in [0, 1]; augment='
        f'{self.augment!r}' + (f' (resize {self.resize_size}, crop {self.image_size})'
                               if self.augment == 'imagenet' else ''),
    ]
    return '\n'.join(lines)


def build_datasets(config: Any) -> Datasets:
  """Train / val / test sources from ``config`` (an ``ml_collections.ConfigDict`` or dict).

  Fields (defaults): ``dataset`` (required; one of :data:`DATASETS`), ``data_dir`` (None: TFDS's
  default), ``folder_train`` / ``folder_test`` (for ``'folder'``), ``val_fraction`` (0: none),
  ``seed`` (0), ``digits_classes`` (None: all ten), ``augment`` ('cifar' for CIFAR, 'imagenet'
  for the high-resolution and folder datasets, 'none' for digits), ``image_size`` (32 for CIFAR
  and digits, 224 otherwise), ``resize_size`` (256 for 224, in proportion otherwise).
  """
  name = _cfg(config, 'dataset')
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; valid datasets: {", ".join(DATASETS)}')
  val_fraction = _cfg(config, 'val_fraction', 0.0)
  _check_val_fraction(val_fraction)
  val_fraction = float(val_fraction)
  seed = _seed_int(_cfg(config, 'seed', 0))

  low_res = name in LOW_RES_DATASETS or name == 'digits'
  image_size = int(_cfg(config, 'image_size', 32 if low_res else 224))
  augment = _cfg(config, 'augment',
                 'cifar' if name in LOW_RES_DATASETS else 'none' if name == 'digits'
                 else 'imagenet')
  if augment not in AUGMENTATIONS:
    raise ValueError(f'unknown augment {augment!r}; valid: {", ".join(AUGMENTATIONS)}')
  resize_size = int(_cfg(config, 'resize_size', default_resize_size(image_size)))
  if augment == 'imagenet' and resize_size < image_size:
    raise ValueError(f'resize_size ({resize_size}) must be >= image_size ({image_size})')

  if name in TFDS_DATASETS:
    data_dir = _cfg(config, 'data_dir')
    data_dir = os.path.expanduser(str(data_dir)) if data_dir else None
    train_splits, test_split = TFDS_DATASETS[name]
    parts = [TfdsSource(name, s, data_dir) for s in train_splits]
    pool = parts[0] if len(parts) == 1 else ConcatSource(parts)
    test = TfdsSource(name, test_split, data_dir)
    num_classes = parts[0].num_classes
    class_names = parts[0].class_names
    origin = f"TFDS '{name}' ({'+'.join(train_splits)} / {test_split}) from " \
             f"{data_dir or 'the default TFDS data_dir'}"
  elif name == 'folder':
    train_root, test_root = _cfg(config, 'folder_train'), _cfg(config, 'folder_test')
    for field, root in (('folder_train', train_root), ('folder_test', test_root)):
      if not root:
        raise ValueError(f"dataset 'folder' needs config.{field} (a folder of class "
                         'subfolders of images)')
      if not os.path.isdir(os.path.expanduser(str(root))):
        raise FileNotFoundError(f'config.{field}={root!r} is not an existing directory')
    pool = FolderSource(os.path.expanduser(str(train_root)))
    test = FolderSource(os.path.expanduser(str(test_root)), classes=pool.class_names)
    num_classes, class_names = pool.num_classes, pool.class_names
    origin = f'image folders {train_root} / {test_root}'
  else:  # digits
    classes = _cfg(config, 'digits_classes')
    classes = None if classes is None else [int(c) for c in classes]
    pool, test = digits_splits(size=image_size, classes=classes)
    num_classes, class_names = pool.num_classes, pool.class_names
    origin = (f'scikit-learn digits, classes {classes if classes is not None else "0-9"} '
              f'relabelled 0..{num_classes - 1}, 8x8 upsampled (nearest) to {image_size}, '
              f'fixed test split ({DIGITS_TEST_FRACTION:.0%})')

  if num_classes is None:
    raise ValueError(f'cannot tell the number of classes of {name!r}')
  train_idx, val_idx = split_train_val(len(pool), val_fraction, seed)
  train = SubsetSource(pool, train_idx)
  val = SubsetSource(pool, val_idx) if len(val_idx) else None
  return Datasets(name=name, train=train, val=val, test=test, num_classes=int(num_classes),
                  image_size=image_size, resize_size=resize_size, augment=augment, seed=seed,
                  val_fraction=val_fraction, class_names=class_names, origin=origin)
