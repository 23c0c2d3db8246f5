"""Read PyTorch checkpoint files without torch and without running code from them.

``torch.save`` files are pickles. Unpickling one with :mod:`pickle` (or
``torch.load(weights_only=False)``) calls whatever callables the file names, so a
checkpoint downloaded from the internet can run arbitrary code. This module reads
such files with a restricted unpickler:

* every global the pickle names is looked up in an explicit allowlist
  (:data:`ALLOWED_GLOBALS`) and mapped to a *local* stand-in written here: tensor
  rebuild functions that build numpy arrays, dtype/storage tokens, plain container
  types. Nothing is imported from the names in the file and ``torch`` is never
  imported; any other global raises :class:`UnsafeCheckpointError` before anything
  is called;
* the opcodes that call things (``REDUCE``, ``NEWOBJ``, ``INST``, ``OBJ``) only ever
  call those stand-ins, and ``BUILD`` (object state restore, which can ``setattr``)
  is only honoured for the few data types that need it (``OrderedDict`` attributes
  such as ``state_dict._metadata``, ``argparse.Namespace``, numpy dtype/array
  state), all checked here.

Both formats written by ``torch.save`` are read:

* the zip format (default since torch 1.6): ``<prefix>/data.pkl`` plus one raw
  little- (or, per ``<prefix>/byteorder``, big-) endian file per storage,
  ``<prefix>/data/<key>``;
* the legacy format (``_use_new_zipfile_serialization=False``, and every file from
  torch < 1.6, e.g. MadryLab ``robustness`` checkpoints pickled with ``dill``): magic
  number, protocol version and ``sys_info`` pickles, the main pickle, the sorted list
  of storage keys, then each storage as an int64 element count followed by its raw
  little-endian bytes.

Every tensor comes back as a C-contiguous numpy array that owns its data (a copy,
also for views, transposes, slices with a storage offset and tensors sharing one
storage), with torch's dtype (``bfloat16`` and ``float8`` via :mod:`ml_dtypes`) and
shape. ``nn.Parameter`` becomes a plain array, ``torch.Size`` a tuple, a torch dtype
a :class:`numpy.dtype`, a ``torch.device`` its string (``'cuda:0'``) and a bare
storage a 1-D array.

Public API: :func:`load_torch_checkpoint`, :class:`UnsafeCheckpointError`,
:class:`CheckpointFormatError`, :data:`ALLOWED_GLOBALS`.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import math
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Callable, Dict, Optional, Tuple

import ml_dtypes
import numpy as np

from twins_jax import errors

__all__ = [
    'ALLOWED_GLOBALS',
    'CheckpointFormatError',
    'UnsafeCheckpointError',
    'load_torch_checkpoint',
]

# First pickle of a legacy-format file and the protocol version after it.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsafeCheckpointError(pickle.UnpicklingError, errors.CheckpointError):
  """The checkpoint asks for something outside the allowlist; nothing was executed."""


class CheckpointFormatError(errors.CheckpointError):
  """The file is not a readable torch checkpoint (wrong kind, truncated, corrupt)."""


# --------------------------------------------------------------------------- dtypes

_TORCH_DTYPES: Dict[str, np.dtype] = {
    'float32': np.dtype('<f4'),
    'float64': np.dtype('<f8'),
    'float16': np.dtype('<f2'),
    'bfloat16': np.dtype(ml_dtypes.bfloat16),
    'int64': np.dtype('<i8'),
    'int32': np.dtype('<i4'),
    'int16': np.dtype('<i2'),
    'int8': np.dtype('i1'),
    'uint8': np.dtype('u1'),
    'bool': np.dtype('?'),
    'complex64': np.dtype('<c8'),
    'complex128': np.dtype('<c16'),
    # dtypes torch pickles with ``_rebuild_tensor_v3`` and an untyped storage
    'uint16': np.dtype('<u2'),
    'uint32': np.dtype('<u4'),
    'uint64': np.dtype('<u8'),
    'float8_e4m3fn': np.dtype(ml_dtypes.float8_e4m3fn),
    'float8_e5m2': np.dtype(ml_dtypes.float8_e5m2),
    'float8_e4m3fnuz': np.dtype(ml_dtypes.float8_e4m3fnuz),
    'float8_e5m2fnuz': np.dtype(ml_dtypes.float8_e5m2fnuz),
}

# Legacy typed storage classes (``torch.FloatStorage`` ...) -> torch dtype name.
_STORAGE_DTYPES: Dict[str, str] = {
    'FloatStorage': 'float32',
    'DoubleStorage': 'float64',
    'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16',
    'LongStorage': 'int64',
    'IntStorage': 'int32',
    'ShortStorage': 'int16',
    'CharStorage': 'int8',
    'ByteStorage': 'uint8',
    'BoolStorage': 'bool',
    'ComplexFloatStorage': 'complex64',
    'ComplexDoubleStorage': 'complex128',
}


class _StorageType:
  """Stand-in for a torch storage class: only carries its element dtype."""

  __slots__ = ('name', 'dtype', 'untyped')

  def __init__(self, name: str, dtype: np.dtype, untyped: bool = False):
    self.name = name
    self.dtype = dtype
    self.untyped = untyped

  def __repr__(self) -> str:
    return f'<storage type {self.name}>'


class _Token:
  """Inert stand-in for a class that is only ever an argument (``torch.Tensor``)."""

  __slots__ = ('name',)

  def __init__(self, name: str):
    self.name = name

  def __repr__(self) -> str:
    return f'<{self.name}>'


_TENSOR_TOKEN = _Token('torch.Tensor')
_NDARRAY_TOKEN = _Token('numpy.ndarray')


class _Pending:
  """Placeholder for a storage/tensor while the legacy format's data is not read yet."""

  __slots__ = ()


_PENDING = _Pending()


def _bad(msg: str) -> CheckpointFormatError:
  return CheckpointFormatError(msg)


def _check_int(x: Any, what: str) -> int:
  if type(x) is not int and not isinstance(x, np.integer):
    raise _bad(f'{what} must be an int, got {type(x).__name__}')
  return int(x)


def _check_int_tuple(x: Any, what: str) -> Tuple[int, ...]:
  if not isinstance(x, (tuple, list)):
    raise _bad(f'{what} must be a tuple of ints, got {type(x).__name__}')
  return tuple(_check_int(v, what) for v in x)


def _strided_copy(flat: np.ndarray, offset: Any, size: Any, stride: Any) -> np.ndarray:
  """Bounds-checked ``as_strided(flat[offset:], size, stride).copy()`` (element units)."""
  offset = _check_int(offset, 'storage offset')
  size = _check_int_tuple(size, 'tensor size')
  stride = _check_int_tuple(stride, 'tensor stride')
  if len(size) != len(stride):
    raise _bad(f'tensor size {size} and stride {stride} differ in length')
  if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise _bad(f'negative offset/size/stride: {offset}, {size}, {stride}')
  if math.prod(size) == 0:
    return np.zeros(size, dtype=flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.shape[0]:
    raise _bad(f'tensor (offset {offset}, size {size}, stride {stride}) reaches element '
               f'{last} of a storage of only {flat.shape[0]} elements')
  item = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                         strides=tuple(s * item for s in stride), writeable=False)
  return np.array(view, dtype=flat.dtype, order='C', copy=True)


def _apply_metadata(arr: np.ndarray, metadata: Any) -> np.ndarray:
  """Resolve torch's lazy conj/neg bits (``torch._utils.set_tensor_metadata``)."""
  if not metadata:
    return arr
  if not isinstance(metadata, dict):
    raise _bad(f'tensor metadata must be a dict, got {type(metadata).__name__}')
  for key, value in metadata.items():
    if key == 'conj':
      if value:
        arr = np.conj(arr)
    elif key == 'neg':
      if value:
        arr = np.negative(arr)
    else:
      raise _bad(f'unsupported tensor metadata {key!r}')
  return arr


# ------------------------------------------------------ numpy scalars/arrays (safe)

_SIMPLE_NP_TYPECODES = {
    'b1',
    '?',
    'i1',
    'i2',
    'i4',
    'i8',
    'u1',
    'u2',
    'u4',
    'u8',
    'f2',
    'f4',
    'f8',
    'c8',
    'c16',
}


def _simple_np_dtype(spec: Any) -> np.dtype:
  if isinstance(spec, np.dtype):
    dt = spec
  elif isinstance(spec, _DtypeProxy):
    dt = spec.dtype
  elif isinstance(spec, str) and spec.lstrip('<>|=') in _SIMPLE_NP_TYPECODES:
    dt = np.dtype(spec)
  else:
    raise UnsafeCheckpointError(f'numpy dtype {spec!r} is not a plain numeric dtype; refused')
  if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
    raise UnsafeCheckpointError(f'numpy dtype {dt!r} is not a plain numeric dtype; refused')
  return dt


class _DtypeProxy:
  """What ``numpy.dtype(...)`` unpickles to until its BUILD state arrives."""

  __slots__ = ('dtype',)

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype

  def finish(self, state: Any) -> np.dtype:
    # numpy's dtype state: (version, byteorder, subarray, names, fields,
    # elsize, alignment, flags); only plain numeric dtypes are accepted.
    if not isinstance(state, tuple) or len(state) < 5:
      raise _bad(f'unexpected numpy dtype state {state!r}')
    order = state[1]
    if any(v is not None for v in state[2:5]):
      raise UnsafeCheckpointError('structured/sub-array numpy dtype refused')
    if order in ('<', '>'):
      return self.dtype.newbyteorder(order)
    if order in ('|', '='):
      return self.dtype
    raise _bad(f'unexpected numpy byte order {order!r}')


def _np_dtype(spec: Any, align: Any = False, copy: Any = False) -> _DtypeProxy:
  return _DtypeProxy(_simple_np_dtype(spec))


def _as_bytes(data: Any, what: str) -> bytes:
  if isinstance(data, (bytes, bytearray, memoryview)):
    return bytes(data)
  if isinstance(data, str):  # protocol-0/1 or Python 2 pickles
    return data.encode('latin1')
  raise _bad(f'{what} must be bytes, got {type(data).__name__}')


def _np_scalar(dtype: Any, data: Any = None) -> Any:
  dt = _simple_np_dtype(dtype)
  raw = _as_bytes(data, 'numpy scalar data')
  if len(raw) != dt.itemsize:
    raise _bad(f'numpy scalar of {dt} needs {dt.itemsize} bytes, got {len(raw)}')
  return np.frombuffer(raw, dtype=dt)[0]


def _np_array_from(raw: Any, dt: Any, shape: Any, fortran: bool) -> np.ndarray:
  dt = _simple_np_dtype(dt)
  shape = _check_int_tuple(shape, 'numpy array shape')
  if any(n < 0 for n in shape):
    raise _bad(f'negative numpy array shape {shape}')
  raw = _as_bytes(raw, 'numpy array data')
  count = math.prod(shape)
  if len(raw) != count * dt.itemsize:
    raise _bad(f'numpy array {shape} of {dt} needs {count * dt.itemsize} bytes, got {len(raw)}')
  arr = np.frombuffer(raw, dtype=dt, count=count)
  return np.array(arr.reshape(shape, order='F' if fortran else 'C'), order='C', copy=True)


class _NDArrayProxy:
  """What ``numpy.core.multiarray._reconstruct`` unpickles to until BUILD."""

  __slots__ = ()

  def finish(self, state: Any) -> np.ndarray:
    if isinstance(state, tuple) and len(state) == 5:
      state = state[1:]  # drop the version
    if not isinstance(state, tuple) or len(state) != 4:
      raise _bad('unexpected numpy array state')
    shape, dt, fortran, raw = state
    return _np_array_from(raw, dt, shape, bool(fortran))


def _np_reconstruct(subtype: Any, shape: Any = (0,), typecode: Any = b'b') -> _NDArrayProxy:
  if subtype is not _NDARRAY_TOKEN:
    raise UnsafeCheckpointError(f'numpy _reconstruct of {subtype!r} refused (only ndarray)')
  return _NDArrayProxy()


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = 'C') -> np.ndarray:
  if order not in ('C', 'F'):
    raise _bad(f'unexpected numpy array order {order!r}')
  return _np_array_from(buf, dtype, shape, order == 'F')


# ---------------------------------------------------------------- other stand-ins


def _codecs_encode(obj: Any, encoding: Any = 'utf-8', errors: Any = 'strict') -> bytes:
  # Protocol-2 pickles store ``bytes`` as ``_codecs.encode(str, 'latin1')``.
  if (not isinstance(obj, str) or encoding not in ('latin1', 'latin-1', 'ascii') or
      errors != 'strict'):
    raise UnsafeCheckpointError(
        f'_codecs.encode only allowed as str -> bytes via latin1 (got {encoding!r})')
  return obj.encode(encoding)


def _torch_size(seq: Any = ()) -> Tuple[int, ...]:
  return _check_int_tuple(seq, 'torch.Size')


def _torch_device(kind: Any, index: Any = None) -> str:
  if not isinstance(kind, str):
    raise _bad(f'torch.device type must be a str, got {type(kind).__name__}')
  return kind if index is None else f"{kind}:{_check_int(index, 'device index')}"


# dill pickles some builtin types by name through ``dill._dill._load_type``; only
# plain data types are resolved (never 'CodeType', 'FunctionType', 'type', ...).
# Both old (py2-style 'DictType') and new ('dict') dill names.
_DILL_TYPES: Dict[str, type] = {}
for _names, _typ in [
    (('dict', 'DictType', 'DictionaryType'), dict),
    (('list', 'ListType'), list),
    (('tuple', 'TupleType'), tuple),
    (('set', 'SetType'), set),
    (('frozenset', 'FrozenSetType'), frozenset),
    (('slice', 'SliceType'), slice),
    (('complex', 'ComplexType'), complex),
    (('bytearray', 'ByteArrayType'), bytearray),
    (('bytes', 'BytesType'), bytes),
    (('int', 'IntType', 'LongType'), int),
    (('float', 'FloatType'), float),
    (('str', 'StrType', 'StringType', 'UnicodeType'), str),
    (('bool', 'BooleanType', 'BoolType'), bool),
    (('NoneType',), type(None)),
    (('OrderedDictType',), collections.OrderedDict),
]:
  for _n in _names:
    _DILL_TYPES[_n] = _typ
del _names, _typ, _n

# Types that may be called (REDUCE/INST/OBJ) or instantiated (NEWOBJ) with
# arguments from the file: plain data constructors only.
_SAFE_TYPES = frozenset(_DILL_TYPES.values()) | {argparse.Namespace, collections.Counter}


def _dill_load_type(name: Any) -> type:
  if not isinstance(name, str) or name not in _DILL_TYPES:
    raise UnsafeCheckpointError(
        f'dill._dill._load_type({name!r}) refused: only plain data types are allowed')
  return _DILL_TYPES[name]


def _dill_create_array(f: Any, args: Any, state: Any, npdict: Any = None) -> np.ndarray:
  # dill's wrapper around ndarray.__reduce__: f(*args), then the array state.
  if f is not _np_reconstruct or not isinstance(args, tuple):
    raise UnsafeCheckpointError(f'dill._dill._create_array with {f!r} refused')
  if npdict:
    raise UnsafeCheckpointError('dill._dill._create_array with ndarray-subclass attributes refused')
  return f(*args).finish(state)


def _safe_defaultdict(factory: Any = None, *rest: Any) -> collections.defaultdict:
  if rest or not (factory is None or factory in _SAFE_TYPES):
    raise UnsafeCheckpointError(f'collections.defaultdict with default factory {factory!r} refused')
  return collections.defaultdict(factory)


# ----------------------------------------------------------------- the allowlist

_UNTYPED_STORAGE = _StorageType('UntypedStorage', np.dtype('u1'), untyped=True)
_NUMPY_MULTIARRAY = ('numpy.core.multiarray', 'numpy._core.multiarray')
_NUMPY_NUMERIC = ('numpy.core.numeric', 'numpy._core.numeric')

# (module, name) -> stand-in, or a string naming a method of _SafeUnpickler for the
# entries that need per-file state (storage data, byte order).
_ALLOWED: Dict[Tuple[str, str], Any] = {
    ('torch._utils', '_rebuild_tensor'): '_rebuild_tensor',
    ('torch._utils', '_rebuild_tensor_v2'): '_rebuild_tensor_v2',
    ('torch._utils', '_rebuild_tensor_v3'): '_rebuild_tensor_v3',
    ('torch._utils', '_rebuild_parameter'): '_rebuild_parameter',
    ('torch._utils', '_rebuild_parameter_with_state'): '_rebuild_parameter_with_state',
    ('torch.nn.parameter', 'Parameter'): '_rebuild_parameter',  # torch 0.4-era pickles
    ('torch._tensor', '_rebuild_from_type'): '_rebuild_from_type',
    ('torch._tensor', '_rebuild_from_type_v2'): '_rebuild_from_type',
    ('torch', 'Tensor'): _TENSOR_TOKEN,
    ('torch', 'Size'): _torch_size,
    ('torch', 'device'): _torch_device,
    ('torch', 'UntypedStorage'): _UNTYPED_STORAGE,
    ('torch.storage', 'UntypedStorage'): _UNTYPED_STORAGE,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('collections', 'defaultdict'): _safe_defaultdict,
    # MultiStepLR's state_dict keeps its milestones in a Counter (robustness saves it).
    ('collections', 'Counter'): collections.Counter,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice,
    ('builtins', 'complex'): complex,
    ('builtins', 'bytearray'): bytearray,
    ('_codecs', 'encode'): _codecs_encode,
    ('argparse', 'Namespace'): argparse.Namespace,
    ('numpy', 'dtype'): _np_dtype,
    ('numpy', 'ndarray'): _NDARRAY_TOKEN,
    ('dill._dill', '_load_type'): _dill_load_type,
    ('dill.dill', '_load_type'): _dill_load_type,
    ('dill._dill', '_create_array'): _dill_create_array,
    ('dill.dill', '_create_array'): _dill_create_array,
}
for _name, _dt in _TORCH_DTYPES.items():
  _ALLOWED[('torch', _name)] = _dt
for _name, _tname in _STORAGE_DTYPES.items():
  for _mod in ('torch', 'torch.cuda'):
    _ALLOWED[(_mod, _name)] = _StorageType(_name, _TORCH_DTYPES[_tname])
for _mod in _NUMPY_MULTIARRAY:
  _ALLOWED[(_mod, 'scalar')] = _np_scalar
  _ALLOWED[(_mod, '_reconstruct')] = _np_reconstruct
for _mod in _NUMPY_NUMERIC:
  _ALLOWED[(_mod, '_frombuffer')] = _np_frombuffer
del _name, _dt, _tname, _mod

#: Every ``module.name`` global a checkpoint may reference; anything else is refused.
ALLOWED_GLOBALS = frozenset(f'{m}.{n}' for m, n in _ALLOWED)


def _py3_name(module: str, name: str) -> Tuple[str, str]:
  """Python 2 spelling -> Python 3 (pickle's ``fix_imports``; protocol <= 2 writes e.g.
    ``__builtin__.exec`` for ``builtins.exec``)."""
  if (module, name) in _compat_pickle.NAME_MAPPING:
    return _compat_pickle.NAME_MAPPING[(module, name)]
  return _compat_pickle.IMPORT_MAPPING.get(module, module), name


_REFUSED_HELP = (
    "Nothing from the file was executed. This reader only rebuilds tensors and plain "
    "containers. If you trust the file's origin, open it with torch in a sandbox, e.g. "
    "`sd = torch.load(path, map_location='cpu', weights_only=False)`, keep only the "
    "tensors (a state_dict) and re-save them with plain `torch.save(sd, 'clean.pt')` "
    "(no pickle_module=dill, no custom classes), then load 'clean.pt'.")

# ------------------------------------------------------------------ the unpickler

StorageLoader = Callable[[Any, _StorageType, int], Any]


class _SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler: opcodes are overridable
  """Unpickler whose globals, calls and state restores are all allowlisted."""

  dispatch = dict(pickle._Unpickler.dispatch)

  def __init__(
      self,
      file: Any,
      *,
      filename: str,
      storage_loader: Optional[StorageLoader] = None,
      legacy_views: bool = False,
      big_endian: bool = False,
      encoding: str = 'utf-8',
  ):
    super().__init__(file, encoding=encoding, errors='strict')
    self._filename = filename
    self._storage_loader = storage_loader
    self._legacy_views = legacy_views
    self._big_endian = big_endian
    self._views: Dict[Any, Any] = {}
    self._globals: Dict[Tuple[str, str], Any] = {}
    for key, obj in _ALLOWED.items():
      self._globals[key] = getattr(self, obj) if isinstance(obj, str) else obj
    # Callables REDUCE/INST/OBJ may call: the stand-ins and the plain data types.
    self._callable_ids = {
        id(obj) for obj in self._globals.values() if callable(obj) and not isinstance(obj, type)
    }
    self._rebuilders = {
        id(self._globals[('torch._utils', n)])
        for n in ('_rebuild_tensor', '_rebuild_tensor_v2', '_rebuild_tensor_v3')
    }

  # ---- globals
  def find_class(self, module: Any, name: Any) -> Any:
    if not isinstance(module, str) or not isinstance(name, str):
      raise UnsafeCheckpointError(f'{self._filename}: malformed global {module!r}.{name!r}')
    key = _py3_name(module, name)
    if key in self._globals:
      return self._globals[key]
    alias = '' if key == (module, name) else f" (Python 3: '{key[0]}.{key[1]}')"
    raise UnsafeCheckpointError(
        f"Refused to load {self._filename!r}: its pickle references the global "
        f"'{module}.{name}'{alias}, which is not on the allowlist of tensor and "
        f"container types (a file can run arbitrary code through such globals). "
        f"{_REFUSED_HELP}")

  def _refuse(self, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f'Refused to load {self._filename!r}: {what}. {_REFUSED_HELP}')

  def _check_callable(self, func: Any) -> None:
    if id(func) in self._callable_ids or (isinstance(func, type) and func in _SAFE_TYPES):
      return
    raise self._refuse(f'its pickle calls {func!r}, which is not an allowed constructor')

  # ---- opcodes that call something
  def load_reduce(self) -> None:
    stack = self.stack
    args = stack.pop()
    func = stack[-1]
    self._check_callable(func)
    if not isinstance(args, tuple):
      raise _bad(f'REDUCE arguments must be a tuple, got {type(args).__name__}')
    stack[-1] = func(*args)

  dispatch[pickle.REDUCE[0]] = load_reduce

  def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ
    self._check_callable(klass)
    self.append(klass(*args))

  def _new_object(self, cls: Any, args: Any, kwargs: Any) -> None:
    if not (isinstance(cls, type) and cls in _SAFE_TYPES):
      raise self._refuse(f'its pickle instantiates {cls!r} (NEWOBJ), which is not allowed')
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
      raise _bad('malformed NEWOBJ arguments')
    self.append(cls.__new__(cls, *args, **kwargs))

  def load_newobj(self) -> None:
    args = self.stack.pop()
    cls = self.stack.pop()
    self._new_object(cls, args, {})

  dispatch[pickle.NEWOBJ[0]] = load_newobj

  def load_newobj_ex(self) -> None:
    kwargs = self.stack.pop()
    args = self.stack.pop()
    cls = self.stack.pop()
    self._new_object(cls, args, kwargs)

  dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

  # ---- object state restore
  def _replace(self, old: Any, new: Any) -> None:
    self.stack[-1] = new
    for k, v in self.memo.items():
      if v is old:
        self.memo[k] = new

  def load_build(self) -> None:
    stack = self.stack
    state = stack.pop()
    inst = stack[-1]
    if isinstance(inst, (_DtypeProxy, _NDArrayProxy)):
      self._replace(inst, inst.finish(state))
      return
    if type(inst) not in (collections.OrderedDict, argparse.Namespace):
      raise self._refuse(
          f'its pickle restores the state of a {type(inst).__name__!r} object (BUILD), '
          'which is not allowed')
    if isinstance(state, tuple) and len(state) == 2:
      state, slotstate = state
      if slotstate:
        raise self._refuse('its pickle sets attributes through slot state (BUILD)')
    if not state:
      return
    if not isinstance(state, dict) or not all(type(k) is str for k in state):
      raise self._refuse('its pickle restores object state that is not a str-keyed dict')
    inst.__dict__.update(state)

  dispatch[pickle.BUILD[0]] = load_build

  # ---- storages
  def persistent_load(self, pid: Any) -> Any:
    if not isinstance(pid, tuple) or not pid:
      raise _bad(f'unexpected persistent id {pid!r}')
    kind = pid[0].decode('ascii') if isinstance(pid[0], bytes) else pid[0]
    if kind == 'module':
      raise self._refuse('it pickles a whole nn.Module object rather than a state_dict')
    if kind != 'storage' or self._storage_loader is None:
      raise _bad(f'unexpected persistent id of kind {kind!r}')
    if self._legacy_views:
      if len(pid) != 6:
        raise _bad(f'legacy storage id must have 6 fields, got {len(pid)}')
      _, stype, key, _location, numel, view = pid
    else:
      if len(pid) != 5:
        raise _bad(f'storage id must have 5 fields, got {len(pid)}')
      _, stype, key, _location, numel = pid
      view = None
    if not isinstance(stype, _StorageType):
      raise _bad(f'storage type must be a torch storage class, got {stype!r}')
    if not isinstance(key, (str, bytes, int)):
      raise _bad(f'storage key must be a str, got {type(key).__name__}')
    numel = _check_int(numel, 'storage size')
    flat = self._storage_loader(key, stype, numel)
    if view is None or flat is _PENDING:
      return flat
    # Legacy storage views (torch < 1.0): (view_key, offset, size) in elements.
    if not isinstance(view, tuple) or len(view) != 3:
      raise _bad(f'unexpected storage view metadata {view!r}')
    view_key, offset, size = view
    offset, size = _check_int(offset, 'view offset'), _check_int(size, 'view size')
    if view_key not in self._views:
      if offset < 0 or size < 0 or offset + size > flat.shape[0]:
        raise _bad(f'storage view [{offset}:{offset + size}] out of range')
      self._views[view_key] = flat[offset:offset + size]
    return self._views[view_key]

  # ---- tensor rebuild stand-ins (numpy arrays out)
  def _typed_flat(self, storage: Any) -> Any:
    if storage is _PENDING:
      return storage
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
      raise _bad(f'tensor storage must come from a persistent id, got {type(storage).__name__}')
    return storage

  def _rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any) -> Any:
    flat = self._typed_flat(storage)
    if flat is _PENDING:
      return _PENDING
    return _strided_copy(flat, storage_offset, size, stride)

  def _rebuild_tensor_v2(
      self,
      storage: Any,
      storage_offset: Any,
      size: Any,
      stride: Any,
      requires_grad: Any = False,
      backward_hooks: Any = None,
      metadata: Any = None,
  ) -> Any:
    arr = self._rebuild_tensor(storage, storage_offset, size, stride)
    return arr if arr is _PENDING else _apply_metadata(arr, metadata)

  def _rebuild_tensor_v3(
      self,
      storage: Any,
      storage_offset: Any,
      size: Any,
      stride: Any,
      requires_grad: Any,
      backward_hooks: Any,
      dtype: Any,
      metadata: Any = None,
  ) -> Any:
    flat = self._typed_flat(storage)
    if flat is _PENDING:
      return _PENDING
    if not isinstance(dtype, np.dtype):
      raise _bad(f'tensor dtype must be a torch dtype, got {dtype!r}')
    if flat.dtype != dtype:
      raw = flat.view(np.uint8)
      if raw.shape[0] % dtype.itemsize:
        raise _bad(f'storage of {raw.shape[0]} bytes is not a whole number of {dtype}')
      flat = raw.view(dtype)
      if self._big_endian and dtype.itemsize > 1:
        flat = flat.byteswap()
    return _apply_metadata(_strided_copy(flat, storage_offset, size, stride), metadata)

  def _rebuild_parameter(self, data: Any, requires_grad: Any = True,
                         backward_hooks: Any = None) -> Any:
    return self._check_tensor(data)

  def _rebuild_parameter_with_state(self, data: Any, requires_grad: Any, backward_hooks: Any,
                                    state: Any) -> Any:
    return self._check_tensor(data)  # python attributes of the Parameter are dropped

  def _rebuild_from_type(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # Tensors carrying python attributes: ``func(*args)`` rebuilds the plain tensor.
    plain_types = (_TENSOR_TOKEN, self._globals[('torch.nn.parameter', 'Parameter')])
    if id(func) not in self._rebuilders or not any(new_type is t for t in plain_types):
      raise self._refuse(f'its pickle rebuilds a tensor subclass {new_type!r}')
    if not isinstance(args, tuple):
      raise _bad('malformed tensor arguments')
    return self._check_tensor(func(*args))

  @staticmethod
  def _check_tensor(data: Any) -> Any:
    if data is _PENDING or isinstance(data, np.ndarray):
      return data
    raise _bad(f'expected a tensor, got {type(data).__name__}')


# ------------------------------------------------------------------ file formats


def _read_storage_bytes(raw: Any, stype: _StorageType, numel: int, big_endian: bool,
                        key: Any) -> np.ndarray:
  """Raw bytes -> writable native-endian 1-D array of ``numel`` elements."""
  nbytes = numel * stype.dtype.itemsize
  if len(raw) < nbytes:
    raise _bad(f'storage {key!r} holds {len(raw)} bytes but {numel} x {stype.dtype} '
               f'({nbytes} bytes) were declared: file truncated or corrupt')
  flat = np.frombuffer(raw, dtype=stype.dtype, count=numel).copy()
  if big_endian and stype.dtype.itemsize > 1:
    flat = flat.byteswap()
  return flat


def _unpickle(unpickler: _SafeUnpickler, path: str, what: str) -> Any:
  try:
    return unpickler.load()
  except UnsafeCheckpointError as err:
    if path in str(err):
      raise
    # raised by a stand-in (e.g. dill's _load_type asked for CodeType)
    raise UnsafeCheckpointError(f'Refused to load {path!r}: {err}. {_REFUSED_HELP}') from None
  except CheckpointFormatError as err:
    if path in str(err):
      raise
    raise CheckpointFormatError(f'{path!r}: {err}') from None
  except Exception as err:  # EOFError, UnpicklingError, struct.error, TypeError ...
    raise CheckpointFormatError(f'{path!r}: cannot read the {what} ({type(err).__name__}: {err}); '
                                'the file is truncated or corrupt') from err


def _load_zip(path: str, encoding: str) -> Any:
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, EOFError) as err:
    raise CheckpointFormatError(
        f'{path!r}: zip-format checkpoint is truncated or corrupt ({err})') from err
  with zf:
    names = zf.namelist()
    pkls = [n for n in names if re.fullmatch(r'[^/]+/data\.pkl', n)]
    if any(re.fullmatch(r'[^/]+/(constants\.pkl|code/.*)', n) for n in names):
      raise CheckpointFormatError(
          f'{path!r} is a TorchScript archive (torch.jit.save), which holds code; '
          'only torch.save checkpoints are supported')
    if len(pkls) != 1:
      raise CheckpointFormatError(f"{path!r} is a zip archive but not a torch.save checkpoint "
                                  f"(expected exactly one '<name>/data.pkl', found {len(pkls)})")
    prefix = pkls[0][:-len('data.pkl')]

    def read(name: str) -> bytes:
      try:
        return zf.read(name)
      except KeyError:
        raise CheckpointFormatError(f'{path!r}: archive member {name!r} is missing') from None
      except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointFormatError(
            f'{path!r}: archive member {name!r} is truncated or corrupt ({err})') from err

    big_endian = False
    if prefix + 'byteorder' in names:
      order = read(prefix + 'byteorder').decode('ascii', 'replace').strip()
      if order not in ('little', 'big'):
        raise CheckpointFormatError(f'{path!r}: unknown byteorder record {order!r}')
      big_endian = order == 'big'

    cache: Dict[Tuple[Any, np.dtype], np.ndarray] = {}

    def load_storage(key: Any, stype: _StorageType, numel: int) -> np.ndarray:
      if not isinstance(key, str) or '/' in key:
        raise CheckpointFormatError(f'{path!r}: bad storage key {key!r}')
      ck = (key, stype.dtype)
      if ck not in cache:
        raw = read(f'{prefix}data/{key}')
        # Untyped storages stay bytes here; _rebuild_tensor_v3 swaps after viewing.
        swap = big_endian and not stype.untyped
        cache[ck] = _read_storage_bytes(raw, stype, numel, swap, key)
      return cache[ck]

    data_pkl = read(pkls[0])
    unpickler = _SafeUnpickler(
        io.BytesIO(data_pkl),
        filename=path,
        storage_loader=load_storage,
        big_endian=big_endian,
        encoding=encoding,
    )
    return _unpickle(unpickler, path, 'checkpoint pickle')


def _load_legacy(path: str, data: bytes, encoding: str) -> Any:
  buf = io.BytesIO(data)

  def plain(what: str) -> Any:  # header pickles: plain values only, no storages
    return _unpickle(_SafeUnpickler(buf, filename=path, encoding=encoding), path, what)

  try:
    magic = plain('magic number')
  except CheckpointFormatError as err:
    raise CheckpointFormatError(
        f"{path!r} is not a torch checkpoint (it does not start with torch's magic "
        f"number pickle): {err}") from err
  if magic != _LEGACY_MAGIC:
    raise CheckpointFormatError(
        f'{path!r} is a pickle but not a torch checkpoint (no torch magic number; '
        'plain pickles are not supported)')
  version = plain('protocol version')
  if version != _LEGACY_PROTOCOL:
    raise CheckpointFormatError(f'{path!r}: unsupported legacy protocol version {version!r}')
  plain('sys_info header')
  start = buf.tell()

  # Pass 1: learn every storage's dtype (the data after the pickle is sized by it).
  dtypes: Dict[Any, _StorageType] = {}

  def record(key: Any, stype: _StorageType, numel: int) -> _Pending:
    dtypes.setdefault(key, stype)
    return _PENDING

  _unpickle(
      _SafeUnpickler(buf, filename=path, storage_loader=record, legacy_views=True,
                     encoding=encoding),
      path,
      'checkpoint pickle',
  )
  keys = plain('storage key list')
  if not isinstance(keys, list):
    raise CheckpointFormatError(f'{path!r}: storage key list is a {type(keys).__name__}')

  pos = buf.tell()
  view = memoryview(data)
  storages: Dict[Any, np.ndarray] = {}
  for key in keys:
    if key not in dtypes:
      raise CheckpointFormatError(f'{path!r}: storage {key!r} is not used by the pickle')
    stype = dtypes[key]
    if pos + 8 > len(data):
      raise CheckpointFormatError(f'{path!r}: file truncated before storage {key!r}')
    (numel,) = struct.unpack_from('<q', data, pos)
    pos += 8
    nbytes = numel * stype.dtype.itemsize
    if numel < 0 or pos + nbytes > len(data):
      raise CheckpointFormatError(
          f'{path!r}: file truncated in storage {key!r} (needs {nbytes} bytes, '
          f'{len(data) - pos} left)')
    storages[key] = _read_storage_bytes(view[pos:pos + nbytes], stype, numel, False, key)
    pos += nbytes
  missing = set(dtypes) - set(storages)
  if missing:
    raise CheckpointFormatError(f'{path!r}: storages {sorted(map(str, missing))} have no data')

  def load_storage(key: Any, stype: _StorageType, numel: int) -> np.ndarray:
    flat = storages[key]
    if flat.dtype != stype.dtype:  # same bytes seen as another type (e.g. untyped)
      raw = flat.view(np.uint8)
      if raw.shape[0] % stype.dtype.itemsize:
        raise CheckpointFormatError(f'{path!r}: storage {key!r} is used with two dtypes')
      flat = raw.view(stype.dtype)
    if numel > flat.shape[0]:
      raise CheckpointFormatError(f'{path!r}: storage {key!r} is shorter than declared')
    return flat

  # Pass 2: the same pickle again, now with the storage data at hand.
  buf.seek(start)
  return _unpickle(
      _SafeUnpickler(buf, filename=path, storage_loader=load_storage, legacy_views=True,
                     encoding=encoding),
      path,
      'checkpoint pickle',
  )


def load_torch_checkpoint(path: Any, *, encoding: str = 'utf-8') -> Any:
  """Load a ``torch.save`` file as nested python objects with numpy arrays for tensors.

    Reads the zip format and the legacy format (also ``pickle_module=dill`` files)
    without importing torch and without calling anything the file names, apart from
    the allowlisted stand-ins in this module (see :data:`ALLOWED_GLOBALS`).

    Args:
      path: the checkpoint file.
      encoding: how to decode Python 2 ``str`` objects in very old pickles (as in
        ``torch.load``).

    Returns:
      The saved object, usually a dict (e.g. a ``state_dict`` or
      ``{'model': ..., 'optimizer': ..., 'epoch': ...}``); every tensor is a
      C-contiguous numpy array with torch's dtype and shape.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      UnsafeCheckpointError: the file references a global or operation outside the
        allowlist (nothing was executed; the message says how to re-save it).
      CheckpointFormatError: not a torch checkpoint, or truncated/corrupt.
    """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint file not found: {path!r}')
  if os.path.isdir(path):
    raise CheckpointFormatError(f'{path!r} is a directory, not a torch checkpoint file')
  with open(path, 'rb') as f:
    head = f.read(512)
  if not head:
    raise CheckpointFormatError(f'{path!r} is empty, not a torch checkpoint')
  if head.startswith(b'PK'):
    return _load_zip(path, encoding)
  if len(head) >= 262 and head[257:262] == b'ustar':
    raise CheckpointFormatError(
        f'{path!r} is a tar archive (torch < 0.4 checkpoint format), which is not '
        'supported; re-save it with a recent torch')
  if head[0] != pickle.PROTO[0]:
    raise CheckpointFormatError(
        f'{path!r} is not a torch checkpoint (neither a zip archive nor a pickle; '
        f'starts with {head[:16]!r})')
  with open(path, 'rb') as f:
    data = f.read()
  return _load_legacy(path, data, encoding)
