"""Model directories: a model's variables plus what it takes to rebuild it.

A model directory is what training starts from and what prediction reads::

    MODEL_DIR/
      model.json    {"format": "twins_jax.model_dir", "version": 2,
                     "spec": {arch, num_classes, resize, twin, share_affine},
                     "metadata": {... free-form: source file, port report, date ...}}
      variables/    an Orbax checkpoint of the variable tree
                    ({'params', 'batch_stats'[, 'frozen_stats']}, see twins_jax.models)

``spec`` is a :class:`twins_jax.models.ModelSpec`. ``model.json`` is written last, so a
directory that has it is complete. Version-1 directories (the same fields under
``model_kwargs``) still load.

Metadata keys that :mod:`twins_jax.predict` reads (both optional):

* ``class_names``: one name per class (training writes the dataset's; ``twins_jax.port
  --class-names FILE`` a file's);
* ``preprocessing``: ``{"augment", "image_size", "resize_size"}``, the evaluation transform
  of the run that trained the model (:func:`twins_jax.data.transforms.transform` with
  ``train=False``); ported models have none.

Public API: :func:`save_model_dir`, :func:`load_model_dir`, :func:`read_model_json`,
:func:`abstract_variables`, :func:`check_class_names`, :class:`ModelDirError`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from twins_jax import errors, models

FORMAT = 'twins_jax.model_dir'
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: the spec under 'model_kwargs'
MODEL_JSON = 'model.json'
VARIABLES_DIR = 'variables'


class ModelDirError(errors.CheckpointError):
  """A model directory is missing, incomplete or does not match its model."""


def _spec(spec: Any, where: str) -> models.ModelSpec:
  if isinstance(spec, models.ModelSpec):
    return spec
  try:
    return models.ModelSpec.from_dict(spec)
  except (TypeError, ValueError) as e:
    raise ModelDirError(f'{where}: {e}') from e


def abstract_variables(model: models.ResNet) -> dict:
  """The model's variable tree as ``jax.ShapeDtypeStruct`` leaves (nothing computed)."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  return jax.eval_shape(functools.partial(model.init, mode=models.TRAIN), key, x)


def _leaf_table(tree) -> dict:
  """{'params/conv1/kernel': (shape, dtype)} for a tree of arrays/ShapeDtypeStructs/metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
    out[name] = (tuple(leaf.shape), np.dtype(leaf.dtype))
  return out


def tree_differences(actual, expected) -> list:
  """Human-readable differences (by name) between two trees of shaped leaves."""
  a, e = _leaf_table(actual), _leaf_table(expected)
  lines = [f'missing {n} {e[n][0]}' for n in sorted(set(e) - set(a))]
  lines += [f'unexpected {n} {a[n][0]}' for n in sorted(set(a) - set(e))]
  lines += [
      f'mis-shaped {n}: has {a[n][0]} {a[n][1]}, expected {e[n][0]} {e[n][1]}'
      for n in sorted(set(a) & set(e)) if a[n] != e[n]
  ]
  return lines


def _json_default(obj):
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, (Path, os.PathLike)):
    return os.fspath(obj)
  if isinstance(obj, (set, frozenset)):
    return sorted(obj)
  return str(obj)


def check_class_names(names, num_classes: int) -> list:
  """``names`` as a list of strings, checked to hold one name per class."""
  if isinstance(names, str) or not all(isinstance(n, str) for n in names):
    raise ModelDirError('class names must be a list of strings.')
  names = list(names)
  if len(names) != num_classes:
    raise ModelDirError(f'{len(names)} class names for a model with {num_classes} classes.')
  return names


def save_model_dir(path, variables: Mapping, spec: models.ModelSpec,
                   metadata: Optional[Mapping[str,
                                              Any]] = None, *, overwrite: bool = False) -> Path:
  """Writes ``variables`` (Orbax, synchronously) and ``model.json`` to ``path``.

  Args:
    path: the directory; created if absent. A non-empty existing directory is refused
      unless ``overwrite`` (then only its ``model.json`` and ``variables/`` are replaced;
      other files in it are left alone).
    variables: the model's variable tree; checked against ``spec.build()``.
    spec: what the model is (a :class:`~twins_jax.models.ModelSpec`).
    metadata: JSON-serialisable information (non-JSON leaves are stored as strings).

  Returns:
    The directory's absolute path.
  """
  path = Path(path).absolute()
  spec = _spec(spec, f'save_model_dir({path})')
  diffs = tree_differences(variables, abstract_variables(spec.build()))
  if diffs:
    raise ModelDirError(f'variables do not fit {spec}:\n  ' + '\n  '.join(diffs))
  if (metadata or {}).get('class_names') is not None:
    check_class_names(metadata['class_names'], spec.num_classes)
  doc = {
      'format': FORMAT, 'version': VERSION, 'spec': spec.to_dict(), 'metadata': dict(metadata or {})
  }
  text = json.dumps(doc, indent=2, sort_keys=True, default=_json_default)

  if path.exists() and not path.is_dir():
    raise ModelDirError(f'{path} exists and is not a directory.')
  if path.is_dir() and any(path.iterdir()):
    if not overwrite:
      raise FileExistsError(f'{path} exists and is not empty; pass overwrite=True '
                            '(--overwrite) to replace the model in it.')
    if jax.process_index() == 0:
      (path / MODEL_JSON).unlink(missing_ok=True)
      shutil.rmtree(path / VARIABLES_DIR, ignore_errors=True)
  if jax.process_index() == 0:
    path.mkdir(parents=True, exist_ok=True)
  _barrier('twins_jax.save_model_dir.prepare')

  arrays = jax.tree.map(lambda a: jnp.asarray(a), dict(variables))
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(path / VARIABLES_DIR, arrays)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()
  if jax.process_index() == 0:  # every process wrote its share of the arrays above
    tmp = path / (MODEL_JSON + '.tmp')
    tmp.write_text(text + '\n')
    os.replace(tmp, path / MODEL_JSON)
  _barrier('twins_jax.save_model_dir.done')
  return path


def _barrier(name: str) -> None:
  """Waits for every process (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


RUN_MODELS = ('best_model', 'final_model')


def resolve_model_dir(path) -> Path:
  """The model directory that ``path`` names: a model directory (ported, or written by
  training), or a training workdir, whose ``best_model`` (best validation robust accuracy,
  when the run held out a validation split) or else ``final_model`` is used."""
  path = Path(path).expanduser()
  if not path.exists():
    raise ModelDirError(f'model directory {path} does not exist.')
  if (path / MODEL_JSON).is_file():
    return path
  for name in RUN_MODELS:
    if (path / name / MODEL_JSON).is_file():
      return path / name
  raise ModelDirError(
      f'{path} is neither a model directory (no {MODEL_JSON}) nor a training workdir with a '
      'best_model/ or final_model/; make one with `python -m twins_jax.port`, '
      'twins_jax.model_io.save_model_dir or main.py.')


def read_model_json(path) -> dict:
  """The parsed and checked ``model.json`` of a model directory; ``doc['spec']`` is a
  :class:`~twins_jax.models.ModelSpec`."""
  path = Path(path)
  if not path.exists():
    raise ModelDirError(f'model directory {path} does not exist.')
  if not path.is_dir():
    raise ModelDirError(f'{path} is not a directory (expected a model directory with '
                        f'{MODEL_JSON} and {VARIABLES_DIR}/).')
  mj = path / MODEL_JSON
  if not mj.is_file():
    raise ModelDirError(f'{path} is not a model directory: no {MODEL_JSON} '
                        '(incomplete write, or not made by save_model_dir / twins_jax.port).')
  try:
    doc = json.loads(mj.read_text())
  except (OSError, ValueError) as e:
    raise ModelDirError(f'{mj} is not valid JSON: {e}') from e
  if not isinstance(doc, dict) or doc.get('format') != FORMAT:
    raise ModelDirError(f'{mj} is not a twins_jax model description (format != {FORMAT!r}).')
  if doc.get('version') not in READABLE_VERSIONS:
    raise ModelDirError(f'{mj} has version {doc.get("version")!r}; this code reads '
                        f'{READABLE_VERSIONS}.')
  doc['spec'] = _spec(doc.pop('model_kwargs') if doc['version'] == 1 else doc.get('spec'), str(mj))
  doc.setdefault('metadata', {})
  return doc


def load_model_dir(path, *, dtype: Any = jnp.float32) -> Tuple[models.ResNet, dict, dict]:
  """Reads a model directory.

  Args:
    path: the directory written by :func:`save_model_dir`.
    dtype: computation dtype of the rebuilt model (variables stay float32).

  Returns:
    ``(model, variables, meta)`` where ``meta`` is the parsed ``model.json``:
    ``{'format', 'version', 'spec', 'metadata'}`` (``spec`` a ModelSpec).
  """
  path = Path(path).absolute()
  doc = read_model_json(path)
  model = doc['spec'].build(dtype=dtype)
  vdir = path / VARIABLES_DIR
  if not vdir.is_dir():
    raise ModelDirError(f'{path} has no {VARIABLES_DIR}/ checkpoint.')
  target = abstract_variables(model)
  checkpointer = ocp.StandardCheckpointer()
  try:
    try:
      saved = checkpointer.metadata(vdir).item_metadata
    except Exception as e:  # orbax raises various types for unreadable checkpoints
      raise ModelDirError(f'{vdir} is not a readable Orbax checkpoint: {e}') from e
    diffs = tree_differences(saved, target)
    if diffs:
      raise ModelDirError(
          f'{vdir} does not hold the variables of its model.json ({doc["spec"]}): {len(diffs)} '
          f'difference(s), first: {diffs[0]}; the directory is incomplete or corrupt, or '
          'model.json does not belong to it: write it again',
          details='\n'.join(['  ' + d for d in diffs]))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          target)
    try:
      variables = checkpointer.restore(vdir, target)
    except Exception as e:  # pylint: disable=broad-except  (TensorStore/Orbax raise many types)
      raise ModelDirError(f'the variables in {vdir} cannot be read: the directory is incomplete '
                          'or corrupt (an interrupted copy or save?); write it again '
                          f'(first error: {errors.one_line(e)[:200]})') from e
  finally:
    checkpointer.close()
  return model, variables, doc
