"""Predictions of a model directory's Adaptive Net (eval mode) for images.

CLI (``twins-jax-predict`` once the package is installed)::

    python -m twins_jax.predict MODEL_DIR --images PATH [PATH ...] [--out OUT]
        [--top-k 5] [--batch-size B] [--image-size S] [--resize-size R]

``MODEL_DIR``: a model directory (ported or trained) or a training workdir (its
``best_model``, else its ``final_model``).

``--images``: image files (JPEG, PNG, ...), folders (every image file under them, sorted by
path) or one ``.npy`` array, N x H x W x 3 RGB, ``uint8`` or float in [0, 1] (read with
``allow_pickle=False``). The arrays go in as they are; image files are decoded to RGB and
transformed as the model expects (:func:`preprocessing`):

* a model trained here: its run's evaluation transform, which training stores in
  ``model.json`` (``metadata.preprocessing``: ``augment``, ``image_size``,
  ``resize_size``; :func:`twins_jax.data.transforms.transform` with ``train=False``);
* any other (ported) model: the ImageNet test transform: the shorter side resized to
  ``resize_size`` (bilinear), then the ``image_size`` centre crop, with ``image_size`` the
  model's internal resize (``spec.resize``, e.g. 224) or 224 if it has none, and
  ``resize_size = image_size * 256 / 224`` (256 for 224).

``--image-size`` / ``--resize-size`` override either.

Output: the top-k classes of every image with their softmax probabilities, named by the
model's ``metadata.class_names`` (training stores the dataset's; ``twins_jax.port
--class-names``), else by index. ``--out`` writes, by its extension, ``.npy``: the logits,
N x num_classes float32, row i for input i; ``.json``: a list with one
``{"file", "classes", "names", "probabilities"}`` per input; ``.csv``: one row per input,
``file, class_1, name_1, probability_1, ..., class_k, name_k, probability_k``. An array's
inputs are named ``X.npy[i]``.

Python: :func:`predict` (``model, variables`` as from
:func:`twins_jax.model_io.load_model_dir`), :func:`validate_images`, :func:`load_images`,
:func:`preprocessing`, :func:`top_k`, :func:`resolve_model_dir`.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from twins_jax import errors, model_io
from twins_jax import models
from twins_jax.errors import DataError

resolve_model_dir = model_io.resolve_model_dir

OUTPUT_FORMATS = ('.npy', '.json', '.csv')
DEFAULT_IMAGE_SIZE = 224  # a ported model without an internal resize: ImageNet's crop


def validate_images(images, name: str = 'images') -> np.ndarray:
  """Checks N x H x W x 3 float32 in [0, 1]; returns it as a numpy array."""
  if not isinstance(images, (np.ndarray, jax.Array)):
    raise ValueError(f'{name} must be an array, got {type(images).__name__}.')
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'{name} must have shape N x H x W x 3 (NHWC, RGB), got {images.shape}.')
  if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
    raise ValueError(f'{name} is empty: shape {images.shape}.')
  if images.dtype != np.float32:
    raise ValueError(f'{name} must be float32 in [0, 1], got {images.dtype} '
                     '(convert e.g. uint8 with x.astype(np.float32) / 255).')
  if not np.all(np.isfinite(images)):
    raise ValueError(f'{name} contains NaN or infinite values.')
  lo, hi = float(images.min()), float(images.max())
  if lo < 0.0 or hi > 1.0:
    raise ValueError(f'{name} must lie in [0, 1] (pixel values / 255), got range '
                     f'[{lo:g}, {hi:g}].')
  return images


@functools.lru_cache(maxsize=8)
def _eval_fn(model: models.ResNet):
  return jax.jit(functools.partial(model.apply, mode=models.EVAL))


def _inference_variables(variables) -> dict:
  return {k: v for k, v in variables.items() if k in ('params', 'batch_stats', 'frozen_stats')}


def _padded_logits(fn, variables, chunk: np.ndarray, batch: int) -> np.ndarray:
  """Logits of ``chunk`` (at most ``batch`` images), padded to ``batch`` so that one compiled
  program serves every call; the padding is dropped."""
  k = chunk.shape[0]
  if k < batch:
    chunk = np.concatenate([chunk, np.zeros((batch - k,) + chunk.shape[1:], chunk.dtype)])
  return np.asarray(fn(variables, jnp.asarray(chunk)))[:k].astype(np.float32)


def predict(model: models.ResNet, variables, images, batch_size: int = 128) -> np.ndarray:
  """Adaptive-Net eval-mode logits, N x num_classes float32 (numpy).

  One compiled function for all batches: the last batch is padded to the batch size and
  the padding dropped, so every image is counted exactly once.
  """
  images = validate_images(images)
  _check_batch_size(batch_size)
  n = images.shape[0]
  b = min(int(batch_size), n)
  variables, fn = _inference_variables(variables), _eval_fn(model)
  logits = np.concatenate(
      [_padded_logits(fn, variables, images[i:i + b], b) for i in range(0, n, b)])
  assert logits.shape[0] == n
  return logits


def _check_batch_size(batch_size) -> None:
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}.')


# ------------------------------------------------------------------------ inputs


def preprocessing(meta: dict, image_size: Optional[int] = None,
                  resize_size: Optional[int] = None) -> dict:
  """How image files are turned into the model's input: ``{augment, image_size,
  resize_size, origin}`` for :func:`twins_jax.data.transforms.transform` (``train=False``).

  ``meta``: the parsed ``model.json`` (:func:`twins_jax.model_io.read_model_json`). Its
  ``metadata.preprocessing`` (a model trained here) wins over the default for other models
  (ImageNet's resize and centre crop to ``spec.resize``, or 224); ``image_size`` /
  ``resize_size`` override both. A resize size that is neither stored nor given is
  ``image_size * 256 / 224``, as is the resize size of an overridden image size.
  """
  from twins_jax.data import transforms  # pylint: disable=g-import-not-at-top
  for name, value in (('image-size', image_size), ('resize-size', resize_size)):
    if value is not None and value < 1:
      raise DataError(f'--{name} must be positive, got {value}.')
  stored = meta.get('metadata', {}).get('preprocessing')
  if stored:
    prep = dict(augment=stored['augment'], image_size=int(stored['image_size']),
                resize_size=stored.get('resize_size'), origin='stored by the training run')
  else:
    prep = dict(augment='imagenet', image_size=meta['spec'].resize or DEFAULT_IMAGE_SIZE,
                resize_size=None, origin='default for a model without stored preprocessing')
  if image_size is not None:
    prep.update(image_size=int(image_size), resize_size=None, origin='command line')
  if resize_size is not None:
    prep.update(resize_size=int(resize_size), origin='command line')
  if prep['resize_size'] is None:
    prep['resize_size'] = transforms.default_resize_size(prep['image_size'])
  if prep['augment'] == 'imagenet' and prep['resize_size'] < prep['image_size']:
    raise DataError(f'resize size {prep["resize_size"]} is smaller than the image size '
                    f'{prep["image_size"]} it is cropped to.')
  return prep


def collect_inputs(paths: Sequence[str]) -> Tuple[List[str], Optional[np.ndarray]]:
  """``(names, array)``: the image files ``paths`` name (folders expanded), or for one
  ``.npy`` its rows' names and the array itself (else None)."""
  from twins_jax.data.sources import IMAGE_EXTENSIONS  # pylint: disable=g-import-not-at-top
  arrays = [p for p in paths if str(p).lower().endswith('.npy')]
  if arrays:
    if len(paths) != 1:
      raise DataError('a .npy array must be the only --images input.')
    return _read_array(paths[0])
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = []
      for root, dirs, names in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        found += [
            os.path.join(root, n) for n in names
            if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith('.')
        ]
      if not found:
        raise DataError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) under {path}.')
      files += sorted(found)
    elif os.path.isfile(path):
      files.append(str(path))
    else:
      raise DataError(f'--images {path} does not exist.')
  return files, None


def _read_array(path: str) -> Tuple[List[str], np.ndarray]:
  try:
    images = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise DataError(f'--images file {path} does not exist.') from None
  except (OSError, ValueError) as e:
    raise DataError(f'--images {path} is not a readable .npy array: {e}') from None
  if not isinstance(images, np.ndarray):
    raise DataError(f'--images {path} must be one .npy array, not an .npz archive.')
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / np.float32(255.0)
  elif images.dtype in (np.float16, np.float64):
    images = images.astype(np.float32)
  try:
    images = validate_images(images, f'--images {path}')
  except ValueError as e:
    raise DataError(str(e)) from None
  return [f'{path}[{i}]' for i in range(images.shape[0])], images


def load_images(files: Sequence[str], prep: dict) -> np.ndarray:
  """The image files, decoded to RGB and transformed by ``prep`` (:func:`preprocessing`):
  N x image_size x image_size x 3 float32 in [0, 1]."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  from twins_jax.data import transforms  # pylint: disable=g-import-not-at-top
  out = []
  for f in files:
    try:
      with Image.open(f) as img:
        image = np.asarray(img.convert('RGB'), np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
      raise DataError(f'cannot read the image {f}: {" ".join(str(e).split())}') from None
    out.append(
        transforms.transform(image, train=False, augment=prep['augment'],
                             image_size=prep['image_size'], resize_size=prep['resize_size']))
  return np.stack(out)


def _batches(files, array, prep, batch: int) -> Iterator[np.ndarray]:
  n = len(files)
  for start in range(0, n, batch):
    if array is not None:
      yield array[start:start + batch]
    else:
      yield load_images(files[start:start + batch], prep)


# ------------------------------------------------------------------------ outputs


def top_k(logits: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
  """``(classes, probabilities)``, each N x min(k, C): the k most probable classes of each
  row (ties: the lower index first) and their softmax probabilities."""
  z = np.asarray(logits, np.float64)
  p = np.exp(z - z.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  classes = np.argsort(-z, axis=1, kind='stable')[:, :min(k, z.shape[1])]
  return classes, np.take_along_axis(p, classes, axis=1)


def _rows(names, logits, k, class_names) -> List[dict]:
  classes, probs = top_k(logits, k)
  label = (lambda c: class_names[c]) if class_names else str
  return [{
      'file': name, 'classes': [int(c) for c in cs], 'names': [label(int(c)) for c in cs],
      'probabilities': [float(p) for p in ps]
  } for name, cs, ps in zip(names, classes, probs)]


def write_output(out: str, logits: np.ndarray, rows: List[dict]) -> None:
  """Writes ``logits`` (.npy) or the top-k ``rows`` (.json, .csv) to ``out``."""
  ext = os.path.splitext(out)[1].lower()
  if ext == '.npy':
    np.save(out, logits)
  elif ext == '.json':
    Path(out).write_text(json.dumps(rows, indent=2) + '\n')
  else:
    k = len(rows[0]['classes'])
    with open(out, 'w', newline='', encoding='utf-8') as f:
      w = csv.writer(f)
      w.writerow(['file'] +
                 [f'{c}_{i}' for i in range(1, k + 1) for c in ('class', 'name', 'probability')])
      for r in rows:
        w.writerow([r['file']] + [
            v for c, n, p in zip(r['classes'], r['names'], r['probabilities'])
            for v in (c, n, f'{p:.6g}')
        ])


# ------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
  p = errors.cli_parser(
      'twins-jax-predict', 'twins_jax.predict',
      'Top-k classes (and logits) of the Adaptive Net (eval mode) of a model directory '
      'for image files, folders of images or an .npy array.')
  p.add_argument('model_dir', help='model directory (from twins_jax.port or training) or a '
                 'training workdir')
  p.add_argument(
      '--images', required=True, nargs='+', metavar='PATH',
      help='image files, folders of images, or one N x H x W x 3 .npy (uint8, or float '
      'in [0, 1]; used as it is)')
  p.add_argument('--out', default=None,
                 help='write the logits (.npy) or the top-k per image (.json, .csv)')
  p.add_argument('--top-k', type=int, default=5, help='classes printed (and written) per image')
  p.add_argument('--batch-size', type=int, default=128)
  p.add_argument(
      '--image-size', type=int, default=None,
      help='image files: the crop fed to the model (default: what the model stores, '
      'else its internal resize, else 224)')
  p.add_argument(
      '--resize-size', type=int, default=None,
      help='image files: the shorter side before the centre crop (default: what the '
      'model stores, else image size x 256 / 224)')
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  errors.drop_closed_loop_noise()
  try:
    if args.batch_size < 1:
      raise ValueError(f'--batch-size must be positive, got {args.batch_size}.')
    if args.top_k < 1:
      raise ValueError(f'--top-k must be positive, got {args.top_k}.')
    if args.out is not None:
      if os.path.splitext(args.out)[1].lower() not in OUTPUT_FORMATS:
        raise ValueError(f'--out {args.out}: write .npy (logits), .json or .csv (top-k).')
      out_dir = os.path.dirname(os.path.abspath(args.out))
      if not os.path.isdir(out_dir):
        raise ValueError(f'the directory of --out ({out_dir}) does not exist.')
    names, array = collect_inputs(args.images)
    path = resolve_model_dir(args.model_dir)
    meta = model_io.read_model_json(path)
    prep = preprocessing(meta, args.image_size, args.resize_size) if array is None else None
    model, variables, meta = model_io.load_model_dir(path)
    class_names = meta['metadata'].get('class_names')
    batch = min(args.batch_size, len(names))
    variables, fn = _inference_variables(variables), _eval_fn(model)
    logits = np.concatenate([
        _padded_logits(fn, variables, chunk, batch)
        for chunk in _batches(names, array, prep, batch)
    ])
  except (ValueError, FileExistsError) as e:  # ModelDirError, DataError are ValueErrors
    error = e if isinstance(e, errors.UserError) else errors.UserError(str(e))
    return errors.report(error, show_traceback=errors.verbose(argv))
  if prep is not None:
    print(
        f'{len(names)} images, {prep["augment"]} test transform: resize {prep["resize_size"]}, '
        f'{prep["image_size"]}x{prep["image_size"]} ({prep["origin"]})' if prep['augment'] ==
        'imagenet' else f'{len(names)} images resized to {prep["image_size"]}x{prep["image_size"]} '
        f'({prep["origin"]})')
  rows = _rows(names, logits, args.top_k, class_names)
  for r in rows:
    print(f'{r["file"]}: ' +
          ', '.join(f'{n} {p:.3f}' for n, p in zip(r['names'], r['probabilities'])))
  if args.out is not None:
    write_output(args.out, logits, rows)
    print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
