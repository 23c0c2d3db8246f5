"""Porting PyTorch checkpoints (twins_jax.port), model directories and prediction.

Every checkpoint here is made by the test itself with torch from
``tests/torch_reference.py`` (random weights, non-trivial BN statistics).
"""

import collections
import copy
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
dill = pytest.importorskip('dill')

sys.path.insert(0, os.path.dirname(__file__))
import torch_reference as tr  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from twins_jax import model_io  # noqa: E402
from twins_jax import models  # noqa: E402
from twins_jax import port  # noqa: E402
from twins_jax import predict as predict_lib  # noqa: E402
from twins_jax.torch_pickle import UnsafeCheckpointError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ---------------------------------------------------------------- helpers


def torch_model(arch, num_classes, resize=None, seed=0):
  torch.manual_seed(seed)
  m = getattr(tr, arch)(num_classes, resize)
  tr.randomize_bn_(m, torch.Generator().manual_seed(seed + 1))
  return m.eval()


def torch_logits(m, x_nhwc):
  with torch.no_grad():
    return m(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def images(n, size, seed=0):
  return np.random.RandomState(seed).rand(n, size, size, 3).astype(np.float32)


def save_plain(m, path):
  torch.save(m.state_dict(), path)
  return path


def robustness_dict(m, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """What MadryLab ``robustness`` saves (twins-reference.md section 5)."""
  sd = collections.OrderedDict()
  norm = {'new_mean': torch.tensor(mean).view(3, 1, 1), 'new_std': torch.tensor(std).view(3, 1, 1)}
  for k, v in norm.items():
    sd[f'module.normalizer.{k}'] = v.clone()
  for k, v in m.state_dict().items():
    sd[f'module.model.{k}'] = v.clone()
  for k, v in norm.items():
    sd[f'module.attacker.normalize.{k}'] = v.clone()
  for k, v in m.state_dict().items():
    sd[f'module.attacker.model.{k}'] = v.clone()
  trained = copy.deepcopy(m)  # the optimizer's step must not touch m
  opt = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  for p in trained.parameters():
    p.grad = torch.zeros_like(p)
  opt.step()
  sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30)
  return {
      'model': sd, 'optimizer': opt.state_dict(), 'schedule': sched.state_dict(), 'epoch': 90,
      'amp': None, 'nat_prec1': torch.tensor(63.9), 'adv_prec1': 38.5
  }


def save_robustness(m, path, legacy=True, **kwargs):
  torch.save(robustness_dict(m, **kwargs), path, pickle_module=dill,
             _use_new_zipfile_serialization=not legacy)
  return path


@functools.lru_cache(maxsize=None)
def jitted_apply(arch, num_classes, resize, mode):
  model = models.create_model(arch, num_classes, resize=resize)
  return jax.jit(functools.partial(model.apply, mode=mode))


def shapes_of(tree):
  return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


def init_shapes(model):
  return shapes_of(
      jax.eval_shape(functools.partial(model.init, mode='train'), jax.random.PRNGKey(0),
                     jnp.zeros((1, 32, 32, 3))))


def random_variables(model, seed=0):
  """Random values in the shapes of the model's variables (no slow jax.random init)."""
  rng = np.random.RandomState(seed)
  abstract = jax.eval_shape(functools.partial(model.init, mode='train'), jax.random.PRNGKey(0),
                            jnp.zeros((1, 32, 32, 3)))
  return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), abstract)


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)


# --------------------------------------------------- logits parity (the core)

CASES = [  # arch, image size, resize
    ('resnet18', 64, None),
    ('resnet18', 32, 224),
    ('resnet50', 64, None),
    ('resnet50', 32, 224),
]


@pytest.mark.parametrize('arch,size,resize', CASES)
def test_port_matches_pytorch(tmp_path, arch, size, resize):
  m = torch_model(arch, 10, resize)
  x = images(2, size)
  ref = torch_logits(m, x)
  files = {
      'robustness': save_robustness(m, tmp_path / 'robust.ckpt'),
      'plain': save_plain(m, tmp_path / 'plain.pt')
  }
  model = models.create_model(arch, 10, resize=resize)
  want_shapes = init_shapes(model)
  for fmt, path in files.items():
    variables, report = port.port_checkpoint(path, models.ModelSpec(arch, 10, resize=resize))
    assert report.ok and not report.warnings, report.summary()
    assert not report.head_replaced
    assert shapes_of(variables) == want_shapes
    if fmt == 'robustness':
      assert report.checkpoint_format == 'robustness'
      assert report.checkpoint_info['epoch'] == 90
      assert report.ignored['attacker copies (duplicate weights)'] == len(m.state_dict())
    for mode in ('eval', 'frozen'):
      out = np.asarray(jitted_apply(arch, 10, resize, mode)(variables, x))
      err = float(np.abs(out - ref).max())
      print(f'{arch} {size}->{resize} {fmt} {mode}: max-abs {err:.3g} (|logits| <= '
            f'{np.abs(ref).max():.3g})')
      assert err < TOL, (fmt, mode, err)


def test_both_branches_filled_from_one_bn(tmp_path):
  m = torch_model('tiny_resnet', 5)
  v, _ = port.port_checkpoint(save_plain(m, tmp_path / 'a.pt'), models.ModelSpec('tiny_resnet', 5))
  sd = m.state_dict()
  bn = v['params']['layer2_0']['downsample_1']
  for branch in ('adaptive', 'frozen'):
    np.testing.assert_array_equal(bn[f'{branch}_scale'], sd['layer2.0.downsample.1.weight'])
    np.testing.assert_array_equal(bn[f'{branch}_bias'], sd['layer2.0.downsample.1.bias'])
  for coll in ('batch_stats', 'frozen_stats'):
    np.testing.assert_array_equal(v[coll]['bn1']['var'], sd['bn1.running_var'])
    np.testing.assert_array_equal(v[coll]['bn1']['mean'], sd['bn1.running_mean'])
  np.testing.assert_array_equal(v['params']['conv1']['kernel'],
                                sd['conv1.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v['params']['fc']['kernel'], sd['fc.weight'].numpy().T)


@pytest.mark.parametrize('twin,share_affine', [(True, True), (False, False)])
def test_shared_affine_and_plain_models(tmp_path, twin, share_affine):
  m = torch_model('tiny_resnet', 5)
  x = images(3, 32)
  path = save_plain(m, tmp_path / 'a.pt')
  v, report = port.port_checkpoint(
      path, models.ModelSpec('tiny_resnet', 5, twin=twin, share_affine=share_affine))
  model = models.create_model('tiny_resnet', 5, twin=twin, share_affine=share_affine)
  assert shapes_of(v) == init_shapes(model)
  assert ('frozen_stats' in v) == twin
  modes = ('eval', 'frozen') if twin else ('eval',)
  for mode in modes:
    np.testing.assert_allclose(model.apply(v, x, mode=mode), torch_logits(m, x), atol=TOL, rtol=0)


# ------------------------------------------------------------------- CLIs


def test_port_and_predict_cli(tmp_path):
  m = torch_model('resnet18', 10)
  x = images(5, 64, seed=3)
  ref = torch_logits(m, x)
  ckpt = save_robustness(m, tmp_path / 'resnet18_linf.ckpt')
  dst = tmp_path / 'model'
  names = [f'class {i}' for i in range(10)]
  (tmp_path / 'names.txt').write_text('\n'.join(names) + '\n\n')
  r = run_cli('-m', 'twins_jax.port', str(ckpt), str(dst), '--arch', 'resnet18', '--num-classes',
              '10', '--class-names', str(tmp_path / 'names.txt'))
  assert r.returncode == 0, r.stderr
  assert 'robustness' in r.stdout and 'head: kept' in r.stdout
  assert f'sha256: {port.file_sha256(ckpt)}' in r.stdout

  model, variables, meta = model_io.load_model_dir(dst)
  assert meta['spec'] == models.ModelSpec(arch='resnet18', num_classes=10, resize=None, twin=True,
                                          share_affine=False)
  assert meta['metadata']['source'] == str(ckpt)
  assert meta['metadata']['port_report']['loaded'] == 102
  assert meta['metadata']['source_sha256'] == port.file_sha256(ckpt)
  assert meta['metadata']['class_names'] == names
  assert shapes_of(variables) == init_shapes(model)

  np.save(tmp_path / 'x.npy', x)
  out = tmp_path / 'logits.npy'
  # Batch 2 for 5 images: the last batch is padded, and the padding dropped.
  r = run_cli('-m', 'twins_jax.predict', str(dst), '--images', str(tmp_path / 'x.npy'), '--out',
              str(out), '--batch-size', '2')
  assert r.returncode == 0, r.stderr
  logits = np.load(out)
  assert logits.shape == (5, 10) and logits.dtype == np.float32
  err = float(np.abs(logits - ref).max())
  print(f'predict CLI resnet18 64: max-abs {err:.3g}')
  assert err < TOL
  assert f'x.npy[4]: {names[int(np.argmax(ref[4]))]} ' in r.stdout  # top-5 with names

  # The port CLI refuses to overwrite, unless asked.
  r = run_cli('-m', 'twins_jax.port', str(ckpt), str(dst), '--arch', 'resnet18', '--num-classes',
              '10')
  assert r.returncode != 0 and 'not empty' in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.slow
def test_port_and_predict_cli_resnet50_224(tmp_path):
  m = torch_model('resnet50', 10, 224)
  x = images(3, 32, seed=4)
  ref = torch_logits(m, x)
  ckpt = save_robustness(m, tmp_path / 'resnet50_linf_eps4.0.ckpt')
  dst = tmp_path / 'model'
  r = run_cli('-m', 'twins_jax.port', str(ckpt), str(dst), '--arch', 'resnet50', '--num-classes',
              '10', '--resize', '224')
  assert r.returncode == 0, r.stderr
  np.save(tmp_path / 'x.npy', x)
  r = run_cli('-m', 'twins_jax.predict', str(dst), '--images', str(tmp_path / 'x.npy'), '--out',
              str(tmp_path / 'l.npy'), '--batch-size', '2')
  assert r.returncode == 0, r.stderr
  assert float(np.abs(np.load(tmp_path / 'l.npy') - ref).max()) < TOL


def test_predict_function_pads_last_batch(tmp_path):
  m = torch_model('tiny_resnet', 4)
  v, _ = port.port_checkpoint(save_plain(m, tmp_path / 'a.pt'), models.ModelSpec('tiny_resnet', 4))
  model = models.create_model('tiny_resnet', 4)
  x = images(7, 32, seed=5)
  ref = torch_logits(m, x)
  for b in (1, 3, 7, 100):
    out = predict_lib.predict(model, v, x, batch_size=b)
    assert out.shape == (7, 4)
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def test_predict_validates_images(tmp_path):
  model = models.create_model('tiny_resnet', 4)
  v = {}  # never reached: the images are checked first
  good = images(2, 32)
  for bad, msg in ((good[0], 'N x H x W x 3'), (good[..., :1], 'N x H x W x 3'),
                   (good.astype(np.float64), 'float32'), ((good * 255).astype(np.uint8),
                                                          'float32'), (good * 2, r'\[0, 1\]'),
                   (good - 0.5, r'\[0, 1\]'), (np.full_like(good,
                                                            np.nan), 'NaN'), (good[:0], 'empty')):
    with pytest.raises(ValueError, match=msg):
      predict_lib.predict(model, v, bad, 2)
  with pytest.raises(ValueError, match='batch_size'):
    predict_lib.predict(model, v, good, 0)


def test_predict_cli_errors(tmp_path):
  model_io.save_model_dir(tmp_path / 'm', random_variables(models.create_model('tiny_resnet', 4)),
                          dict(arch='tiny_resnet', num_classes=4), {})
  np.save(tmp_path / 'bad.npy', images(2, 32) * 3)
  r = run_cli('-m', 'twins_jax.predict', str(tmp_path / 'm'), '--images', str(tmp_path / 'bad.npy'),
              '--out', str(tmp_path / 'o.npy'))
  assert r.returncode == 2 and '[0, 1]' in r.stderr and 'Traceback' not in r.stderr
  np.save(tmp_path / 'ok.npy', images(2, 32))
  r = run_cli('-m', 'twins_jax.predict', str(tmp_path / 'nowhere'), '--images',
              str(tmp_path / 'ok.npy'), '--out', str(tmp_path / 'o.npy'))
  assert r.returncode == 2 and 'does not exist' in r.stderr and 'Traceback' not in r.stderr
  assert not (tmp_path / 'o.npy').exists()


def test_class_names_files(tmp_path):
  m = torch_model('tiny_resnet', 3)
  (tmp_path / 'n.json').write_text(json.dumps(['a b', 'c', 'd']))
  (tmp_path / 'n.txt').write_text('  a b \nc\n\nd\n')
  assert port.read_class_names(tmp_path / 'n.json') == port.read_class_names(
      tmp_path / 'n.txt') == ['a b', 'c', 'd']
  spec = models.ModelSpec('tiny_resnet', 3)
  ckpt = save_plain(m, tmp_path / 'a.pt')
  port.port_to_dir(ckpt, tmp_path / 'm', spec, class_names=['a b', 'c', 'd'])
  assert model_io.read_model_json(tmp_path / 'm')['metadata']['class_names'] == ['a b', 'c', 'd']
  with pytest.raises(model_io.ModelDirError, match='2 class names for a model with 3'):
    port.port_to_dir(ckpt, tmp_path / 'm2', spec, class_names=['a', 'b'])
  (tmp_path / 'bad.json').write_text('{"a": 1}')
  with pytest.raises(ValueError, match='JSON list'):
    port.read_class_names(tmp_path / 'bad.json')


# ------------------------------------------------------- head replacement


def test_head_replaced_when_num_classes_differs(tmp_path):
  m = torch_model('tiny_resnet', 10)
  path = save_robustness(m, tmp_path / 'r.ckpt')
  v, report = port.port_checkpoint(path, models.ModelSpec('tiny_resnet', 7), seed=3)
  assert report.ok and report.head_replaced
  assert '10 classes' in report.head and '7' in report.head
  assert 'replaced' in report.summary()
  fc = v['params']['fc']
  fan_in = 64
  assert fc['kernel'].shape == (fan_in, 7) and fc['bias'].shape == (7,)
  bound = 1 / np.sqrt(fan_in)
  assert np.abs(fc['kernel']).max() <= bound and np.abs(fc['bias']).max() <= bound
  assert np.abs(fc['kernel']).max() > 0.5 * bound and np.std(fc['kernel']) > 0.3 * bound
  # Seeded; another seed gives another head.
  v2, _ = port.port_checkpoint(path, models.ModelSpec('tiny_resnet', 7), seed=3)
  v3, _ = port.port_checkpoint(path, models.ModelSpec('tiny_resnet', 7), seed=4)
  np.testing.assert_array_equal(v2['params']['fc']['kernel'], fc['kernel'])
  assert not np.array_equal(v3['params']['fc']['kernel'], fc['kernel'])
  # The backbone is the checkpoint's: a torch model with the same fresh head agrees.
  m.fc = torch.nn.Linear(fan_in, 7)
  with torch.no_grad():
    m.fc.weight.copy_(torch.tensor(np.asarray(fc['kernel']).T))
    m.fc.bias.copy_(torch.tensor(np.asarray(fc['bias'])))
  x = images(2, 32)
  out = models.create_model('tiny_resnet', 7).apply(v, x, mode='eval')
  np.testing.assert_allclose(out, torch_logits(m, x), atol=TOL, rtol=0)


# -------------------------------------------- missing / unexpected / mis-shaped


def test_missing_layer_refused_then_allowed(tmp_path):
  m = torch_model('tiny_resnet', 5)
  sd = m.state_dict()
  gone = [k for k in sd if k.startswith(('layer4.0.conv2.', 'layer4.0.bn2.'))]
  for k in gone:
    del sd[k]
  path = tmp_path / 'partial.pt'
  torch.save(sd, path)
  with pytest.raises(port.PortError) as e:
    port.port_checkpoint(path, models.ModelSpec('tiny_resnet', 5))
  want = [
      'layer4.0.bn2.bias', 'layer4.0.bn2.running_mean', 'layer4.0.bn2.running_var',
      'layer4.0.bn2.weight', 'layer4.0.conv2.weight'
  ]
  assert e.value.report.missing == want
  for name in want:  # the error line names the first few; its details, all
    assert name in e.value.details
  assert 'missing from the checkpoint (5): layer4.0.bn2.bias' in str(e.value)
  assert '\n' not in str(e.value) and len(str(e.value)) < 600
  # A pattern covering only part of it is not enough.
  with pytest.raises(port.PortError, match='layer4.0.conv2.weight'):
    port.port_checkpoint(path, models.ModelSpec('tiny_resnet', 5), allow_missing=['layer4.0.bn2.*'])
  # Torch-name or Flax-path globs.
  for patterns in (['layer4.0.conv2.*',
                    'layer4.0.bn2.*'], ['*/layer4_0/conv2/*', '*/layer4_0/bn2/*']):
    v, report = port.port_checkpoint(path, models.ModelSpec('tiny_resnet', 5),
                                     allow_missing=patterns)
    assert report.ok and report.allowed_missing == want
    assert shapes_of(v) == init_shapes(models.create_model('tiny_resnet', 5))
    bn = v['params']['layer4_0']['bn2']
    np.testing.assert_array_equal(bn['adaptive_scale'], 1.0)
    np.testing.assert_array_equal(bn['frozen_bias'], 0.0)
    np.testing.assert_array_equal(v['frozen_stats']['layer4_0']['bn2']['var'], 1.0)
    k = np.asarray(v['params']['layer4_0']['conv2']['kernel'])
    assert k.shape == (3, 3, 64, 64) and 0 < k.std() < 1
    assert 'allowed' in report.summary()


def test_unexpected_and_misshaped_reported_by_name(tmp_path):
  m = torch_model('tiny_resnet', 5)
  sd = m.state_dict()
  sd['layer5.0.conv1.weight'] = torch.zeros(8, 8, 3, 3)
  sd['aux_head.weight'] = torch.zeros(3)
  sd['layer1.0.conv1.weight'] = torch.zeros(8, 8, 1, 1)
  path = tmp_path / 'odd.pt'
  torch.save(sd, path)
  with pytest.raises(port.PortError) as e:
    port.port_checkpoint(path, models.ModelSpec('tiny_resnet', 5))
  msg, report = str(e.value), e.value.report
  assert report.unexpected == ['aux_head.weight', 'layer5.0.conv1.weight']
  assert report.mismatched == [
      'layer1.0.conv1.weight: checkpoint (8, 8, 1, 1), '
      'model expects (8, 8, 3, 3)'
  ]
  assert report.missing == []  # the mis-shaped entry is not also reported missing
  for s in ('aux_head.weight', 'layer5.0.conv1.weight', 'layer1.0.conv1.weight', '(8, 8, 3, 3)'):
    assert s in msg
  # Unexpected entries may be ignored on purpose; a mis-shaped one may not.
  with pytest.raises(port.PortError, match='mis-shaped') as e:
    port.port_checkpoint(path, models.ModelSpec('tiny_resnet', 5),
                         allow_unexpected=['aux_head.*', 'layer5.*'], allow_missing=['*'])
  assert e.value.report.unexpected == []


def test_wrong_arch_refused(tmp_path):
  path = save_plain(torch_model('tiny_resnet', 5), tmp_path / 't.pt')
  with pytest.raises(port.PortError) as e:
    port.port_checkpoint(path, models.ModelSpec('resnet18', 5))
  assert e.value.report.mismatched and 'conv1.weight' in str(e.value)


def test_port_cli_reports_missing(tmp_path):
  m = torch_model('tiny_resnet', 5)
  sd = m.state_dict()
  del sd['layer3.0.conv1.weight']
  torch.save(sd, tmp_path / 'p.pt')
  args = [
      '-m', 'twins_jax.port',
      str(tmp_path / 'p.pt'),
      str(tmp_path / 'out'), '--arch', 'tiny_resnet', '--num-classes', '3'
  ]
  r = run_cli(*args)
  assert r.returncode == 2 and 'layer3.0.conv1.weight' in r.stderr
  assert 'Traceback' not in r.stderr and not (tmp_path / 'out').exists()
  r = run_cli(*args, '--allow-missing', 'layer3.0.conv1.*', '--seed', '1')
  assert r.returncode == 0, r.stderr
  assert 'replaced' in r.stdout and 'layer3.0.conv1.weight' in r.stdout
  _, _, meta = model_io.load_model_dir(tmp_path / 'out')
  rep = meta['metadata']['port_report']
  assert rep['allowed_missing'] == ['layer3.0.conv1.weight'] and rep['head_replaced']


# ------------------------------------------------------ malicious pickles


class _TouchMarker:

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


class _ExecMarker:

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    import builtins
    return (builtins.exec, (f'open({self.marker!r}, "w").close()',))


@pytest.mark.parametrize('evil_cls', [_TouchMarker, _ExecMarker])
@pytest.mark.parametrize('legacy', [True, False])
def test_code_running_checkpoint_refused(tmp_path, evil_cls, legacy):
  m = torch_model('tiny_resnet', 5)
  marker = tmp_path / 'MARKER'
  ckpt = robustness_dict(m)
  ckpt['schedule'] = evil_cls(marker)
  path = tmp_path / 'evil.ckpt'
  torch.save(ckpt, path, pickle_module=dill, _use_new_zipfile_serialization=not legacy)
  assert not marker.exists()
  with pytest.raises(UnsafeCheckpointError):
    port.port_checkpoint(path, models.ModelSpec('tiny_resnet', 5))
  assert not marker.exists()
  with pytest.raises(UnsafeCheckpointError):
    port.port_to_dir(path, tmp_path / 'out', models.ModelSpec('tiny_resnet', 5))
  assert not marker.exists() and not (tmp_path / 'out').exists()
  if legacy and evil_cls is _TouchMarker:  # one CLI run is enough
    r = run_cli('-m', 'twins_jax.port', str(path), str(tmp_path / 'out'), '--arch', 'tiny_resnet',
                '--num-classes', '5')
    assert r.returncode != 0
    assert 'refusing' in r.stderr and 'Traceback' not in r.stderr
    assert not marker.exists() and not (tmp_path / 'out').exists()


# ------------------------------------------------------ other file layouts


@pytest.mark.parametrize(
    'layout', ['state_dict/module.', 'top/module.model.', 'state_dict/model.', 'top/module.'])
def test_robustbench_layouts(tmp_path, layout):
  m = torch_model('tiny_resnet', 10)
  where, prefix = layout.split('/')
  sd = {prefix + k: v for k, v in m.state_dict().items()}
  obj = {'state_dict': sd, 'epoch': 3} if where == 'state_dict' else sd
  path = tmp_path / 'rb.pt'
  torch.save(obj, path)
  v, report = port.port_checkpoint(path, models.ModelSpec('tiny_resnet', 10))
  assert report.ok and report.checkpoint_format == 'state_dict'
  assert ''.join(report.prefixes_stripped) == prefix
  x = images(2, 32)
  np.testing.assert_allclose(
      models.create_model('tiny_resnet', 10).apply(v, x, mode='eval'), torch_logits(m, x), atol=TOL,
      rtol=0)


def test_robustness_normaliser_checked(tmp_path):
  m = torch_model('tiny_resnet', 5)
  path = save_robustness(m, tmp_path / 'cifar.ckpt', mean=(0.4914, 0.4822, 0.4465))
  with pytest.warns(UserWarning, match='not the ImageNet constant'):
    _, report = port.port_checkpoint(path, models.ModelSpec('tiny_resnet', 5))
  assert len(report.warnings) == 2  # model's and attacker's normaliser
  assert all('new_mean' in w for w in report.warnings)


def test_robustness_legacy_state_dict_key_and_attacker_mismatch(tmp_path):
  m = torch_model('tiny_resnet', 5)
  ckpt = robustness_dict(m)
  sd = ckpt.pop('model')
  sd['module.attacker.model.conv1.weight'] = sd['module.attacker.model.conv1.weight'] + 1
  ckpt['state_dict'] = sd
  torch.save(ckpt, tmp_path / 'r.ckpt', pickle_module=dill)
  with pytest.warns(UserWarning, match='attacker'):
    v, report = port.port_checkpoint(tmp_path / 'r.ckpt', models.ModelSpec('tiny_resnet', 5))
  assert report.container == "['state_dict']"
  np.testing.assert_array_equal(v['params']['conv1']['kernel'],
                                m.state_dict()['conv1.weight'].numpy().transpose(2, 3, 1, 0))


def test_not_a_state_dict(tmp_path):
  torch.save({'epoch': 3, 'config': {'lr': 0.1}}, tmp_path / 'x.pt')
  with pytest.raises(port.PortError, match='no state dict'):
    port.port_checkpoint(tmp_path / 'x.pt', models.ModelSpec('tiny_resnet', 5))
  with pytest.raises(FileNotFoundError):
    port.port_checkpoint(tmp_path / 'absent.pt', models.ModelSpec('tiny_resnet', 5))


def test_name_table_roundtrip():
  model = models.create_model('resnet50', 10)
  tv = tr.resnet50(10)
  names = {k for k in tv.state_dict() if not k.endswith('num_batches_tracked')}
  flat = model_io._leaf_table(
      jax.eval_shape(  # pylint: disable=protected-access
          functools.partial(model.init, mode='train'), jax.random.PRNGKey(0),
          jnp.zeros((1, 32, 32, 3))))
  assert {port.flax_to_torch_name(p) for p in flat} == names
  targets = set()
  for name in names:
    ts = port.torch_to_flax(name)
    assert ts and all(port.flax_to_torch_name(t) == name for t, _ in ts)
    targets.update(t for t, _ in ts)
  assert targets == set(flat)
  assert port.torch_to_flax('layer1.0.bn1.num_batches_tracked') == []
  assert port.torch_to_flax('layer1.0.relu.weight') is None


# ----------------------------------------------------------- model dirs


def test_model_dir_roundtrip_and_errors(tmp_path):
  kw = models.ModelSpec(arch='tiny_resnet', num_classes=3, resize=64, twin=True, share_affine=False)
  model = kw.build()
  v = random_variables(model, 1)
  d = tmp_path / 'md'
  model_io.save_model_dir(d, v, kw, {'note': 'hello', 'path': tmp_path})
  m2, v2, meta = model_io.load_model_dir(d)
  assert m2 == model and meta['spec'] == kw and meta['metadata']['note'] == 'hello'
  jax.tree.map(np.testing.assert_array_equal, v2, v)
  assert json.loads((d / 'model.json').read_text())['format'] == 'twins_jax.model_dir'

  with pytest.raises(FileExistsError, match='not empty'):
    model_io.save_model_dir(d, v, kw, {})
  v_other = random_variables(model, 2)
  model_io.save_model_dir(d, v_other, kw, {'note': 'again'}, overwrite=True)
  _, v3, meta = model_io.load_model_dir(d)
  assert meta['metadata'] == {'note': 'again'}
  jax.tree.map(np.testing.assert_array_equal, v3, v_other)

  with pytest.raises(model_io.ModelDirError, match='do not fit'):
    model_io.save_model_dir(tmp_path / 'x', v, kw.replace(num_classes=4), {})
  with pytest.raises(model_io.ModelDirError, match='unknown model spec fields'):
    model_io.save_model_dir(tmp_path / 'x', v, dict(kw.to_dict(), depth=3), {})
  with pytest.raises(model_io.ModelDirError, match='does not exist'):
    model_io.load_model_dir(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(model_io.ModelDirError, match='no model.json'):
    model_io.load_model_dir(tmp_path / 'empty')
  (tmp_path / 'empty' / 'model.json').write_text('{not json')
  with pytest.raises(model_io.ModelDirError, match='not valid JSON'):
    model_io.load_model_dir(tmp_path / 'empty')
  # model.json and checkpoint disagree: named differences.
  doc = json.loads((d / 'model.json').read_text())
  doc['spec']['num_classes'] = 4
  (d / 'model.json').write_text(json.dumps(doc))
  with pytest.raises(model_io.ModelDirError, match='params/fc/bias'):
    model_io.load_model_dir(d)


def test_predict_resolves_a_training_workdir(tmp_path):
  """A training workdir's best_model is what predict reads for a trained checkpoint."""
  spec = models.ModelSpec(arch='tiny_resnet', num_classes=3, resize=None, twin=True,
                          share_affine=False)
  model = spec.build()
  variables = jax.device_get(models.init_variables(model, 0))
  model_io.save_model_dir(tmp_path / 'run' / 'best_model', variables, spec)
  resolved = predict_lib.resolve_model_dir(tmp_path / 'run')
  assert resolved == tmp_path / 'run' / 'best_model'
  _, loaded, _ = model_io.load_model_dir(resolved)
  images = np.random.default_rng(0).uniform(0, 1, (3, 16, 16, 3)).astype(np.float32)
  expected = np.asarray(model.apply(variables, images, mode=models.EVAL))
  np.testing.assert_allclose(predict_lib.predict(model, loaded, images, batch_size=2), expected,
                             atol=1e-6)
  with pytest.raises(model_io.ModelDirError, match='neither a model directory'):
    predict_lib.resolve_model_dir(tmp_path)


def test_version_1_model_directory_still_loads(tmp_path):
  """Model directories written before ModelSpec (model.json version 1, 'model_kwargs')
  load as they did."""
  spec = models.ModelSpec('tiny_resnet', 3, resize=64)
  v = random_variables(spec.build(), 1)
  model_io.save_model_dir(tmp_path / 'old', v, spec, {'note': 'v1'})
  path = tmp_path / 'old' / 'model.json'
  doc = json.loads(path.read_text())
  doc['version'] = 1
  doc['model_kwargs'] = doc.pop('spec')
  path.write_text(json.dumps(doc))
  model, v2, meta = model_io.load_model_dir(tmp_path / 'old')
  assert meta['spec'] == spec and meta['version'] == 1 and model == spec.build()
  jax.tree.map(np.testing.assert_array_equal, v2, v)


# --------------------------------------------------- hf:// checkpoints (offline)

HF_COMMIT = '0123456789abcdef0123456789abcdef01234567'


def fake_hub_cache(root, repo_id, files):
  """A Hugging Face hub cache holding ``files`` ({name in the repo: local file}) of the model
  repository ``repo_id`` at one commit, laid out as huggingface_hub writes it:
  ``models--ORG--REPO/blobs/<sha256>``, ``snapshots/<commit>/<name>`` (a relative symlink to
  the blob) and ``refs/main`` (the commit)."""
  import hashlib
  repo = root / ('models--' + repo_id.replace('/', '--'))
  for name, src in files.items():
    data = open(src, 'rb').read()
    blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / 'snapshots' / HF_COMMIT / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
  (repo / 'refs').mkdir(parents=True, exist_ok=True)
  (repo / 'refs' / 'main').write_text(HF_COMMIT)
  return root


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  """An offline hub cache with a tiny_resnet robustness .ckpt as
  ``hf://org/robust-models/tiny_linf.ckpt``; returns (the torch model, the local file)."""
  pytest.importorskip('huggingface_hub')
  m = torch_model('tiny_resnet', 10)
  ckpt = save_robustness(m, tmp_path / 'made_here.ckpt')
  cache = fake_hub_cache(tmp_path / 'hf_cache', 'org/robust-models', {'tiny_linf.ckpt': ckpt})
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  return m, ckpt


HF_URI = 'hf://org/robust-models/tiny_linf.ckpt'


def test_hf_checkpoint_ports_from_the_cache(hub_cache, tmp_path):
  from twins_jax import hub
  m, ckpt = hub_cache
  spec = models.ModelSpec('tiny_resnet', 10)
  local, _ = port.port_checkpoint(ckpt, spec)
  for uri in (HF_URI, f'hf://org/robust-models@{HF_COMMIT}/tiny_linf.ckpt'):
    variables, report = port.port_checkpoint(uri, spec)
    jax.tree.map(np.testing.assert_array_equal, variables, local)
    assert report.source == uri and report.source_sha256 == port.file_sha256(ckpt)
    assert report.source_file.endswith('tiny_linf.ckpt') and 'snapshots' in report.source_file
    assert f'sha256: {report.source_sha256}' in report.summary()
  x = images(2, 32)
  np.testing.assert_allclose(
      models.create_model('tiny_resnet', 10).apply(variables, x), torch_logits(m, x), atol=TOL,
      rtol=0)
  assert hub.parse('hf://org/robust-models@v1/sub/dir/f.ckpt') == hub.HubFile(
      'org/robust-models', 'sub/dir/f.ckpt', 'v1')


def test_hf_checkpoint_as_pretrained_and_for_evaluation(hub_cache, tmp_path, monkeypatch):
  """config.pretrained=hf://... in training (setup.initial_variables) and in mode=eval."""
  from helpers import tiny_config
  from twins_jax import evaluate, setup
  _, ckpt = hub_cache
  config = tiny_config(pretrained=HF_URI)
  spec = setup.model_spec(config, 10)
  variables, source = setup.initial_variables(config, spec)
  local, _ = port.port_checkpoint(ckpt, spec)
  jax.tree.map(np.testing.assert_array_equal, variables, local)
  assert HF_URI in source and port.file_sha256(ckpt) in source

  class Reached(Exception):
    pass

  def stop(tree, mesh):  # evaluation got its variables: no need to evaluate them
    jax.tree.map(np.testing.assert_array_equal, tree, local)
    raise Reached

  monkeypatch.setattr(evaluate.parallel, 'replicate', stop)
  with pytest.raises(Reached):
    evaluate.evaluate_config(tiny_config(pretrained=HF_URI, mode='eval'), tmp_path)


def test_hf_port_cli_and_clear_errors(hub_cache, tmp_path, monkeypatch):
  from twins_jax import errors, hub
  _, ckpt = hub_cache
  dst = tmp_path / 'ported'
  r = run_cli('-m', 'twins_jax.port', HF_URI, str(dst), '--arch', 'tiny_resnet', '--num-classes',
              '10')
  assert r.returncode == 0, r.stderr
  sha = port.file_sha256(ckpt)
  assert f'sha256: {sha}' in r.stdout
  meta = model_io.read_model_json(dst)['metadata']
  assert meta['source'] == HF_URI and meta['source_sha256'] == sha
  assert meta['source_size'] == os.path.getsize(ckpt)

  # Offline, a file the cache lacks: one clear line (the library's message is not it).
  absent = 'hf://org/robust-models/absent.ckpt'
  for uri in (absent, 'hf://org/other-repo/x.ckpt'):
    with pytest.raises(errors.CheckpointError, match='not in the Hugging Face cache') as e:
      port.port_checkpoint(uri, models.ModelSpec('tiny_resnet', 10))
    assert '\n' not in str(e.value) and 'HF_HUB_OFFLINE' in str(e.value)
  r = run_cli('-m', 'twins_jax.port', absent, str(tmp_path / 'x'), '--arch', 'tiny_resnet',
              '--num-classes', '10')
  assert r.returncode == 2 and 'Traceback' not in r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and absent in lines[0]
  assert not (tmp_path / 'x').exists()

  # Online but without a network (simulated): the same one line, naming the network; and
  # huggingface_hub's retry warnings are silenced only while it runs.
  import huggingface_hub
  import logging

  def unreachable(*args, local_files_only, **kwargs):
    assert not local_files_only
    assert logging.getLogger('huggingface_hub.utils._http').getEffectiveLevel() > logging.WARNING
    raise huggingface_hub.errors.LocalEntryNotFoundError('cannot reach the Hub')

  monkeypatch.delenv('HF_HUB_OFFLINE')
  level = logging.getLogger('huggingface_hub').level
  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', unreachable)
  with pytest.raises(errors.CheckpointError, match='could not be reached') as e:
    hub.resolve(absent)
  assert '\n' not in str(e.value) and logging.getLogger('huggingface_hub').level == level

  for bad in ('hf://org/file.ckpt', 'hf://org/repo@/f.ckpt', 'hf://org//f.ckpt'):
    with pytest.raises(errors.CheckpointError, match='hf://'):
      hub.parse(bad)
  # Without huggingface_hub: how to install it.
  monkeypatch.setitem(sys.modules, 'huggingface_hub', None)
  with pytest.raises(errors.CheckpointError, match='pip install huggingface_hub'):
    hub.resolve(HF_URI)
  assert hub.resolve(str(ckpt)) == str(ckpt)  # local paths need no package
