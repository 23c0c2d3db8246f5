"""Port PyTorch ResNet checkpoints to twin-BN Flax variables (and model directories).

Reads, without torch and without executing anything from the file (see
:mod:`twins_jax.torch_pickle`):

* MadryLab ``robustness`` / ``robust-models-transfer`` ``.ckpt`` files: a dict with
  ``model`` (or ``state_dict``) whose keys are ``module.model.*`` (the classifier,
  used), ``module.attacker.model.*`` (a duplicate, ignored; checked to be equal) and
  ``module.normalizer.*`` / ``module.attacker.normalize.*`` (the input normaliser,
  ignored; checked to be the ImageNet constants the Flax model hard-codes);
* plain torchvision ``state_dict`` files;
* RobustBench files (the state dict under ``state_dict`` or at the top, keys with
  ``module.`` and/or ``model.`` prefixes).

A source may be a local file or ``hf://ORG/REPO/FILE`` on the Hugging Face Hub (downloaded
once into the Hugging Face cache, see :mod:`twins_jax.hub`). The report gives the file's
SHA-256, to compare with the published one.

One PyTorch BatchNorm fills both TWINS branches: ``weight``/``bias`` go to the
Adaptive and the Frozen scale/bias (or the single shared pair), ``running_mean``/
``running_var`` to ``batch_stats`` and ``frozen_stats``. ``num_batches_tracked`` is
ignored. The torch-name -> Flax-path table is :func:`torch_to_flax` (and its inverse
:func:`flax_to_torch_name`), independent of the model code.

The result is checked against the model's own variable tree: missing, unexpected and
mis-shaped entries are reported by name and refused (:class:`PortError`) unless the
missing ones match an ``allow_missing`` glob (matched against the torch name, e.g.
``layer4.*``, or the Flax path, e.g. ``params/layer4_*``) or the unexpected ones an
``allow_unexpected`` glob. A ``fc`` head whose number of classes differs from
``num_classes`` is replaced by a fresh PyTorch-default-initialised one; that is
reported, not an error.

CLI::

    python -m twins_jax.port SRC DST --arch resnet50 --num-classes 10 [--resize 224]
        [--class-names FILE] [--allow-missing PATTERN ...] [--allow-unexpected PATTERN ...]
        [--share-affine] [--no-twin] [--seed S] [--overwrite]

(``twins-jax-port`` once the package is installed.) ``--class-names``: a text file with one
class name per line (or a JSON list), stored in the model directory for ``predict``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import hashlib
import os
import re
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from twins_jax import errors, hub, model_io
from twins_jax import models

# ------------------------------------------------------------------ the name table

Transform = Callable[[np.ndarray], np.ndarray]
_IDENTITY: Transform = lambda a: a
_OIHW_TO_HWIO: Transform = lambda a: np.transpose(a, (2, 3, 1, 0))
_OUT_IN_TO_IN_OUT: Transform = lambda a: np.transpose(a, (1, 0))

# torch module name -> (kind, flax module path); e.g. 'layer1.0.downsample.1'.
_TOP_MODULES = {'conv1': 'conv', 'bn1': 'bn', 'fc': 'linear'}
_BLOCK_MODULE = re.compile(r'layer(\d+)\.(\d+)\.(conv\d+|bn\d+|downsample\.0|downsample\.1)')


def _module_kind(module: str) -> Optional[Tuple[str, Tuple[str, ...]]]:
  if module in _TOP_MODULES:
    return _TOP_MODULES[module], (module,)
  m = _BLOCK_MODULE.fullmatch(module)
  if m is None:
    return None
  layer, block, sub = m.groups()
  if sub == 'downsample.0':
    kind = 'conv'
  elif sub == 'downsample.1':
    kind = 'bn'
  else:
    kind = 'conv' if sub.startswith('conv') else 'bn'
  return kind, (f'layer{layer}_{block}', sub.replace('.', '_'))


def _leaf_rules(kind: str, twin: bool,
                share_affine: bool) -> Dict[str, List[Tuple[str, str, Transform]]]:
  """torch leaf name -> [(collection, flax leaf name, transform)]; [] = expected, ignored."""
  if kind == 'conv':
    return {'weight': [('params', 'kernel', _OIHW_TO_HWIO)]}
  if kind == 'linear':
    return {
        'weight': [('params', 'kernel', _OUT_IN_TO_IN_OUT)], 'bias': [('params', 'bias', _IDENTITY)]
    }
  affine = ('adaptive_', 'frozen_') if (twin and not share_affine) else ('',)
  stats = ('batch_stats', 'frozen_stats') if twin else ('batch_stats',)
  return {
      'weight': [('params', f'{p}scale', _IDENTITY) for p in affine],
      'bias': [('params', f'{p}bias', _IDENTITY) for p in affine],
      'running_mean': [(c, 'mean', _IDENTITY) for c in stats],
      'running_var': [(c, 'var', _IDENTITY) for c in stats],
      'num_batches_tracked': [],
  }


def torch_to_flax(name: str, *, twin: bool = True,
                  share_affine: bool = False) -> Optional[List[Tuple[str, Transform]]]:
  """Flax targets of one torchvision state-dict entry.

  Returns ``[('params/layer1_0/conv1/kernel', transform), ...]`` (one BN entry fills
  several targets), ``[]`` for entries that are expected but not used
  (``num_batches_tracked``), or ``None`` for a name that is not a torchvision ResNet
  entry.
  """
  module, _, leaf = name.rpartition('.')
  mk = _module_kind(module)
  if mk is None:
    return None
  kind, mpath = mk
  rules = _leaf_rules(kind, twin, share_affine)
  if leaf not in rules:
    return None
  return [('/'.join((coll, *mpath, fleaf)), fn) for coll, fleaf, fn in rules[leaf]]


_FLAX_LEAF_TO_TORCH = {
    'kernel': 'weight', 'bias': 'bias', 'scale': 'weight', 'adaptive_scale': 'weight',
    'frozen_scale': 'weight', 'adaptive_bias': 'bias', 'frozen_bias': 'bias',
    'mean': 'running_mean', 'var': 'running_var'
}


def flax_to_torch_name(path: str) -> str:
  """'params/layer1_0/downsample_1/frozen_scale' -> 'layer1.0.downsample.1.weight'."""
  parts = path.split('/')
  mods = []
  for p in parts[1:-1]:
    mods.extend(p.split('_') if p.startswith(('layer', 'downsample')) else [p])
  return '.'.join(mods + [_FLAX_LEAF_TO_TORCH.get(parts[-1], parts[-1])])


def _torch_shape(flax_path: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The PyTorch-layout shape of a Flax leaf (for messages)."""
  if flax_path.endswith('/kernel') and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if flax_path.endswith('/kernel') and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


# ------------------------------------------------------------ checkpoint structure

_IMAGENET = {'new_mean': models.IMAGENET_MEAN, 'new_std': models.IMAGENET_STD}
_ROBUSTNESS_AUX = ('attacker.', 'normalizer.')
_INFO_KEYS = ('epoch', 'nat_prec1', 'adv_prec1', 'best_prec1', 'arch')


def _first(names: Sequence[str], n: int, sep: str = ', ') -> str:
  """The first ``n`` of ``names``, and how many more there are."""
  more = f'{sep}... ({len(names) - n} more)' if len(names) > n else ''
  return sep.join(names[:n]) + more


class PortError(errors.CheckpointError):
  """The checkpoint cannot be ported as asked; ``.report`` says why, by name."""

  def __init__(self, message: str, report: Optional['PortReport'] = None,
               details: Optional[str] = None):
    super().__init__(message, details)
    self.report = report


@dataclasses.dataclass
class PortReport:
  """What :func:`port_checkpoint` did. Names are checkpoint names after prefix stripping."""
  source: str  # the path or hf:// URI as given
  arch: str
  num_classes: int
  twin: bool
  share_affine: bool
  checkpoint_format: str = ''  # 'robustness' or 'state_dict'
  container: str = ''  # where the state dict sat in the file
  prefixes_stripped: List[str] = dataclasses.field(default_factory=list)
  loaded: int = 0  # checkpoint tensors used
  ignored: Dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
  missing: List[str] = dataclasses.field(default_factory=list)  # refused
  allowed_missing: List[str] = dataclasses.field(default_factory=list)  # freshly initialised
  unexpected: List[str] = dataclasses.field(default_factory=list)  # refused
  allowed_unexpected: List[str] = dataclasses.field(default_factory=list)  # ignored
  mismatched: List[str] = dataclasses.field(default_factory=list)  # refused
  head: str = ''
  head_replaced: bool = False
  warnings: List[str] = dataclasses.field(default_factory=list)
  checkpoint_info: Dict[str, Any] = dataclasses.field(default_factory=dict)
  seed: int = 0
  source_file: str = ''  # the local file read (for hf://, the Hugging Face cache's copy)
  source_size: int = 0  # bytes
  source_sha256: str = ''  # of the file's bytes, to compare with the published value

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.mismatched)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def summary(self, max_names: int = 20, problems: bool = True) -> str:
    """A short human-readable report (``problems=False`` leaves out the refused names)."""

    def names(items):
      shown = ', '.join(items[:max_names])
      return shown + (f', ... ({len(items) - max_names} more)' if len(items) > max_names else '')

    lines = [
        f'source: {self.source}' +
        (f' ({self.source_file})' if self.source_file and self.source_file != self.source else ''),
    ]
    if self.source_sha256:
      lines.append(f'sha256: {self.source_sha256} ({self.source_size} bytes)')
    lines += [
        f'format: {self.checkpoint_format} (state dict at {self.container}' +
        (f', prefixes stripped: {" ".join(self.prefixes_stripped)}' if self.prefixes_stripped else
         '') + ')', f'model: {self.arch}, {self.num_classes} classes, twin={self.twin}, '
        f'share_affine={self.share_affine}', f'loaded {self.loaded} tensors; head: {self.head}'
    ]
    if self.checkpoint_info:
      lines.append('checkpoint info: ' +
                   ', '.join(f'{k}={v}' for k, v in self.checkpoint_info.items()))
    if self.ignored:
      lines.append('ignored: ' + ', '.join(f'{n} {k}' for k, n in self.ignored.items()))
    for label, items in (('MISSING', self.missing), ('UNEXPECTED', self.unexpected),
                         ('MIS-SHAPED', self.mismatched), ('missing, allowed (fresh init)',
                                                           self.allowed_missing),
                         ('unexpected, allowed (ignored)', self.allowed_unexpected)):
      if items and (problems or not label.isupper()):
        lines.append(f'{label} ({len(items)}): {names(items)}')
    lines += [f'WARNING: {w}' for w in self.warnings]
    return '\n'.join(lines)


def _is_tensor_dict(obj) -> bool:
  return (isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(k, str) for k in obj) and
          any(isinstance(v, np.ndarray) for v in obj.values()) and
          all(isinstance(v, (np.ndarray, np.generic, int, float)) for v in obj.values()))


def _scalar(v):
  if isinstance(v, (int, float, str, bool)):
    return v
  if isinstance(v, (np.ndarray, np.generic)) and np.size(v) == 1:
    v = np.asarray(v).reshape(())
    # float32 -> the shortest decimal that round-trips (63.9, not 63.900001525878906).
    return float(str(v)) if v.dtype == np.float32 else v.item()
  return None


def _find_state_dict(obj, report: PortReport) -> Mapping[str, Any]:
  if not isinstance(obj, Mapping):
    raise PortError(
        f'{report.source}: the checkpoint holds a {type(obj).__name__}, '
        'not a dict / state_dict.', report)
  if _is_tensor_dict(obj):
    report.container = 'top level'
    return obj
  for key in ('model', 'state_dict', 'model_state_dict'):
    if key in obj and _is_tensor_dict(obj[key]):
      report.container = f'[{key!r}]'
      for k in _INFO_KEYS:
        if k in obj and _scalar(obj[k]) is not None:
          report.checkpoint_info[k] = _scalar(obj[k])
      return obj[key]
  keys = ', '.join(repr(k) for k in list(obj)[:10])
  raise PortError(
      f'{report.source}: no state dict found (looked at the top level and under '
      f"'model', 'state_dict', 'model_state_dict'; top-level keys: {keys}).", report)


def _strip_prefixes(sd: Mapping[str, Any], report: PortReport) -> Dict[str, Any]:
  """Returns the classifier's entries with torchvision names; handles the extras."""
  sd = dict(sd)
  if all(k.startswith('module.') for k in sd):
    sd = {k[len('module.'):]: v for k, v in sd.items()}
    report.prefixes_stripped.append('module.')
  if any(k.startswith(_ROBUSTNESS_AUX) for k in sd):
    report.checkpoint_format = 'robustness'
    report.prefixes_stripped.append('model.')
    model, attacker, other = {}, {}, {}
    for k, v in sd.items():
      if k.startswith('model.'):
        model[k[len('model.'):]] = v
      elif k.startswith('attacker.model.'):
        attacker[k[len('attacker.model.'):]] = v
      elif k.startswith(('normalizer.', 'attacker.normalize.')):
        _check_normaliser(k, v, report)
      else:
        other[k] = v  # reported as unexpected under its own name
    if attacker:
      report.ignored['attacker copies (duplicate weights)'] = len(attacker)
      differ = sorted(
          k for k, v in attacker.items()
          if k not in model or np.shape(model[k]) != np.shape(v) or not np.array_equal(model[k], v))
      if differ:
        report.warnings.append(
            f'{len(differ)} attacker.model.* entries differ from (or are absent in) the '
            f'classifier model.*, e.g. {differ[:3]}; the classifier copy is used.')
    model.update(other)
    return model
  report.checkpoint_format = 'state_dict'
  for prefix in ('model.', 'module.'):
    if all(k.startswith(prefix) for k in sd):
      sd = {k[len(prefix):]: v for k, v in sd.items()}
      report.prefixes_stripped.append(prefix)
  return sd


def _check_normaliser(key: str, value, report: PortReport) -> None:
  report.ignored['normaliser buffers'] = report.ignored.get('normaliser buffers', 0) + 1
  leaf = key.rpartition('.')[2]
  if leaf not in _IMAGENET:
    report.warnings.append(f'unknown normaliser entry {key} ignored.')
    return
  want = np.asarray(_IMAGENET[leaf], np.float64)
  got = np.asarray(value, np.float64).reshape(-1) if isinstance(value, np.ndarray) else None
  if got is None or got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=1e-6):
    report.warnings.append(
        f'{key} = {None if got is None else got.tolist()} is not the ImageNet constant '
        f'{want.tolist()} that the Flax model uses inside its forward; the ported model '
        "will normalise its inputs differently from the checkpoint's.")


# ------------------------------------------------------------------- the port


def _fresh_value(path: str, shape, key) -> np.ndarray:
  """A freshly initialised leaf, with the model's own initialisers."""
  leaf = path.rsplit('/', 1)[-1]
  if path.startswith(('batch_stats/', 'frozen_stats/')):
    return np.zeros(shape, np.float32) if leaf == 'mean' else np.ones(shape, np.float32)
  if leaf.endswith('scale'):
    return np.ones(shape, np.float32)
  if leaf.endswith('bias') and not path.startswith('params/fc/'):
    return np.zeros(shape, np.float32)
  if leaf == 'kernel' and len(shape) == 4:
    return np.asarray(models.conv_init(key, shape, jnp.float32))
  raise AssertionError(f'no initialiser for {path}')


def _fresh_head(num_classes: int, fan_in: int, seed: int) -> Dict[str, np.ndarray]:
  """``fc`` kernel/bias as the model initialises them (PyTorch's default Linear init)."""
  params = models.TorchDense(num_classes).init(jax.random.PRNGKey(seed),
                                               jnp.zeros((1, fan_in), jnp.float32))['params']
  return {
      'params/fc/kernel': np.asarray(params['kernel']), 'params/fc/bias': np.asarray(params['bias'])
  }


def _unflatten(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _matches(patterns: Sequence[str], *names: str) -> bool:
  return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def port_checkpoint(src, spec: models.ModelSpec, *, allow_missing: Sequence[str] = (),
                    allow_unexpected: Sequence[str] = (), seed: int = 0) -> Tuple[dict, PortReport]:
  """Converts a PyTorch ResNet checkpoint into the variables of the model ``spec`` describes.

  Args:
    src: a checkpoint file (read with :func:`twins_jax.torch_pickle.load_torch_checkpoint`,
      which refuses pickles that would run code), an ``hf://ORG/REPO/FILE`` path
      (:mod:`twins_jax.hub`) or an already loaded dict.
    spec: the model to fill (a :class:`twins_jax.models.ModelSpec`).
    allow_missing: glob patterns (torch names such as ``'layer4.*'`` or Flax paths such as
      ``'params/fc/*'``) of model entries that may be absent from the checkpoint; they are
      freshly initialised.
    allow_unexpected: glob patterns of checkpoint entries (after prefix stripping) that
      may be ignored.
    seed: PRNG seed of every fresh value (a replaced head, allowed missing entries).

  Returns:
    ``(variables, report)``: a ``{'params', 'batch_stats'[, 'frozen_stats']}`` tree of
    float32 ``jax.Array`` s and a :class:`PortReport`.

  Raises:
    PortError: missing (not allowed), unexpected (not allowed) or mis-shaped entries, or
      no state dict in the file; the message lists them by name, ``.report`` has details.
    twins_jax.torch_pickle.UnsafeCheckpointError: the file tries to run code.
    twins_jax.torch_pickle.CheckpointFormatError, FileNotFoundError: unreadable file.
    twins_jax.errors.CheckpointError: an ``hf://`` file that cannot be had.
  """
  arch, num_classes, twin, share_affine = (spec.arch, spec.num_classes, spec.twin,
                                           spec.share_affine)
  model = spec.build()
  file_info = {}
  if isinstance(src, Mapping):
    source, obj = '<in-memory checkpoint>', src
  else:
    from twins_jax.torch_pickle import load_torch_checkpoint  # pylint: disable=g-import-not-at-top
    source = os.fspath(src)
    local = os.fspath(hub.resolve(source))
    obj = load_torch_checkpoint(local)
    file_info = dict(source_file=os.path.abspath(local), source_size=os.path.getsize(local),
                     source_sha256=file_sha256(local))
  report = PortReport(source=source, arch=arch, num_classes=num_classes, twin=twin,
                      share_affine=share_affine, seed=seed, **file_info)
  sd = _strip_prefixes(_find_state_dict(obj, report), report)

  expected = model_io._leaf_table(model_io.abstract_variables(model))  # pylint: disable=protected-access
  filled: Dict[str, np.ndarray] = {}

  # The classification head: kept if it fits, replaced if only its class count differs.
  fan_in, _ = expected['params/fc/kernel'][0]
  w, b = sd.get('fc.weight'), sd.get('fc.bias')
  if (isinstance(w, np.ndarray) and isinstance(b, np.ndarray) and w.ndim == 2 and
      w.shape[1] == fan_in and b.shape == (w.shape[0],) and w.shape[0] != num_classes):
    report.head = (f'replaced: checkpoint head has {w.shape[0]} classes, model {num_classes}; '
                   f'fresh Linear({fan_in}, {num_classes}) with PyTorch default init (seed {seed})')
    report.head_replaced = True
    report.ignored['replaced head tensors'] = 2
    filled.update(_fresh_head(num_classes, fan_in, seed))
    sd = {k: v for k, v in sd.items() if k not in ('fc.weight', 'fc.bias')}

  for name, value in sd.items():
    targets = torch_to_flax(name, twin=twin, share_affine=share_affine)
    if targets is not None and any(t not in expected for t, _ in targets):
      targets = None  # a ResNet name this architecture does not have (e.g. layer3.5 in resnet18)
    if targets is None:
      (report.allowed_unexpected
       if _matches(allow_unexpected, name) else report.unexpected).append(name)
      continue
    if not targets:
      key = 'num_batches_tracked' if name.endswith('num_batches_tracked') else 'unused'
      report.ignored[key] = report.ignored.get(key, 0) + 1
      continue
    if not isinstance(value, np.ndarray) or value.dtype.kind in 'biucOSU':
      kind = type(value).__name__ if not isinstance(value, np.ndarray) else str(value.dtype)
      report.mismatched.append(f'{name}: not a floating-point tensor ({kind})')
      continue
    for path, fn in targets:
      shape, dtype = expected[path]
      if value.ndim != len(shape) or fn(value).shape != shape:
        report.mismatched.append(f'{name}: checkpoint {tuple(value.shape)}, model expects '
                                 f'{_torch_shape(path, shape)}')
        break
      filled[path] = np.ascontiguousarray(fn(value)).astype(dtype)
    else:
      report.loaded += 1
      if not np.all(np.isfinite(value.astype(np.float32))):
        report.warnings.append(f'{name} has non-finite values.')

  if not report.head_replaced:
    report.head = ('kept' if 'params/fc/kernel' in filled else
                   'not in the checkpoint') + f' ({num_classes} classes)'

  mismatched_names = {m.split(':', 1)[0] for m in report.mismatched}
  missing_paths = [
      p for p in expected if p not in filled and flax_to_torch_name(p) not in mismatched_names
  ]
  by_name: Dict[str, List[str]] = {}
  for p in missing_paths:
    by_name.setdefault(flax_to_torch_name(p), []).append(p)
  base_key = jax.random.PRNGKey(seed)
  for name, paths in sorted(by_name.items()):
    if not all(_matches(allow_missing, name, p) for p in paths):
      report.missing.append(name)
      continue
    report.allowed_missing.append(name)
    if name.startswith('fc.'):
      head = _fresh_head(num_classes, fan_in, seed)
      filled.update({p: head[p] for p in paths})
      continue
    key = jax.random.fold_in(base_key, zlib.crc32(name.encode()))
    value = _fresh_value(paths[0], expected[paths[0]][0], key)
    filled.update({p: value for p in paths})  # both branches of a BN start equal
  report.allowed_unexpected.sort()
  report.unexpected.sort()

  if not report.ok:
    kinds = (('missing from the checkpoint', report.missing, ', '),
             ('unexpected in the checkpoint', report.unexpected, ', '), ('mis-shaped',
                                                                         report.mismatched, '; '))
    short = [
        f'{what} ({len(names)}): {_first(names, 3, sep)}' for what, names, sep in kinds if names
    ]
    full = [
        f'{what} ({len(names)}): {_first(names, 30, sep)}' for what, names, sep in kinds if names
    ]
    hint = ('Check --arch / --num-classes against the checkpoint.'
            if not (report.missing or report.unexpected) else
            'Check --arch, or pass allow_missing / --allow-missing (e.g. "layer4.*") or '
            'allow_unexpected / --allow-unexpected globs to accept a partial load deliberately.')
    raise PortError(
        f'{source} does not fit {arch} with {num_classes} classes: ' + '; '.join(short) + '. ' +
        hint, report, details='\n'.join(full))

  for w in report.warnings:
    warnings.warn(w, stacklevel=2)
  variables = jax.tree.map(jnp.asarray, _unflatten(filled))
  return variables, report


def file_sha256(path: str) -> str:
  """The SHA-256 of a file's bytes, as ``sha256sum`` prints it."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def port_to_dir(src, dst, spec: models.ModelSpec, *, overwrite: bool = False,
                class_names: Optional[Sequence[str]] = None, **options) -> Tuple[dict, PortReport]:
  """:func:`port_checkpoint`, then :func:`twins_jax.model_io.save_model_dir` into ``dst``.

  ``options`` are :func:`port_checkpoint`'s (allow_missing, allow_unexpected, seed). The
  directory's metadata records the source (path or ``hf://`` URI, the file read, its size
  and sha256), the date, the port report and ``class_names`` (one per class) if given.
  """
  dst = Path(dst)
  if dst.is_dir() and any(dst.iterdir()) and not overwrite:
    raise FileExistsError(f'{dst} exists and is not empty; pass overwrite=True (--overwrite).')
  if class_names is not None:
    class_names = model_io.check_class_names(class_names, spec.num_classes)
  variables, report = port_checkpoint(src, spec, **options)
  metadata = {
      'created_by': 'twins_jax.port',
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'source': report.source,
      'port_report': report.to_dict(),
  }
  if not isinstance(src, Mapping):
    if not hub.is_hf_uri(report.source):
      metadata['source'] = os.path.abspath(report.source)
    metadata.update(source_file=report.source_file, source_size=report.source_size,
                    source_sha256=report.source_sha256)
  if class_names is not None:
    metadata['class_names'] = class_names
  model_io.save_model_dir(dst, variables, spec, metadata, overwrite=overwrite)
  return variables, report


def read_class_names(path) -> List[str]:
  """Class names from a text file (one per line; blank lines and surrounding spaces are
  dropped) or a ``.json`` file holding a list of strings."""
  import json  # pylint: disable=g-import-not-at-top
  try:
    text = Path(path).read_text(encoding='utf-8')
  except OSError as e:
    raise errors.DataError(f'cannot read the class names file {path}: {e.strerror}.') from None
  if str(path).lower().endswith('.json'):
    try:
      names = json.loads(text)
    except ValueError as e:
      raise errors.DataError(f'{path} is not valid JSON: {e}') from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
      raise errors.DataError(f'{path} must hold a JSON list of class-name strings.')
    return names
  return [line.strip() for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
  p = errors.cli_parser(
      'twins-jax-port', 'twins_jax.port',
      'Port a PyTorch ResNet checkpoint (robustness .ckpt, torchvision or '
      'RobustBench state dict) to a twins_jax model directory.')
  p.add_argument('src', help='the PyTorch checkpoint: a file or hf://ORG/REPO/FILE')
  p.add_argument('dst', help='the model directory to write')
  p.add_argument('--arch', required=True, choices=sorted(models.ARCHS))
  p.add_argument(
      '--num-classes', type=int, required=True,
      help='classes of the new model; a checkpoint head of another size is '
      'replaced by a fresh one')
  p.add_argument('--resize', type=int, default=None,
                 help='nearest-upsample inputs to RESIZE x RESIZE inside the model (e.g. 224)')
  p.add_argument(
      '--class-names', default=None, metavar='FILE',
      help='class names to store with the model: one per line (or a JSON list), '
      'as many as --num-classes')
  p.add_argument(
      '--allow-missing', nargs='+', action='extend', default=[], metavar='PATTERN',
      help='glob(s) of model entries the checkpoint may lack (fresh init), '
      'torch names ("layer4.*") or Flax paths ("params/layer4_*")')
  p.add_argument('--allow-unexpected', nargs='+', action='extend', default=[], metavar='PATTERN',
                 help='glob(s) of checkpoint entries to ignore')
  p.add_argument('--share-affine', action='store_true',
                 help='one BN scale/bias pair for both branches')
  p.add_argument('--no-twin', action='store_true', help='plain BatchNorm model (no Frozen Net)')
  p.add_argument('--seed', type=int, default=0, help='seed of freshly initialised values')
  p.add_argument('--overwrite', action='store_true', help='replace the model in DST')
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  errors.drop_closed_loop_noise()
  from twins_jax.torch_pickle import CheckpointFormatError, UnsafeCheckpointError  # pylint: disable=g-import-not-at-top
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # the report prints them
      spec = models.ModelSpec(args.arch, args.num_classes, resize=args.resize,
                              twin=not args.no_twin, share_affine=args.share_affine)
      class_names = None if args.class_names is None else read_class_names(args.class_names)
      _, report = port_to_dir(args.src, args.dst, spec, overwrite=args.overwrite,
                              class_names=class_names, allow_missing=args.allow_missing,
                              allow_unexpected=args.allow_unexpected, seed=args.seed)
  except UnsafeCheckpointError as e:
    return errors.report(
        errors.CheckpointError(
            f'refusing {args.src}: it asks to run code when loaded; get the '
            'checkpoint from a source you trust', details=str(e)),
        show_traceback=errors.verbose(argv))
  except PortError as e:
    if e.report is not None and e.report.checkpoint_format:
      e.details = e.report.summary(problems=False)
    return errors.report(e, show_traceback=errors.verbose(argv))
  except (CheckpointFormatError, FileNotFoundError, FileExistsError, model_io.ModelDirError,
          ValueError) as e:
    error = e if isinstance(e, errors.UserError) else errors.UserError(str(e))
    return errors.report(error, show_traceback=errors.verbose(argv))
  print(report.summary())
  print(f'wrote {os.path.abspath(args.dst)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
