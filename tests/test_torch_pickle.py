"""Tests of twins_jax.torch_pickle: torch-free, code-free reading of torch.save files."""

import builtins
import collections
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip('torch')
dill = pytest.importorskip('dill')
import ml_dtypes  # noqa: E402
import torch.nn as nn  # noqa: E402

from twins_jax.torch_pickle import (  # noqa: E402
    ALLOWED_GLOBALS, CheckpointFormatError, UnsafeCheckpointError, load_torch_checkpoint,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (pickle_module, zip format?) for every way torch.save writes a file.
FORMATS = {
    'zip': (pickle, True),
    'legacy': (pickle, False),
    'zip-dill': (dill, True),
    'legacy-dill': (dill, False),
}


def save(obj, path, fmt, **kw):
  module, use_zip = FORMATS[fmt]
  torch.save(obj, str(path), pickle_module=module, _use_new_zipfile_serialization=use_zip, **kw)
  return str(path)


def assert_same(got, ref, where='root'):
  """``got`` (our numpy tree) equals ``ref`` (what torch.load gives), bit for bit."""
  if isinstance(ref, torch.Tensor):
    assert isinstance(got, np.ndarray), where
    exp = ref.detach().resolve_conj().resolve_neg()
    assert got.shape == tuple(exp.shape), where
    assert got.flags.c_contiguous and got.flags.owndata, where
    ml_names = {torch.bfloat16: 'bfloat16', torch.float8_e4m3fn: 'float8_e4m3fn'}
    if exp.dtype in ml_names:  # numpy has no such dtype: compare the bits
      assert got.dtype == np.dtype(getattr(ml_dtypes, ml_names[exp.dtype])), where
      bits = torch.int16 if exp.element_size() == 2 else torch.int8
      exp_np = exp.contiguous().view(bits).numpy()
    else:
      exp_np = exp.numpy()
      assert got.dtype == exp_np.dtype, (where, got.dtype, exp_np.dtype)
    assert got.tobytes() == np.ascontiguousarray(exp_np).tobytes(), where
  elif isinstance(ref, torch.Size):
    assert got == tuple(ref) and type(got) is tuple, where
  elif isinstance(ref, dict):
    assert type(got) is type(ref), (where, type(got), type(ref))
    assert list(got) == list(ref), where
    for k in ref:
      assert_same(got[k], ref[k], f'{where}/{k}')
  elif isinstance(ref, (list, tuple)):
    assert type(got) is type(ref) and len(got) == len(ref), where
    for i, (g, r) in enumerate(zip(got, ref)):
      assert_same(g, r, f'{where}[{i}]')
  else:
    assert type(got) is type(ref) and got == ref, (where, got, ref)


# ------------------------------------------------------------------ round trips


class _Normalizer(nn.Module):

  def __init__(self):
    super().__init__()
    self.register_buffer('new_mean', torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1))
    self.register_buffer('new_std', torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1))


class _Net(nn.Module):

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(4)
    self.layer1 = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    self.fc = nn.Linear(4, 5)

  def forward(self, x):
    x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
    return self.fc(x.mean((2, 3)))


class _Attacker(nn.Module):

  def __init__(self, model):
    super().__init__()
    self.model = model
    self.normalize = _Normalizer()


class _AttackerModel(nn.Module):  # robustness.attacker.AttackerModel's layout

  def __init__(self):
    super().__init__()
    self.normalizer = _Normalizer()
    self.model = _Net()
    self.attacker = _Attacker(self.model)


class _Wrapped(nn.Module):  # DataParallel adds the "module." prefix

  def __init__(self):
    super().__init__()
    self.module = _AttackerModel()


def robustness_like_checkpoint():
  torch.manual_seed(0)
  model = _Wrapped()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  model.module.model(torch.randn(2, 3, 8, 8)).sum().backward()
  opt.step()
  return {
      'model': model.state_dict(),
      'optimizer': opt.state_dict(),
      # robustness saves the scheduler's state; MultiStepLR keeps a Counter in it
      'schedule': torch.optim.lr_scheduler.MultiStepLR(opt, [30, 60]).state_dict(),
      'epoch': 90,
      'amp': None,
      'nat_prec1': torch.tensor(60.2),
      'adv_prec1': torch.tensor(31.5, dtype=torch.float64),
  }


@pytest.mark.parametrize('fmt', sorted(FORMATS))
def test_robustness_style_checkpoint(tmp_path, fmt):
  obj = robustness_like_checkpoint()
  path = save(obj, tmp_path / f'robust_{fmt}.ckpt', fmt)
  got = load_torch_checkpoint(path)
  assert_same(got, torch.load(path, weights_only=False))
  assert_same(got, obj)
  keys = list(got['model'])
  assert 'module.model.conv1.weight' in keys
  assert 'module.attacker.model.layer1.0.1.running_var' in keys
  assert got['model']['module.normalizer.new_mean'].shape == (3, 1, 1)
  assert got['model']['module.model.bn1.num_batches_tracked'].dtype == np.int64
  assert got['nat_prec1'].shape == () and got['nat_prec1'].dtype == np.float32
  # the state_dict's _metadata attribute (restored through BUILD) survives
  assert got['model']._metadata == obj['model']._metadata


@pytest.mark.parametrize('fmt', sorted(FORMATS))
def test_plain_state_dict(tmp_path, fmt):
  torch.manual_seed(1)
  sd = _Net().state_dict()
  path = save(sd, tmp_path / 'sd.pt', fmt)
  assert_same(load_torch_checkpoint(path), sd)


@pytest.mark.parametrize('fmt', sorted(FORMATS))
def test_dtypes(tmp_path, fmt):
  g = torch.Generator().manual_seed(2)
  x = torch.randn(3, 5, generator=g)
  obj = {
      'f32': x,
      'f64': x.double(),
      'f16': x.half(),
      'bf16': x.bfloat16(),
      'i64': (x * 1e6).long(),
      'i32': (x * 100).int(),
      'i16': (x * 100).short(),
      'i8': (x * 30).to(torch.int8),
      'u8': (x * 30).abs().to(torch.uint8),
      'bool': x > 0,
      'c64': torch.complex(x, -x),
      'scalar': torch.tensor(3.5),
      'empty': torch.zeros(0, 4),
      'nan': torch.tensor([float('nan'), -0.0, float('inf')]),
  }
  if FORMATS[fmt][1]:  # untyped storage + _rebuild_tensor_v3 (torch can't reload these as legacy)
    obj['u16'] = torch.tensor([0, 1, 40000, 65535], dtype=torch.uint16)
    obj['f8'] = x.to(torch.float8_e4m3fn)
  path = save(obj, tmp_path / 'dtypes.pt', fmt)
  got = load_torch_checkpoint(path)
  assert_same(got, obj)
  assert got['bf16'].dtype == np.dtype(ml_dtypes.bfloat16)
  assert got['bool'].dtype == np.bool_


@pytest.mark.parametrize('fmt', sorted(FORMATS))
def test_views_strides_offsets_and_shared_storage(tmp_path, fmt):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  obj = {
      'base': base,
      't': base.t(),  # non-contiguous
      'slice': base[1:, 2:],  # storage offset 8
      'step': base[:, ::2],
      'flat': base.view(-1)[5:17].view(3, 4),  # shares base's storage
      'expand': torch.tensor([1.0, 2.0]).expand(3, 2),  # stride 0
      'permute': torch.arange(60).reshape(3, 4, 5).permute(2, 0, 1)[1:, :, ::2],
      'half_t': base.half().t()[1:],
      'conj': torch.complex(base[:2], base[2:]).conj(),  # lazy conj bit
  }
  path = save(obj, tmp_path / 'views.pt', fmt)
  got = load_torch_checkpoint(path)
  assert_same(got, obj)
  # every array owns its memory: no aliasing between arrays from one storage
  got['base'][0, 0] = -1.0
  assert got['flat'][0, 0] == 5.0 and got['slice'][0, 0] == 8.0 and got['t'][0, 0] == 0.0


@pytest.mark.parametrize('fmt', ['zip', 'legacy-dill'])
def test_parameters_sizes_numpy_and_misc(tmp_path, fmt):
  obj = {
      'param': nn.Parameter(torch.ones(2, 3)),
      'size': torch.Size([2, 3]),
      'dtype': torch.float16,
      'np_scalar': np.float64(0.25),
      'np_int': np.int64(7),
      'np_array': np.arange(6, dtype=np.float32).reshape(2, 3),
      'list': [1, 2.5, 'x', None, True, (3, 4)],
      'set': {1, 2},
      'frozenset': frozenset({3}),
      'bytes': b'\x00\xffab',
      'complex': 1 + 2j,
  }
  path = save(obj, tmp_path / 'misc.pt', fmt)
  got = load_torch_checkpoint(path)
  np.testing.assert_array_equal(got['param'], np.ones((2, 3), np.float32))
  assert got['size'] == (2, 3)
  assert got['dtype'] == np.float16
  assert got['np_scalar'] == 0.25 and got['np_scalar'].dtype == np.float64
  assert got['np_int'] == 7 and got['np_int'].dtype == np.int64
  np.testing.assert_array_equal(got['np_array'], obj['np_array'])
  assert got['np_array'].dtype == np.float32
  for k in ('list', 'set', 'frozenset', 'bytes', 'complex'):
    assert got[k] == obj[k] and type(got[k]) is type(obj[k]), k


@pytest.mark.parametrize('fmt', sorted(FORMATS))
def test_tensor_with_python_attribute(tmp_path, fmt):
  t = torch.arange(6.0).reshape(2, 3)
  t.note = 'x'  # pickled through torch._tensor._rebuild_from_type_v2
  path = save({'t': t}, tmp_path / 'attr.pt', fmt)
  got = load_torch_checkpoint(path)
  np.testing.assert_array_equal(got['t'], t.numpy())


@pytest.mark.parametrize('fmt', sorted(FORMATS))
def test_pickle_protocol_4(tmp_path, fmt):
  obj = robustness_like_checkpoint()
  path = save(obj, tmp_path / 'p4.pt', fmt, pickle_protocol=4)
  assert_same(load_torch_checkpoint(path), obj)


def _storage_itemsizes(pkl):
  """Storage key -> element size, read off the persistent ids in a data.pkl (no unpickling)."""
  import pickletools

  sizes = {'FloatStorage': 4, 'DoubleStorage': 8, 'HalfStorage': 2, 'LongStorage': 8}
  memo, values, out = {}, [], {}
  for op, arg, _ in pickletools.genops(pkl):
    if op.name in ('GLOBAL', 'BINUNICODE', 'SHORT_BINUNICODE'):
      values.append(arg)
    elif op.name in ('BINPUT', 'LONG_BINPUT'):
      memo[arg] = values[-1]
    elif op.name in ('BINGET', 'LONG_BINGET'):
      values.append(memo[arg])
    else:
      values.append(None)
    if len(values) >= 3 and values[-3] == 'storage':
      out[values[-1]] = sizes[values[-2].split()[1]]
  return out


def _rewrite_zip(src, dst, prefix, big_endian=False):
  """Copy a zip-format checkpoint under another archive prefix, optionally big-endian."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w') as zout:
    old = zin.namelist()[0].split('/')[0]
    sizes = _storage_itemsizes(zin.read(f'{old}/data.pkl'))
    for name in zin.namelist():
      data = zin.read(name)
      rel = name[len(old) + 1:]
      if big_endian and rel == 'byteorder':
        data = b'big'
      elif big_endian and rel.startswith('data/'):
        size = sizes[rel[len('data/'):]]
        data = np.frombuffer(data, f'<u{size}').astype(f'>u{size}').tobytes()
      zout.writestr(f'{prefix}/{rel}', data)


def test_zip_any_prefix_and_big_endian(tmp_path):
  obj = {'a': torch.randn(3, 4), 'b': torch.arange(5), 'c': torch.randn(2).half().t()}
  src = save(obj, tmp_path / 'src.pt', 'zip')
  _rewrite_zip(src, tmp_path / 'renamed.ckpt', 'archive')
  assert_same(load_torch_checkpoint(tmp_path / 'renamed.ckpt'), obj)
  _rewrite_zip(src, tmp_path / 'big.ckpt', 'some-other_name', big_endian=True)
  assert_same(load_torch_checkpoint(tmp_path / 'big.ckpt'), obj)


def test_torch_is_not_imported(tmp_path):
  path = save({'w': torch.ones(2)}, tmp_path / 'w.pt', 'legacy-dill')
  code = ("import sys; from twins_jax.torch_pickle import load_torch_checkpoint as L; "
          f"r = L({path!r}); assert r['w'].sum() == 2; "
          "assert 'torch' not in sys.modules and 'dill' not in sys.modules, 'imported'")
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)


def test_allowlist_contents():
  for name in ('torch._utils._rebuild_tensor_v2', 'torch.FloatStorage', 'torch.float32',
               'collections.OrderedDict', 'torch.Size', 'numpy.core.multiarray.scalar'):
    assert name in ALLOWED_GLOBALS
  for name in ('os.system', 'posix.system', 'builtins.eval', 'builtins.exec', 'builtins.getattr',
               'subprocess.Popen', 'dill._dill._create_function', 'torch.load'):
    assert name not in ALLOWED_GLOBALS


# ------------------------------------------------------------------ safety


class _EvilSystem:
  marker = ''

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


class _EvilExec:
  marker = ''

  def __reduce__(self):
    return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class _EvilPopen:
  marker = ''

  def __reduce__(self):
    return (subprocess.Popen, (['touch', self.marker],))


class _EvilDillFunction:
  """dill pickles the function by value: loading it rebuilds code, then calls it."""

  marker = ''

  def __reduce__(self):
    fn = eval("lambda: open(MARKER, 'w').write('pwned')", {'MARKER': self.marker})
    return (fn, ())


EVIL = {
    'os.system': (_EvilSystem, 'system'),
    'builtins.exec': (_EvilExec, 'builtins.exec'),
    'subprocess.Popen': (_EvilPopen, 'subprocess.Popen'),
}


def _assert_refused(path, marker, global_name):
  with pytest.raises(UnsafeCheckpointError) as info:
    load_torch_checkpoint(path)
  msg = str(info.value)
  assert global_name in msg
  assert str(path) in msg
  assert 'Nothing from the file was executed' in msg
  assert 'torch.save' in msg  # says how to proceed
  assert isinstance(info.value, pickle.UnpicklingError)
  assert not os.path.exists(marker)


@pytest.mark.parametrize('fmt', sorted(FORMATS))
@pytest.mark.parametrize('attack', sorted(EVIL))
def test_malicious_reduce_is_refused(tmp_path, fmt, attack):
  cls, global_name = EVIL[attack]
  marker = str(tmp_path / 'MARKER')
  cls.marker = marker
  obj = {'model': collections.OrderedDict(w=torch.ones(3)), 'epoch': 1, 'evil': cls()}
  path = save(obj, tmp_path / 'evil.pt', fmt)
  _assert_refused(path, marker, global_name)


@pytest.mark.parametrize('fmt', ['zip-dill', 'legacy-dill'])
def test_malicious_dill_function_is_refused(tmp_path, fmt):
  marker = str(tmp_path / 'MARKER')
  _EvilDillFunction.marker = marker
  path = save({'w': torch.ones(2), 'evil': _EvilDillFunction()}, tmp_path / 'evil.pt', fmt)
  _assert_refused(path, marker, 'dill._dill.')


def test_malicious_file_would_run_under_plain_torch_load(tmp_path):
  """Sanity check that the crafted files are real attacks (run only in tmp_path)."""
  marker = str(tmp_path / 'MARKER')
  _EvilSystem.marker = marker
  path = save({'evil': _EvilSystem()}, tmp_path / 'evil.pt', 'legacy')
  _assert_refused(path, marker, 'system')
  torch.load(path, weights_only=False)
  assert os.path.exists(marker)


def _legacy_file(path, main_pickle, keys=b'\x80\x02]q\x00.'):
  """A legacy-format file around hand-written main pickle bytes."""
  with open(path, 'wb') as f:
    f.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
    f.write(pickle.dumps(1001, protocol=2))
    f.write(pickle.dumps({'protocol_version': 1001, 'little_endian': True}, protocol=2))
    f.write(main_pickle)
    f.write(keys)
  return str(path)


@pytest.mark.parametrize(
    'main, name',
    [
        # Python 2 spelling of exec
        (b'\x80\x02c__builtin__\nexec\nX\x04\x00\x00\x00passq\x00\x85R.', '__builtin__.exec'),
        (b'\x80\x02cbuiltins\ngetattr\n.', 'builtins.getattr'),
        # protocol 4 STACK_GLOBAL
        (b'\x80\x04\x8c\x02os\x8c\x06system\x93.', 'os.system'),
        # dill type loader asked for a code type
        (b'\x80\x02cdill._dill\n_load_type\nX\x08\x00\x00\x00CodeType\x85R.', 'CodeType'),
        # calling something that is allowed as a value but not callable
        (b'\x80\x02ctorch\nFloatStorage\n)R.', 'FloatStorage'),
        # BUILD with slot state on an allowed container (would setattr __class__ etc.)
        (b'\x80\x02ccollections\nOrderedDict\n)RN}X\t\x00\x00\x00__class__Ns\x86b.', 'slot state'),
        # BUILD on an allowed function object
        (b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x03\x00\x00\x00fooK\x01sb.', 'BUILD'),
        # NEWOBJ of a stand-in function
        (b'\x80\x02ctorch\nSize\n)\x81.', 'NEWOBJ'),
        # whole-module pickles carry classes as persistent ids
        (b'\x80\x02X\x06\x00\x00\x00module\x85Q.', 'nn.Module'),
    ],
)
def test_handcrafted_unsafe_pickles(tmp_path, main, name):
  path = _legacy_file(tmp_path / 'bad.pt', main)
  with pytest.raises(UnsafeCheckpointError, match='Refused|refused') as info:
    load_torch_checkpoint(path)
  assert name in str(info.value)


# ------------------------------------------------------------------ bad files


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='not found'):
    load_torch_checkpoint(tmp_path / 'nope.pt')


def test_text_file(tmp_path):
  path = tmp_path / 'notes.txt'
  path.write_text('this is not a checkpoint\n')
  with pytest.raises(CheckpointFormatError, match='not a torch checkpoint'):
    load_torch_checkpoint(path)
  (tmp_path / 'empty.pt').write_bytes(b'')
  with pytest.raises(CheckpointFormatError, match='empty'):
    load_torch_checkpoint(tmp_path / 'empty.pt')


def test_plain_pickle_and_foreign_zip(tmp_path):
  (tmp_path / 'plain.pkl').write_bytes(pickle.dumps({'a': 1}, protocol=2))
  with pytest.raises(CheckpointFormatError, match='not a torch checkpoint'):
    load_torch_checkpoint(tmp_path / 'plain.pkl')
  np.savez(tmp_path / 'arrays.npz', a=np.ones(2))
  with pytest.raises(CheckpointFormatError, match='not a torch.save checkpoint'):
    load_torch_checkpoint(tmp_path / 'arrays.npz')


def test_torchscript_archive(tmp_path):
  path = str(tmp_path / 'scripted.pt')
  torch.jit.save(torch.jit.script(nn.Linear(2, 2)), path)
  with pytest.raises(CheckpointFormatError, match='TorchScript'):
    load_torch_checkpoint(path)


@pytest.mark.parametrize('fmt', sorted(FORMATS))
@pytest.mark.parametrize('keep', [0.5, 0.98, 40])
def test_truncated_file(tmp_path, fmt, keep):
  path = save(robustness_like_checkpoint(), tmp_path / 'full.pt', fmt)
  data = open(path, 'rb').read()
  n = int(len(data) * keep) if keep < 1 else keep
  cut = tmp_path / 'cut.pt'
  cut.write_bytes(data[:n])
  with pytest.raises(CheckpointFormatError, match='truncated'):
    load_torch_checkpoint(cut)


def test_corrupt_storage_bounds(tmp_path):
  """A tensor claiming more elements than its storage holds is an error, not a read overrun."""
  path = save({'w': torch.ones(4)}, tmp_path / 'w.pt', 'legacy')
  data = open(path, 'rb').read()
  # the pickled size tuple (4,) -> (9,): BININT1 4, TUPLE1 ... is unique here
  i = data.index(b'K\x04\x85')
  bad = tmp_path / 'bad.pt'
  bad.write_bytes(data[:i] + b'K\x09\x85' + data[i + 3:])
  with pytest.raises(CheckpointFormatError, match='storage'):
    load_torch_checkpoint(bad)
