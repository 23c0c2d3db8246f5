"""Input pipeline throughput: training images per second, no model attached.

Two workloads, built once into ``--cache`` (no network):

* ``cifar``: a prepared TFDS ArrayRecord dataset of PNG-encoded 32x32 RGB images (the
  format tfds stores CIFAR-10 in), read through ``tfds.data_source``, CIFAR augmentation
  (pad-4 random crop, flip);
* ``folder``: an image folder of JPEGs of random sizes (300-500 px a side), the
  high-resolution presets' augmentation (resize 256, RandomResizedCrop 224, flip).

  python bench/input_pipeline.py --workload cifar --batch 128 --steps 40 --workers 0
  python bench/input_pipeline.py --workload folder --batch 64 --steps 10 --workers 2

``--workers`` grain worker processes (0: the calling process) and ``--threads`` threads per
process; on the threaded loader grain replaced, ``--workers`` was its thread count.

Prints one line per run, last ``images_per_sec=<x>``; ``--json`` appends a record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _smooth_image(rng, h, w) -> np.ndarray:
  """A natural-looking image (smooth colour fields plus a little noise): JPEG and PNG sizes
  and decoding costs close to photographs', unlike white noise."""
  from PIL import Image
  small = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.int16)
  image = image + rng.integers(-8, 9, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def build_cifar_like(root: Path, n: int) -> Path:
  import tensorflow_datasets as tfds
  from PIL import Image

  class BenchCifar(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(32, 32, 3), encoding_format='png'),
              'label': tfds.features.ClassLabel(num_classes=10)
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(n), 'test': self._generate_examples(16)}

    def _generate_examples(self, count):
      rng = np.random.default_rng(count)
      for i in range(count):
        yield i, {'image': Image.fromarray(_smooth_image(rng, 32, 32)), 'label': i % 10}

  builder = BenchCifar(data_dir=str(root), file_format='array_record')
  if not builder.is_prepared():
    builder.download_and_prepare()
  return root


def build_folder(root: Path, n: int, classes: int = 8) -> Path:
  from PIL import Image
  marker = root / f'.complete-{n}'
  if marker.exists():
    return root
  rng = np.random.default_rng(0)
  for i in range(n):
    folder = root / f'class{i % classes}'
    folder.mkdir(parents=True, exist_ok=True)
    h, w = (int(v) for v in rng.integers(300, 501, 2))
    Image.fromarray(_smooth_image(rng, h, w)).save(folder / f'{i:05d}.jpg', quality=90)
  marker.touch()
  return root


def make_source(workload: str, cache: Path, n: int):
  from twins_jax import data
  if workload == 'cifar':
    root = build_cifar_like(cache / 'tfds', n)
    return data.TfdsSource('bench_cifar', 'train', str(root)), 'cifar', 32
  root = build_folder(cache / f'folder{n}', n)
  return data.FolderSource(str(root)), 'imagenet', 224


def batches(source, augment, image_size, batch, workers, threads, start, steps):
  """The training batches ``start .. start + steps`` of the project's pipeline."""
  from twins_jax import data
  if hasattr(data, 'train_pipeline'):  # the grain pipeline
    plan = data.TrainPlan(len(source), batch)
    return data.train_pipeline(source, plan, seed=0, augment=augment, image_size=image_size,
                               start_step=start, num_steps=steps, worker_count=workers,
                               threads=threads)
  # The threaded loader grain replaced (commit d3b9f13): ``workers`` threads per batch.
  loader = data.TrainLoader(source, batch, seed=0, augment=augment, image_size=image_size,
                            num_workers=workers or None)
  return loader.iterate(start, steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workload', choices=('cifar', 'folder'), default='cifar')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--workers', type=int, default=0, help='worker processes (0: in process)')
  parser.add_argument('--threads', type=int, default=1, help='threads per process')
  parser.add_argument('--examples', type=int, default=0,
                      help='dataset size (default 10000 for cifar, 512 for folder)')
  parser.add_argument('--cache', default=os.path.expanduser('~/.cache/twins_jax_bench'))
  parser.add_argument('--json', default='')
  args = parser.parse_args()

  n = args.examples or (10000 if args.workload == 'cifar' else 512)
  source, augment, size = make_source(args.workload, Path(args.cache), n)
  it = iter(
      batches(source, augment, size, args.batch, args.workers, args.threads, 0,
              args.warmup + args.steps))
  for _ in range(args.warmup):
    next(it)
  t0 = time.perf_counter()
  images = 0
  for _ in range(args.steps):
    images += len(next(it)['label'])
  elapsed = time.perf_counter() - t0
  getattr(it, 'close', lambda: None)()  # stops grain's worker processes
  rate = images / elapsed
  record = dict(workload=args.workload, batch=args.batch, steps=args.steps, workers=args.workers,
                threads=args.threads, examples=n, cpus=os.cpu_count(), seconds=round(elapsed, 3),
                images_per_sec=round(rate, 1))
  print(json.dumps(record))
  if args.json:
    with open(args.json, 'a') as f:
      f.write(json.dumps(record) + '\n')
  print(f'images_per_sec={rate:.1f}')


if __name__ == '__main__':
  main()
