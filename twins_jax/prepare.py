"""One-time dataset preparation for the image-folder presets.

Caltech-256 has no official train/test split; the one every robust-transfer paper uses,
TWINS included, is the ``robustness`` library's (``make_loaders_caltech256``): within each
class, in file order, the first 60 images are training images and all the others test
images. The TWINS high-resolution scripts then read ``<root>/train`` and ``<root>/val``
image folders (``TWINS_high_res_data/train-TWINS-AT.py:304-305``). This writes that split
as two folders of links (or copies) to the original files::

  python -m twins_jax.prepare caltech256 256_ObjectCategories data/caltech256

and ``configs/caltech256.py`` trains on it. ``split_per_class`` does the same for any
``root/<class>/<images>`` folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

CALTECH256_TRAIN_PER_CLASS = 60
CALTECH256_CLASSES = 257  # 256 object categories and 257.clutter
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')


class PrepareError(ValueError):
  """The source folder cannot be split as asked."""


def class_images(src: Path, extensions=IMAGE_EXTENSIONS) -> dict[str, list[Path]]:
  """``{class: sorted image files}`` of ``src/<class>/``, classes sorted by name."""
  if not src.is_dir():
    raise PrepareError(f'{src} is not a directory (expected one subfolder of images per class).')
  out = {}
  for d in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith('.')):
    files = sorted(f for f in d.iterdir()
                   if f.is_file() and f.suffix.lower() in extensions and not f.name.startswith('.'))
    if files:
      out[d.name] = files
  if not out:
    raise PrepareError(f'{src} has no class subfolders with images in them.')
  return out


def split_per_class(src, dst, train_per_class: int, *, copy: bool = False, test_name: str = 'test',
                    extensions=IMAGE_EXTENSIONS) -> dict[str, int]:
  """Writes ``dst/train/<class>/`` (the first ``train_per_class`` images of each class, in
  file-name order) and ``dst/<test_name>/<class>/`` (the rest), as symbolic links to the
  files of ``src`` (``copy=True``: copies). Returns the counts. ``dst`` must not exist yet
  (or be empty), so a half-written split is never mistaken for a finished one: the folders
  are written under ``dst.tmp`` and renamed at the end."""
  src, dst = Path(src).expanduser().absolute(), Path(dst).expanduser().absolute()
  if train_per_class < 1:
    raise PrepareError(f'train_per_class must be positive, got {train_per_class}.')
  if dst.exists() and any(dst.iterdir()):
    raise PrepareError(f'{dst} exists and is not empty; choose a new destination.')
  classes = class_images(src, extensions)
  short = {c: len(f) for c, f in classes.items() if len(f) <= train_per_class}
  if short:
    raise PrepareError(f'{len(short)} classes have no more than {train_per_class} images, so '
                       f'they would have no test images: {dict(list(short.items())[:5])}.')
  tmp = dst.with_name(dst.name + '.tmp')
  shutil.rmtree(tmp, ignore_errors=True)
  counts = {'classes': len(classes), 'train': 0, test_name: 0}
  for name, files in classes.items():
    for split, part in (('train', files[:train_per_class]), (test_name, files[train_per_class:])):
      folder = tmp / split / name
      folder.mkdir(parents=True, exist_ok=True)
      for f in part:
        if copy:
          shutil.copy2(f, folder / f.name)
        else:
          os.symlink(f, folder / f.name)
      counts[split] += len(part)
  if dst.exists():
    dst.rmdir()
  os.replace(tmp, dst)
  return counts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m twins_jax.prepare',
      description='Prepare an image-folder dataset split (once, before training).')
  sub = parser.add_subparsers(dest='dataset', required=True)
  cal = sub.add_parser(
      'caltech256', help="Caltech-256's standard split: the first 60 images "
      'of each class for training, the rest for testing.')
  cal.add_argument('src', help='the extracted 256_ObjectCategories folder')
  cal.add_argument('dst', help='where to write train/ and test/ (must not exist)')
  cal.add_argument('--copy', action='store_true', help='copy the images instead of linking')
  gen = sub.add_parser(
      'split', help='any root/<class>/<images> folder: the first N images '
      'of each class for training, the rest for testing.')
  gen.add_argument('src')
  gen.add_argument('dst')
  gen.add_argument('--train-per-class', type=int, required=True)
  gen.add_argument('--copy', action='store_true')
  args = parser.parse_args(argv)
  per_class = (CALTECH256_TRAIN_PER_CLASS if args.dataset == 'caltech256' else args.train_per_class)
  try:
    counts = split_per_class(args.src, args.dst, per_class, copy=args.copy)
  except (PrepareError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.dataset == 'caltech256' and counts['classes'] != CALTECH256_CLASSES:
    print(
        f'warning: found {counts["classes"]} classes; Caltech-256 has '
        f'{CALTECH256_CLASSES} (256 categories and 257.clutter).', file=sys.stderr)
  dst = Path(args.dst)
  print(f'{counts["classes"]} classes: {counts["train"]} training images in {dst / "train"}, '
        f'{counts["test"]} test images in {dst / "test"}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
