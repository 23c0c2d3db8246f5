"""Random-access sources: ``len(source)`` and ``source[i] -> (image, label)``.

``image`` is a ``uint8`` HxWx3 array, ``label`` a Python ``int``. Each is a grain
``RandomAccessDataSource`` (so ``grain.MapDataset.source(s)`` takes it) and pickles, so
grain's worker processes can read it:

* :class:`TfdsSource`: a prepared TFDS dataset read through ``tfds.data_source`` (ArrayRecord
  files, decoded with PIL; TensorFlow is *not* needed to read).
* :class:`FolderSource`: ``root/<class_name>/<image files>`` (classes sorted by name).
* :class:`ArraySource`: images and labels in memory; :func:`digits_splits`: scikit-learn's
  8x8 handwritten digits (they ship with scikit-learn, so no network).
* :class:`SubsetSource`, :class:`ConcatSource`: views of other sources.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Any, Optional, Sequence

import numpy as np

from twins_jax.errors import DataError

log = logging.getLogger('twins_jax')

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm',
                    '.pgm', '.pbm')

# Fixed seed of the digits train/test split: the test set must not move with the run's seed.
DIGITS_SPLIT_SEED = 20230
DIGITS_TEST_FRACTION = 0.25


class DatasetNotPreparedError(DataError, FileNotFoundError):
  """A TFDS dataset is not prepared (as ArrayRecord) in the data directory."""


def to_rgb(image: Any) -> np.ndarray:
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


def upsample_nearest(images: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize of NxHxWxC images to ``size`` (PyTorch's 'nearest' rule)."""
  h, w = images.shape[1:3]
  rows = np.floor(np.arange(size) * (h / size)).astype(np.int64)
  cols = np.floor(np.arange(size) * (w / size)).astype(np.int64)
  return images[:, rows][:, :, cols]


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
    image = to_rgb(self.images[i])
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


# --------------------------------------------------------------------------------------------
# TFDS.


def prepare_command(name: str, data_dir: Optional[str]) -> str:
  dir_arg = repr(str(data_dir)) if data_dir else 'None'
  return ('pip install tensorflow-cpu  # needed to prepare, not to train\n'
          'python -c "import tensorflow_datasets as tfds; '
          f"tfds.builder('{name}', data_dir={dir_arg}, file_format='array_record')"
          '.download_and_prepare()"')


def _not_prepared_error(name: str, split: str, data_dir: Optional[str],
                        error: Exception) -> DatasetNotPreparedError:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets (the default)'
  summary = (f"the TFDS dataset '{name}' (split '{split}') cannot be read from data_dir={where}; "
             'prepare it once as shown above and pass that data_dir as config.data_dir')
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
  lines.append(prepare_command(name, data_dir))
  if manual:
    lines.append('This dataset needs a manual download: put the files in '
                 f'{os.path.join(str(data_dir or "~/tensorflow_datasets"), "downloads", "manual")} '
                 f'first. Instructions:\n{manual}')
  lines.append('Then pass that data_dir as config.data_dir. Nothing is ever downloaded at '
               'training time.')
  lines.append(f'(underlying error: {type(error).__name__}: {error})')
  return DatasetNotPreparedError(summary, details='\n'.join(lines))


class TfdsSource:
  """One split of a prepared TFDS dataset, read with ``tfds.data_source`` (no TensorFlow).

  The dataset must have been prepared as ArrayRecord (``file_format='array_record'``); this
  never downloads or prepares anything. Pickles by name, so worker processes reopen it.
  """

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None,
               image_key: str = 'image', label_key: str = 'label'):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.label_key = image_key, label_key
    self._open()
    feature = None
    try:
      feature = self._ds.dataset_info.features[label_key]
    except Exception:  # pylint: disable=broad-except
      pass
    self.num_classes = getattr(feature, 'num_classes', None)
    names = getattr(feature, 'names', None)
    self.class_names = list(names) if names else None

  def _open(self) -> None:
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"Reading the TFDS dataset '{self.name}' needs tensorflow-datasets "
                        '(pip install tensorflow-datasets); TensorFlow is not needed.') from e
    try:
      self._ds = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                  download=False)
      self._length = len(self._ds)
    except Exception as e:  # pylint: disable=broad-except
      raise _not_prepared_error(self.name, self.split, self.data_dir, e) from e

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_ds'}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    example = self._ds[int(i)]
    return to_rgb(example[self.image_key]), int(example[self.label_key])

  def __repr__(self) -> str:
    return f"TfdsSource('{self.name}', split='{self.split}', {len(self)} examples)"


# --------------------------------------------------------------------------------------------
# Image folders.


def _is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def folder_classes(root: str) -> list[str]:
  """The class folders of ``root``, sorted by name."""
  if not os.path.isdir(root):
    raise DataError(f'image folder {root!r} does not exist or is not a directory')
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
  if not classes:
    raise DataError(f'image folder {root!r} has no class subfolders (expected '
                    'root/<class_name>/<image files>)')
  return classes


def read_image(path: str) -> np.ndarray:
  """An image file as ``uint8`` HxWx3 RGB; an unreadable one is a DataError naming it."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert('RGB'), np.uint8)
  except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for truncated/corrupt files
    raise DataError(f'cannot read the image {path} ({type(e).__name__}: {e}); replace or remove '
                    'it, or set --config.skip_bad_images=true to skip unreadable images') from e


def _readable(files: Sequence[str]) -> list[bool]:
  """Whether each image file decodes (in threads: PIL releases the GIL while decoding)."""

  def ok(path):
    try:
      read_image(path)
      return True
    except DataError:
      return False

  with concurrent.futures.ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
    return list(pool.map(ok, files))


class FolderSource:
  """``root/<class_name>/*.{jpg,png,...}`` read with PIL and converted to RGB.

  Classes are the subfolders sorted by name (or ``classes``, e.g. the training folder's
  classes for the test folder), files sorted by path. ``skip_unreadable``: decode every
  image once now and leave out those that cannot be read (listed in ``skipped``); else an
  unreadable image is a DataError naming it when it is read.
  """

  def __init__(self, root: str, classes: Optional[Sequence[str]] = None,
               skip_unreadable: bool = False):
    self.root = str(root)
    found = folder_classes(self.root)
    if classes is None:
      classes = found
    else:
      classes = list(classes)
      unknown = sorted(set(found) - set(classes))
      if unknown:
        raise DataError(f'{self.root!r} has classes that the training folder lacks: '
                        f'{unknown[:10]}; both folders need the same class subfolders')
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
    self.skipped: list[str] = []
    if skip_unreadable and files:
      readable = _readable(files)
      self.skipped = [f for f, ok in zip(files, readable) if not ok]
      files = [f for f, ok in zip(files, readable) if ok]
      labels = [y for y, ok in zip(labels, readable) if ok]
      if self.skipped:
        log.warning('%s: skipped %d unreadable image(s): %s%s', self.root, len(self.skipped),
                    ', '.join(self.skipped[:5]), ' ...' if len(self.skipped) > 5 else '')
    if not files:
      raise DataError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) under {self.root!r}')
    self.files = files
    self.labels = np.asarray(labels, np.int64)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    return read_image(self.files[i]), int(self.labels[i])

  def __repr__(self) -> str:
    return f'FolderSource({self.root!r}, {len(self)} images, {self.num_classes} classes)'


# --------------------------------------------------------------------------------------------
# scikit-learn digits.


def check_digit_classes(classes: Optional[Sequence[int]]) -> Optional[list[int]]:
  if classes is None:
    return None
  try:
    classes = [int(c) for c in classes]
  except (TypeError, ValueError) as e:
    raise DataError(f'digits_classes must be a list of digits 0..9, got {classes!r}') from e
  if not classes or len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes):
    raise DataError(f'digits_classes must be distinct digits 0..9, got {classes}')
  return classes


def _relabel(labels: np.ndarray, classes: list[int]) -> np.ndarray:
  table = np.full(10, -1, np.int64)
  table[classes] = np.arange(len(classes))
  return table[labels]


def load_digits_arrays(classes: Optional[Sequence[int]] = None) -> tuple[np.ndarray, np.ndarray]:
  """All 1797 scikit-learn digits as ``uint8`` Nx8x8x3 images and their labels.

  The 17 grey levels 0..16 map to ``round(v * 255 / 16)``. ``classes`` keeps those digits and
  relabels ``classes[k] -> k`` (in the order given).
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  classes = check_digit_classes(classes)
  digits = load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  images = np.repeat(images, 3, axis=-1)
  labels = digits.target.astype(np.int64)
  if classes is not None:
    keep = np.isin(labels, classes)
    images, labels = images[keep], _relabel(labels[keep], classes)
  return np.ascontiguousarray(images), labels


def digits_source(size: Optional[int] = None,
                  classes: Optional[Sequence[int]] = None) -> ArraySource:
  """All digits (see :func:`load_digits_arrays`), upsampled on access to ``size``."""
  classes = check_digit_classes(classes)
  images, labels = load_digits_arrays(classes)
  names = [str(c) for c in (classes if classes is not None else range(10))]
  return ArraySource(images, labels, num_classes=len(names), class_names=names, nearest_size=size)


def digits_splits(size: Optional[int] = None, classes: Optional[Sequence[int]] = None,
                  test_fraction: float = DIGITS_TEST_FRACTION) -> tuple[ArraySource, ArraySource]:
  """(train, test) digits. The test part is a fixed random subset of all 1797 digits that
  depends on no run seed; with ``classes`` both parts keep only those classes (so the test
  examples of a class are the same whichever subset it belongs to)."""
  classes = check_digit_classes(classes)
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
