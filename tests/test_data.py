"""Tests of the input pipeline (twins_jax/data/): small, CPU only, no network."""

import collections
import contextlib
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from twins_jax import data, errors

tfds = pytest.importorskip('tensorflow_datasets')


@contextlib.contextmanager
def mocked_tfds(num_examples):
  """Fake TFDS datasets: every split of every dataset has ``num_examples`` random examples."""
  with tfds.testing.mock_data(num_examples=num_examples):
    yield


def cfg(**kwargs):
  return ml_collections.ConfigDict(kwargs)


def all_train_batches(loader, steps):
  return [loader.batch(k) for k in steps]


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def concat_hosts(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


class Loader:
  """A training pipeline over ``source`` seen step by step: ``batch(k)`` is the grain
  pipeline's element for step ``k`` (built from that step, as a resumed run does)."""

  def __init__(self, source, global_batch_size, seed, augment='none', image_size=None,
               process_index=0, process_count=1, last_batch='partial', shard_multiple=None,
               resize_size=None, worker_count=0, threads=1):
    self.plan = data.TrainPlan(len(source), global_batch_size, last_batch, process_index,
                               process_count, shard_multiple)
    self.source, self.seed = source, seed
    self.options = dict(augment=augment, resize_size=resize_size, worker_count=worker_count,
                        threads=threads, image_size=image_size or source[0][0].shape[0])
    self.steps_per_epoch = self.plan.steps_per_epoch

  def iterate(self, start_step, num_steps):
    return data.Batches(
        data.train_pipeline(self.source, self.plan, seed=self.seed, start_step=start_step,
                            num_steps=num_steps, **self.options), num_steps)

  def batch(self, step):
    (out,) = list(self.iterate(step, 1))
    return out

  def indices(self, step):
    """The source indices of this host's rows of batch ``step``."""
    epoch, positions = self.plan.host_positions(step)
    return data.epoch_permutation(self.seed, epoch, len(self.source))[positions]


def ds_loader(ds, batch, **kw):
  return Loader(ds.train, batch, ds.seed, ds.augment, ds.image_size, resize_size=ds.resize_size,
                **kw)


def eval_list(source, batch, **kw):
  return list(data.eval_pipeline(source, batch, **kw))


def random_source(n, size=32, seed=0, num_classes=10):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return data.ArraySource(images, rng.integers(0, num_classes, n), num_classes=num_classes)


# ------------------------------------------------------------------------------------------
# TFDS (mocked) CIFAR-10 and high-resolution datasets.


def test_cifar10_mock_pipeline():
  with mocked_tfds(50):
    ds = data.build_datasets(
        cfg(dataset='cifar10', data_dir='/nonexistent', val_fraction=0.1, seed=3))
    assert (ds.num_classes, ds.image_size, ds.augment) == (10, 32, 'cifar')
    assert (len(ds.train), len(ds.val), len(ds.test)) == (45, 5, 50)
    assert 'cifar10' in ds.describe() and 'val 5' in ds.describe()

    loader = ds_loader(ds, 16, last_batch='drop')
    assert loader.steps_per_epoch == 2
    batch = loader.batch(3)
    assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
    assert 0.0 <= batch['image'].min() and batch['image'].max() <= 1.0
    assert batch['image'].max() > 0.5
    assert ((0 <= batch['label']) & (batch['label'] < 10)).all()

    # Resume: a fresh loader gives the same batches; two hosts' shares give the global batch.
    again = ds_loader(ds, 16, last_batch='drop')
    hosts = [
        ds_loader(ds, 16, process_index=i, process_count=2, last_batch='drop') for i in range(2)
    ]
    for step in (0, 1, 2, 5):
      assert_batches_equal(loader.batch(step), again.batch(step))
      assert_batches_equal(loader.batch(step), concat_hosts([h.batch(step) for h in hosts]))

    batches = list(ds.eval_batches('test', 16))
    assert len(batches) == 4 and [b['mask'].sum() for b in batches] == [16, 16, 16, 2]
    np.testing.assert_array_equal(batches[0]['image'][1], ds.test[1][0] / np.float32(255))


def test_high_resolution_mock_with_imagenet_augmentation():
  with mocked_tfds(24):
    birds = data.build_datasets(
        cfg(dataset='caltech_birds2011', image_size=24, resize_size=28, val_fraction=0.125, seed=1))
    assert (birds.num_classes, birds.augment, birds.image_size) == (200, 'imagenet', 24)
    assert (len(birds.train), len(birds.val), len(birds.test)) == (21, 3, 24)
    # (Mocked TFDS exists in this process only, so no worker processes here; threads.)
    one = ds_loader(birds, 8)
    two = [ds_loader(birds, 8, process_index=i, process_count=2, threads=2) for i in range(2)]
    assert one.steps_per_epoch == 3 and one.batch(2)['image'].shape == (5, 24, 24, 3)
    for step in (0, 3, 4):
      b = one.batch(step)
      assert b['image'].shape == (8, 24, 24, 3) and b['image'].dtype == np.float32
      assert 0.0 <= b['image'].min() and b['image'].max() <= 1.0
      assert_batches_equal(b, concat_hosts([h.batch(step) for h in two]))
    evals = list(birds.eval_batches('val', 4))
    assert [e['image'].shape for e in evals] == [(4, 24, 24, 3)]
    np.testing.assert_array_equal(evals[0]['mask'], [1, 1, 1, 0])

    dtd = data.build_datasets(cfg(dataset='dtd', image_size=16, val_fraction=0.25))
    assert dtd.num_classes == 47
    # DTD's training pool is train + validation of the official split.
    assert len(dtd.train) + len(dtd.val) == 48 and len(dtd.test) == 24
    assert ds_loader(dtd, 8).batch(0)['image'].shape == (8, 16, 16, 3)

    dogs = data.build_datasets(cfg(dataset='stanford_dogs', image_size=16))
    assert dogs.num_classes == 120


class TwinsTinyGray(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A real (not mocked) TFDS dataset of grayscale PNGs, prepared without TensorFlow."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'label': tfds.features.ClassLabel(num_classes=3)
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(6), 'test': self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'image': Image.fromarray(tiny_gray_image(n, i)), 'label': i % 3}


def tiny_gray_image(n, i):
  return np.random.default_rng([n, i]).integers(0, 256, (10 + i, 12), dtype=np.uint8)


def test_prepared_tfds_dataset_is_read_without_tensorflow(tmp_path):
  TwinsTinyGray(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  source = data.TfdsSource('twins_tiny_gray', 'train', str(tmp_path))
  assert len(source) == 6 and source.num_classes == 3
  seen = set()
  for k in range(6):
    image, label = source[k]
    i = image.shape[0] - 10  # TFDS shuffles examples when preparing; the height tells which
    seen.add(i)
    assert image.shape == (10 + i, 12, 3) and image.dtype == np.uint8 and label == i % 3
    for c in range(3):  # grayscale -> 3 equal channels, lossless PNG round trip
      np.testing.assert_array_equal(image[:, :, c], tiny_gray_image(6, i))
  assert seen == set(range(6))
  batch = Loader(source, 4, seed=0, augment='imagenet', image_size=8).batch(0)
  assert batch['image'].shape == (4, 8, 8, 3)
  # A worker process reopens the prepared dataset by name and reads the same batch.
  assert_batches_equal(
      batch,
      Loader(source, 4, seed=0, augment='imagenet', image_size=8, worker_count=1).batch(0))


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as err:
    data.build_datasets(cfg(dataset='cifar10', data_dir=str(tmp_path)))
  message, details = str(err.value), err.value.details
  assert 'cifar10' in message and str(tmp_path) in message and '\n' not in message
  assert "tfds.builder('cifar10'" in details and 'download_and_prepare()' in details
  assert "file_format='array_record'" in details and 'tensorflow-cpu' in details


# ------------------------------------------------------------------------------------------
# Validation split.


def test_val_split_disjoint_sized_and_seeded():
  train, val = data.split_train_val(1000, 0.05, seed=7)
  assert len(val) == 50 and len(train) == 950
  assert not set(train) & set(val) and set(train) | set(val) == set(range(1000))
  again_train, again_val = data.split_train_val(1000, 0.05, seed=7)
  np.testing.assert_array_equal(val, again_val)
  np.testing.assert_array_equal(train, again_train)
  assert not np.array_equal(val, data.split_train_val(1000, 0.05, seed=8)[1])
  assert len(data.split_train_val(1000, 0.0, seed=7)[1]) == 0
  assert len(data.split_train_val(10, 0.01, seed=7)[1]) == 1  # at least one when > 0

  def val_images(seed):
    ds = data.build_datasets(cfg(dataset='digits', seed=seed, val_fraction=0.1))
    return ds, {ds.val[i][0].tobytes() for i in range(len(ds.val))}

  ds, v1 = val_images(1)
  train_ids = set(ds.train.indices)
  assert not train_ids & set(ds.val.indices)
  assert len(ds.val) == round(0.1 * (len(ds.train) + len(ds.val)))
  assert val_images(1)[1] == v1 and val_images(2)[1] != v1
  assert data.build_datasets(cfg(dataset='digits', val_fraction=0.0)).val is None


# ------------------------------------------------------------------------------------------
# Training batches: determinism, resume, hosts, epochs.


def test_train_loader_resume_hosts_and_epochs():
  source = random_source(40, size=8)
  make = lambda **kw: Loader(source, 8, seed=5, augment='cifar', image_size=8, **kw)
  loader = make()
  assert loader.steps_per_epoch == 5
  steps = [0, 4, 5, 11, 23]
  reference = all_train_batches(loader, steps)
  for other in (make(), make(threads=3)):
    for ref, b in zip(reference, all_train_batches(other, steps)):
      assert_batches_equal(ref, b)
  for count in (2, 4):
    hosts = [make(process_index=i, process_count=count) for i in range(count)]
    for step, ref in zip(steps, reference):
      parts = [h.batch(step) for h in hosts]
      assert all(p['image'].shape[0] == 8 // count for p in parts)
      assert_batches_equal(ref, concat_hosts(parts))
  # iterate() (background prefetch) = batch(); a restart at step 7 continues identically.
  it = loader.iterate(start_step=7, num_steps=4)
  for step, b in zip(range(7, 11), it):
    assert_batches_equal(loader.batch(step), b)
  with pytest.raises(StopIteration):
    next(it)
  # Each epoch is a permutation; epochs and seeds differ.
  epoch0 = np.concatenate([loader.indices(k) for k in range(5)])
  epoch1 = np.concatenate([loader.indices(k) for k in range(5, 10)])
  assert sorted(epoch0) == list(range(40)) and sorted(epoch1) == list(range(40))
  assert not np.array_equal(epoch0, epoch1)
  other_seed = Loader(source, 8, seed=6, augment='cifar', image_size=8)
  assert not np.array_equal(other_seed.batch(0)['image'], reference[0]['image'])


def test_last_batch_partial_or_dropped_and_iterator_close():
  source = random_source(10, size=4)
  dropping = Loader(source, 4, seed=0, last_batch='drop')
  assert dropping.steps_per_epoch == 2
  assert len(set(np.concatenate([dropping.indices(k) for k in range(2)]))) == 8
  # The reference (DataLoader(drop_last=False)): ceil(10 / 4) = 3 steps, the last one of 2.
  keeping = Loader(source, 4, seed=0)
  assert keeping.plan.last_batch == 'partial' and keeping.steps_per_epoch == 3
  assert [keeping.plan.batch_size_at(k) for k in range(6)] == [4, 4, 2, 4, 4, 2]
  seen = np.concatenate([keeping.indices(k) for k in range(3)])
  assert len(seen) == 10 and set(seen) == set(range(10))
  assert keeping.batch(2)['image'].shape == (2, 4, 4, 3)
  assert keeping.batch(5)['label'].shape == (2,)
  # A lone leftover example is dropped (it could be neither split nor batch-normalised).
  assert Loader(random_source(9, size=4), 4, seed=0).steps_per_epoch == 2

  several = keeping.iterate(0, 6)
  first = [next(several) for _ in range(5)]
  several.close()
  assert_batches_equal(first[4], keeping.batch(4))
  ended = keeping.iterate(4, 2)
  assert len(list(ended)) == 2
  with pytest.raises(StopIteration):
    next(ended)


@pytest.mark.parametrize('shard_multiple', [2, 8])
def test_partial_batch_host_rows(shard_multiple):
  """Two hosts' shares of a partial batch make the global batch; one that does not split
  over the devices is read whole by every host (it is then computed replicated)."""
  source = random_source(22, size=4)  # batches of 8: 8, 8, 6
  make = lambda **kw: Loader(source, 8, seed=1, shard_multiple=shard_multiple, **kw)
  single = make(process_count=1, process_index=0)
  hosts = [make(process_index=i, process_count=2) for i in range(2)]
  assert single.steps_per_epoch == 3
  for step in range(6):
    size = single.plan.batch_size_at(step)
    parts = [h.batch(step) for h in hosts]
    if size % shard_multiple:
      assert not hosts[0].plan.sharded(step)
      for p in parts:
        assert_batches_equal(single.batch(step), p)
    else:
      assert hosts[0].plan.sharded(step)
      assert_batches_equal(single.batch(step), concat_hosts(parts))


class Broken(data.ArraySource):

  def __getitem__(self, i):
    raise RuntimeError('cannot decode example')


@pytest.mark.parametrize('worker_count', [0, 1])
def test_errors_in_workers_reach_the_consumer(worker_count):
  broken = Broken(np.zeros((8, 4, 4, 3), np.uint8), np.zeros(8))
  with pytest.raises(RuntimeError, match='cannot decode'):
    next(Loader(broken, 4, seed=0, image_size=4, worker_count=worker_count).iterate(0, 2))


def test_worker_processes_and_threads_change_nothing():
  """Every batch is the same with grain worker processes, threads, or neither."""
  source = random_source(45, size=12, seed=3)
  make = lambda **kw: Loader(source, 16, seed=2, augment='cifar', image_size=12, **kw)
  reference = list(make().iterate(0, 6))
  assert [len(b['label']) for b in reference] == [16, 16, 13] * 2
  for options in (dict(worker_count=2), dict(threads=3), dict(worker_count=1, threads=2)):
    for ref, b in zip(reference, make(**options).iterate(0, 6)):
      assert_batches_equal(ref, b)
  # A restart at any step continues identically.
  for ref, b in zip(reference[4:], make(worker_count=2).iterate(4, 2)):
    assert_batches_equal(ref, b)


# ------------------------------------------------------------------------------------------
# Evaluation batches.


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_covers_every_example_once(process_count):
  n, batch = 37, 8
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
  source = data.ArraySource(images, np.arange(n), num_classes=n)
  per_host = [
      eval_list(source, batch, image_size=4, process_index=i, process_count=process_count)
      for i in range(process_count)
  ]
  assert data.num_eval_batches(n, batch) == 5 and all(len(h) == 5 for h in per_host)
  merged = [concat_hosts(parts) for parts in zip(*per_host)]
  assert all(b['image'].shape == (batch, 4, 4, 3) for b in merged)
  assert all(p['image'].shape[0] == batch // process_count for h in per_host for p in h)
  mask = np.concatenate([b['mask'] for b in merged])
  labels = np.concatenate([b['label'] for b in merged])
  images_out = np.concatenate([b['image'] for b in merged])
  assert mask.dtype == np.float32 and mask.sum() == n
  np.testing.assert_array_equal(mask, np.arange(5 * batch) < n)
  np.testing.assert_array_equal(labels[:n], np.arange(n))
  np.testing.assert_allclose(images_out[:n, 0, 0, 0] * 255, np.arange(n), atol=1e-4)
  assert (images_out[n:] == 0).all() and (labels[n:] == 0).all()


# ------------------------------------------------------------------------------------------
# Augmentations.


def test_cifar_augmentation_matches_manual_reference():
  source = random_source(32, size=32, seed=4)
  loader = Loader(source, 16, seed=11, augment='cifar', image_size=32)
  step = loader.steps_per_epoch + 1  # epoch 1, second batch
  batch = loader.batch(step)
  indices = loader.indices(step)
  shifted = flipped = 0
  for row in range(16):
    original = source[int(indices[row])][0]
    padded = np.pad(original, ((4, 4), (4, 4), (0, 0)))
    # Manual reference from the documented draws: top, left, flip.
    rng = data.example_rng(11, 1, 16 + row)
    top, left = rng.integers(0, 9), rng.integers(0, 9)
    flip = rng.random() < 0.5
    expected = padded[top:top + 32, left:left + 32]
    expected = expected[:, ::-1] if flip else expected
    np.testing.assert_array_equal(batch['image'][row], expected / np.float32(255))
    # Independently of the RNG protocol: the output is one of the 9 x 9 x 2 crops/flips.
    out = np.rint(batch['image'][row] * 255).astype(np.uint8)
    candidates = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
                  if np.array_equal(out, (lambda c: c[:, ::-1] if f else c)(padded[t:t + 32,
                                                                                   l:l + 32]))]
    assert candidates
    shifted += (top, left) != (4, 4)
    flipped += flip
  assert shifted >= 8 and 2 <= flipped <= 14
  # Evaluation does not augment.
  evaluation = next(iter(eval_list(source, 4, image_size=32, augment='cifar')))
  np.testing.assert_array_equal(evaluation['image'][2], source[2][0] / np.float32(255))


def test_imagenet_test_transform_is_resize_256_center_crop_224():
  rng = np.random.default_rng(0)
  # Shorter side already 256: no resize; crop rows 16..240, columns (300 - 224) / 2 = 38..262.
  image = rng.integers(0, 256, (256, 300, 3), dtype=np.uint8)
  out = data.transform(image, train=False, augment='imagenet', image_size=224, resize_size=256)
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out, image[16:240, 38:262] / np.float32(255))
  # 300 x 400: bilinear (PIL, as torchvision) to 256 x int(256 * 400 / 300) = 256 x 341, then
  # the crop offsets round((256 - 224) / 2) = 16 and round((341 - 224) / 2) = round(58.5) = 58.
  image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
  resized = np.asarray(Image.fromarray(image).resize((341, 256), Image.BILINEAR))
  out = data.transform(image, train=False, augment='imagenet', image_size=224, resize_size=256)
  np.testing.assert_array_equal(out, resized[16:240, 58:282] / np.float32(255))
  # A portrait image: the width becomes 256.
  tall = data.resize_shorter_side(rng.integers(0, 256, (500, 200, 3), dtype=np.uint8), 256)
  assert tall.shape == (640, 256, 3)
  # Datasets built for the high-resolution setting default to 224 / 256.
  with mocked_tfds(4):
    ds = data.build_datasets(cfg(dataset='dtd'))
  assert (ds.image_size, ds.resize_size, ds.augment) == (224, 256, 'imagenet')


def test_random_resized_crop_params():
  for seed in range(200):
    rng = np.random.default_rng(seed)
    top, left, h, w = data.random_resized_crop_params(256, 320, rng)
    assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 320
    assert 0.07 * 256 * 320 <= h * w <= 256 * 320
  # A very wide image never fits a 3/4..4/3 crop of >= 8% area: torchvision's central fallback.
  top, left, h, w = data.random_resized_crop_params(10, 1000, np.random.default_rng(0))
  assert (top, h, w, left) == (0, 10, 13, (1000 - 13) // 2)
  out = data.transform(np.zeros((40, 50, 3), np.uint8), train=True, augment='imagenet',
                       image_size=16, rng=np.random.default_rng(0))
  assert out.shape == (16, 16, 3)


# ------------------------------------------------------------------------------------------
# Digits and image folders.


def test_digits_source_subsets_and_upsampling():
  from sklearn.datasets import load_digits
  raw = load_digits()
  full = data.digits_source()
  assert len(full) == 1797 and full.num_classes == 10
  image, label = full[0]
  assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and label == raw.target[0]
  np.testing.assert_array_equal(image[:, :, 1], np.rint(raw.images[0] * 255 / 16))
  big = data.digits_source(size=32)[0][0]
  np.testing.assert_array_equal(big, np.repeat(np.repeat(image, 4, 0), 4, 1))

  subset = data.digits_source(classes=[7, 2])
  assert subset.num_classes == 2 and subset.class_names == ['7', '2']
  assert len(subset) == (raw.target == 7).sum() + (raw.target == 2).sum()
  assert (subset.labels == 0).sum() == (raw.target == 7).sum()

  a = data.build_datasets(
      cfg(dataset='digits', digits_classes=[0, 1, 2, 3, 4], seed=0, val_fraction=0.05))
  b = data.build_datasets(
      cfg(dataset='digits', digits_classes=[0, 1, 2, 3, 4], seed=9, val_fraction=0.05))
  assert a.num_classes == 5 and a.image_size == 32 and a.augment == 'none'
  images = lambda source: collections.Counter(source[i][0].tobytes() for i in range(len(source)))
  assert images(a.test) == images(b.test)  # the test split does not depend on the seed
  # train + val + test is exactly the chosen classes (as a multiset: a partition).
  assert images(a.train) + images(a.val) + images(a.test) == images(
      data.digits_source(size=32, classes=[0, 1, 2, 3, 4]))
  assert images(a.val) != images(b.val)
  batch = ds_loader(a, 16).batch(0)
  assert batch['image'].shape == (16, 32, 32, 3) and set(batch['label']) <= set(range(5))
  others = data.build_datasets(cfg(dataset='digits', digits_classes=[5, 6, 7, 8, 9]))
  assert others.num_classes == 5 and set(others.test.labels) == set(range(5))


def make_folder(root, classes, sizes, mode='RGB', ext='png'):
  rng = np.random.default_rng(len(str(root)))
  for name in classes:
    os.makedirs(root / name, exist_ok=True)
    for k, (h, w) in enumerate(sizes):
      shape = (h, w) if mode == 'L' else (h, w, 3)
      Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8),
                      mode).save(root / name / f'img{k}.{ext}')


def test_image_folder_dataset(tmp_path):
  train, test = tmp_path / 'train', tmp_path / 'test'
  make_folder(train, ['b_dog', 'a_cat', 'c_owl'], [(20, 30), (40, 25), (18, 18)])
  make_folder(train, ['a_cat'], [(21, 22)], mode='L', ext='jpg')  # grayscale JPEG
  (train / 'c_owl' / 'notes.txt').write_text('not an image')
  make_folder(test, ['a_cat', 'b_dog', 'c_owl'], [(25, 20)])
  ds = data.build_datasets(
      cfg(dataset='folder', folder_train=str(train), folder_test=str(test), image_size=16,
          resize_size=20, val_fraction=0.1, seed=0))
  assert ds.num_classes == 3 and ds.class_names == ['a_cat', 'b_dog', 'c_owl']
  assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 1, 3)
  pool = ds.train.source
  assert list(pool.labels) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
  gray = pool[0][0]  # img0.jpg sorts first in a_cat
  assert pool.files[0].endswith('img0.jpg') and gray.shape == (21, 22, 3)
  assert (gray[:, :, 0] == gray[:, :, 1]).all()
  batch = ds_loader(ds, 3).batch(0)
  assert batch['image'].shape == (3, 16, 16, 3) and batch['image'].dtype == np.float32
  evals = list(ds.eval_batches('test', 4))
  assert len(evals) == 1 and list(evals[0]['label']) == [0, 1, 2, 0]
  np.testing.assert_array_equal(evals[0]['mask'], [1, 1, 1, 0])

  make_folder(tmp_path / 'bad_test', ['a_cat', 'zebra'], [(8, 8)])
  with pytest.raises(ValueError, match='zebra'):
    data.build_datasets(
        cfg(dataset='folder', folder_train=str(train), folder_test=str(tmp_path / 'bad_test')))


# ------------------------------------------------------------------------------------------
# Configuration errors.


def test_configuration_errors(tmp_path):
  with pytest.raises(ValueError, match='unknown dataset.*cifar10.*digits'):
    data.build_datasets(cfg(dataset='imagenet'))
  for bad in (0.5, -0.1, 0.9, 'a'):
    with pytest.raises(ValueError, match=r'val_fraction must be in \[0, 0.5\)'):
      data.build_datasets(cfg(dataset='digits', val_fraction=bad))
  with pytest.raises(ValueError, match='folder_test'):
    data.build_datasets(cfg(dataset='folder', folder_train=str(tmp_path)))
  with pytest.raises(errors.DataError, match='folder_train'):
    data.build_datasets(
        cfg(dataset='folder', folder_train=str(tmp_path / 'missing'), folder_test=str(tmp_path)))
  with pytest.raises(errors.DataError, match='no class subfolders'):
    data.build_datasets(cfg(dataset='folder', folder_train=str(tmp_path),
                            folder_test=str(tmp_path)))
  with pytest.raises(ValueError, match='unknown augment'):
    data.build_datasets(cfg(dataset='digits', augment='autoaugment'))
  with pytest.raises(ValueError, match='digits_classes'):
    data.build_datasets(cfg(dataset='digits', digits_classes=[1, 1]))
  with pytest.raises(ValueError, match='digits_classes'):
    data.build_datasets(cfg(dataset='digits', digits_classes=[3, 10]))
  source = random_source(12, size=4)
  with pytest.raises(ValueError, match='divisible by the number of processes'):
    Loader(source, 6, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match='divisible by the number of processes'):
    eval_list(source, 6, image_size=4, process_count=4)
  with pytest.raises(ValueError, match='smaller than one batch'):
    Loader(source, 16, seed=0, last_batch='drop')
  with pytest.raises(ValueError, match='last_batch must be one of'):
    Loader(source, 4, seed=0, last_batch='fill')
