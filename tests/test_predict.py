"""twins_jax.predict on image files, folders and arrays: the preprocessing a model stores (or
the default for a ported one), top-k with class names, and the .npy / .json / .csv outputs."""

import csv
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from twins_jax import errors, model_io, models
from twins_jax import predict as predict_lib
from twins_jax.data import transforms
from twins_jax.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINED_PREP = {'augment': 'imagenet', 'image_size': 32, 'resize_size': 40}


def random_variables(spec, seed=0):
  """Small random values in the shapes of the model's variables (no jax.random init)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(functools.partial(spec.build().init, mode='train'),
                            jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))

  def fill(path, s):
    name = path[-1].key
    if name == 'var' or name.endswith('scale'):
      return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
    return rng.normal(0, 0.3, s.shape).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def make_model_dir(path, spec, metadata):
  variables = random_variables(spec)
  model_io.save_model_dir(path, variables, spec, metadata)
  return spec.build(), variables


def write_images(folder):
  """Images of several sizes and formats, in a folder with a subfolder, plus files that are
  not images (skipped when the folder is read)."""
  rng = np.random.default_rng(0)
  (folder / 'sub').mkdir(parents=True)
  files = []
  for name, (h, w) in (('b.png', (50, 70)), ('a.jpg', (64, 48)), ('sub/c.png', (40, 40)),
                       ('sub/d.bmp', (33, 90))):
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(folder / name)
    files.append(str(folder / name))
  Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / 'sub' / 'grey.png')
  files.append(str(folder / 'sub' / 'grey.png'))
  (folder / 'notes.txt').write_text('not an image')
  (folder / '.hidden.png').write_bytes(b'')
  return sorted(files)


def expected_logits(model, variables, files, prep):
  x = np.stack([
      transforms.transform(np.asarray(Image.open(f).convert('RGB')), train=False,
                           augment=prep['augment'], image_size=prep['image_size'],
                           resize_size=prep['resize_size']) for f in files
  ])
  return predict_lib.predict(model, variables, x, batch_size=len(files))


def softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


@pytest.fixture(scope='module')
def trained_dir(tmp_path_factory):
  """A model directory as training writes it: preprocessing and class names stored."""
  d = tmp_path_factory.mktemp('trained') / 'model'
  spec = models.ModelSpec('tiny_resnet', 4)
  model, variables = make_model_dir(
      d, spec, {'preprocessing': TRAINED_PREP, 'class_names': ['cat', 'dog', 'owl', 'yak']})
  return d, model, variables


def test_folder_of_images_json_and_csv(trained_dir, tmp_path, capsys):
  d, model, variables = trained_dir
  files = write_images(tmp_path / 'imgs')
  want = expected_logits(model, variables, files, TRAINED_PREP)
  p_want = softmax(want)

  out = tmp_path / 'p.json'
  # Batch 2 for 5 images: the last batch is padded and the padding dropped.
  assert predict_lib.main([
      str(d), '--images',
      str(tmp_path / 'imgs'), '--out',
      str(out), '--top-k', '2', '--batch-size', '2'
  ]) == 0
  printed = capsys.readouterr().out
  assert 'resize 40, 32x32 (stored by the training run)' in printed
  rows = json.loads(out.read_text())
  assert [r['file'] for r in rows] == files  # sorted; .txt and hidden files skipped
  names = ['cat', 'dog', 'owl', 'yak']
  for r, z, p in zip(rows, want, p_want):
    top = list(np.argsort(-z, kind='stable')[:2])
    assert r['classes'] == top and r['names'] == [names[c] for c in top]
    np.testing.assert_allclose(r['probabilities'], p[top], rtol=1e-5, atol=1e-6)
    assert f'{r["file"]}: {names[top[0]]} {p[top[0]]:.3f}' in printed

  csv_out = tmp_path / 'p.csv'
  assert predict_lib.main([str(d), '--images', *files[:3], '--out', str(csv_out)]) == 0
  with open(csv_out, newline='') as f:
    table = list(csv.reader(f))
  assert table[0] == ['file'] + [
      f'{c}_{i}' for i in range(1, 5) for c in ('class', 'name', 'probability')
  ]  # top-k 5 of a 4-class model: 4
  assert [row[0] for row in table[1:]] == files[:3]
  for row, z, p in zip(table[1:], want, p_want):
    top = np.argsort(-z, kind='stable')
    assert [int(v) for v in row[1::3]] == list(top) and row[2::3] == [names[c] for c in top]
    np.testing.assert_allclose([float(v) for v in row[3::3]], p[top], rtol=1e-5)

  npy_out = tmp_path / 'logits.npy'
  assert predict_lib.main([str(d), '--images', files[1], files[0], '--out', str(npy_out)]) == 0
  np.testing.assert_allclose(np.load(npy_out), want[[1, 0]], atol=1e-5, rtol=0)


def test_default_preprocessing_of_a_ported_model(tmp_path, capsys):
  """No stored preprocessing: ImageNet's resize + centre crop to the model's internal resize
  (else 224), resize size in the 256/224 proportion; the flags override; no class names:
  indices."""
  d = tmp_path / 'ported'
  spec = models.ModelSpec('tiny_resnet', 3, resize=48)
  model, variables = make_model_dir(d, spec, {'created_by': 'twins_jax.port'})
  meta = model_io.read_model_json(d)
  assert predict_lib.preprocessing(meta) == dict(
      augment='imagenet', image_size=48, resize_size=55,
      origin='default for a model without stored preprocessing')
  no_resize = dict(meta, spec=spec.replace(resize=None))
  assert predict_lib.preprocessing(no_resize)['image_size'] == 224
  assert predict_lib.preprocessing(no_resize)['resize_size'] == 256
  assert predict_lib.preprocessing(meta, image_size=40)['resize_size'] == 46
  assert predict_lib.preprocessing(meta, 40, 64)['resize_size'] == 64
  with pytest.raises(DataError, match='smaller than the image size'):
    predict_lib.preprocessing(meta, 40, 30)
  trained = {'spec': spec, 'metadata': {'preprocessing': TRAINED_PREP}}
  assert predict_lib.preprocessing(trained)['resize_size'] == 40
  assert predict_lib.preprocessing(trained, image_size=64)['resize_size'] == 73

  files = write_images(tmp_path / 'imgs')
  out = tmp_path / 'p.json'
  assert predict_lib.main([str(d), '--images', str(tmp_path / 'imgs'), '--out', str(out)]) == 0
  want = expected_logits(model, variables, files,
                         dict(augment='imagenet', image_size=48, resize_size=55))
  rows = json.loads(out.read_text())
  for r, z in zip(rows, want):
    top = list(np.argsort(-z, kind='stable'))
    assert r['classes'] == top and r['names'] == [str(c) for c in top]
  assert 'resize 55, 48x48' in capsys.readouterr().out


def test_npy_inputs_uint8_and_float(trained_dir, tmp_path):
  d, model, variables = trained_dir
  x8 = np.random.default_rng(1).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
  want = predict_lib.predict(model, variables, x8.astype(np.float32) / 255)  # used as it is
  np.save(tmp_path / 'x8.npy', x8)
  np.save(tmp_path / 'xf.npy', x8.astype(np.float64) / 255)
  for name in ('x8.npy', 'xf.npy'):
    out = tmp_path / f'{name}.json'
    assert predict_lib.main([str(d), '--images', str(tmp_path / name), '--out', str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r['file'] for r in rows] == [f'{tmp_path / name}[{i}]' for i in range(3)]
    assert [r['classes'][0] for r in rows] == list(np.argmax(want, 1))
  assert predict_lib.main(
      [str(d), '--images',
       str(tmp_path / 'x8.npy'), '--out',
       str(tmp_path / 'l.npy')]) == 0
  np.testing.assert_allclose(np.load(tmp_path / 'l.npy'), want, atol=1e-6, rtol=0)


def test_predict_input_and_output_errors(trained_dir, tmp_path, capsys):
  d, _, _ = trained_dir
  files = write_images(tmp_path / 'imgs')
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'broken.png').write_bytes(b'\x89PNG not really')
  np.save(tmp_path / 'x.npy', np.zeros((1, 8, 8, 3), np.float32))
  cases = [
      (['--images', files[0], '--out', str(tmp_path / 'o.txt')], '.npy (logits), .json or .csv'),
      (['--images', str(tmp_path / 'empty')], 'no image files'),
      (['--images', str(tmp_path / 'broken.png')], 'cannot read the image'),
      (['--images', str(tmp_path / 'nowhere.png')], 'does not exist'),
      (['--images', files[0], str(tmp_path / 'x.npy')], 'only --images input'),
      (['--images', files[0], '--top-k', '0'], '--top-k must be positive'),
      (['--images', files[0], '--image-size', '0'], '--image-size must be positive'),
  ]
  for args, msg in cases:
    assert predict_lib.main([str(d), *args]) == errors.EXIT_USER_ERROR, args
    err = capsys.readouterr().err
    assert msg in err and err.count('\n') == 1, (args, err)
  assert not (tmp_path / 'o.txt').exists()


def test_predict_command_line(trained_dir, tmp_path):
  """``python -m twins_jax.predict`` itself, on a folder."""
  d, model, variables = trained_dir
  files = write_images(tmp_path / 'imgs')
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  r = subprocess.run([
      sys.executable, '-m', 'twins_jax.predict',
      str(d), '--images',
      str(tmp_path / 'imgs'), '--top-k', '1', '--out',
      str(tmp_path / 'l.npy')
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  want = expected_logits(model, variables, files, TRAINED_PREP)
  np.testing.assert_allclose(np.load(tmp_path / 'l.npy'), want, atol=1e-5, rtol=0)
  names = ['cat', 'dog', 'owl', 'yak']
  for f, z in zip(files, want):
    assert f'{f}: {names[int(np.argmax(z))]} ' in r.stdout
