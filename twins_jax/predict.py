"""Logits of a model directory's Adaptive Net (eval mode) for a batch of images.

CLI::

    python -m twins_jax.predict MODEL_DIR --images X.npy --out LOGITS.npy [--batch-size B]

``X.npy``: N x H x W x 3 float32 in [0, 1] (read with ``allow_pickle=False``).
``LOGITS.npy``: N x num_classes float32, row i for image i.

Python: :func:`predict` (``model, variables`` as from
:func:`twins_jax.model_io.load_model_dir`), :func:`validate_images`,
:func:`resolve_model_dir`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twins_jax import model_io
from twins_jax import models

resolve_model_dir = model_io.resolve_model_dir


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


def predict(model: models.ResNet, variables, images, batch_size: int = 128) -> np.ndarray:
  """Adaptive-Net eval-mode logits, N x num_classes float32 (numpy).

  One compiled function for all batches: the last batch is padded to the batch size and
  the padding dropped, so every image is counted exactly once.
  """
  images = validate_images(images)
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}.')
  n = images.shape[0]
  b = min(int(batch_size), n)
  variables = {k: v for k, v in variables.items() if k in ('params', 'batch_stats', 'frozen_stats')}
  fn = _eval_fn(model)
  out = []
  for start in range(0, n, b):
    chunk = images[start:start + b]
    k = chunk.shape[0]
    if k < b:
      chunk = np.concatenate([chunk, np.zeros((b - k,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(fn(variables, jnp.asarray(chunk)))[:k])
  logits = np.concatenate(out, axis=0).astype(np.float32)
  assert logits.shape[0] == n
  return logits


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m twins_jax.predict',
      description='Write the Adaptive Net eval-mode logits of a '
      'model directory for an .npy of images.')
  p.add_argument('model_dir', help='model directory (from twins_jax.port or training)')
  p.add_argument('--images', required=True, help='N x H x W x 3 float32 .npy in [0, 1]')
  p.add_argument('--out', required=True, help='where to write the N x C float32 logits (.npy)')
  p.add_argument('--batch-size', type=int, default=128)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.batch_size < 1:
      raise ValueError(f'--batch-size must be positive, got {args.batch_size}.')
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
      raise ValueError(f'the directory of --out ({out_dir}) does not exist.')
    try:
      images = np.load(args.images, allow_pickle=False)
    except FileNotFoundError:
      raise ValueError(f'--images file {args.images} does not exist.') from None
    except (OSError, ValueError) as e:
      raise ValueError(f'--images {args.images} is not a readable .npy array: {e}') from None
    if not isinstance(images, np.ndarray):
      raise ValueError(f'--images {args.images} must be one .npy array, not an .npz archive.')
    images = validate_images(images, f'--images {args.images}')
    model, variables, _ = model_io.load_model_dir(resolve_model_dir(args.model_dir))
    logits = predict(model, variables, images, args.batch_size)
  except (ValueError, FileExistsError) as e:  # ModelDirError is a ValueError
    print(f'error: {e}', file=sys.stderr)
    return 1
  np.save(args.out, logits)
  print(f'wrote {logits.shape[0]} x {logits.shape[1]} logits to {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
