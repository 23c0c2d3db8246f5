"""Export a model directory's inference network to PyTorch: a torchvision ResNet state dict.

CLI (``twins-jax-export`` once the package is installed)::

    python -m twins_jax.export MODEL_DIR OUT.safetensors [--overwrite]
    python -m twins_jax.export MODEL_DIR OUT.pt [--overwrite]

``MODEL_DIR`` is a model directory or a training workdir (its ``best_model``, else its
``final_model``). What is written is the network that prediction and evaluation run, the
Adaptive Net in eval mode: every BatchNorm gets the Adaptive affine pair
(``adaptive_scale``/``adaptive_bias``, or the one shared or plain ``scale``/``bias``) and the
running statistics of ``batch_stats``; the Frozen branch (``frozen_*``, ``frozen_stats``) is
left out. Names are torchvision's (``conv1.weight``, ``bn1.running_mean``,
``layer1.0.downsample.1.weight``, ``fc.bias``, ...), convolution weights OIHW, ``fc.weight``
(out, in), all float32, plus a ``num_batches_tracked`` (int64 0) per BatchNorm, so the keys
are exactly those of ``torchvision.models.resnet50(num_classes=C).state_dict()`` (or the
model's architecture) and ``load_state_dict`` takes it strictly.

``.safetensors`` needs the ``safetensors`` package (written from numpy, torch is not
needed) and carries the input contract below in its metadata; ``.pt`` needs ``torch``
(``torch.save`` of the plain state dict).

The exported network does *not* contain the input pipeline our model runs inside its
forward. A PyTorch user feeds ``x``, N x 3 x H x W float RGB in [0, 1], as::

    x = F.interpolate(x, size=(R, R), mode='nearest')   # only if the model has resize R
    x = (x - mean[None, :, None, None]) / std[None, :, None, None]  # ImageNet mean, std
    logits = net.eval()(x)

with ``mean = (0.485, 0.456, 0.406)`` and ``std = (0.229, 0.224, 0.225)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import jax
import numpy as np

from twins_jax import errors, model_io, models, port

FORMATS = ('.safetensors', '.pt', '.pth')


def torch_state_dict(variables, spec: models.ModelSpec) -> Dict[str, np.ndarray]:
  """The Adaptive (eval-mode) network of ``variables`` as a torchvision-named state dict of
  numpy arrays."""
  out: Dict[str, np.ndarray] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    keys = [str(getattr(k, 'key', k)) for k in path]
    collection, leaf_name = keys[0], keys[-1]
    if collection == 'frozen_stats' or leaf_name.startswith('frozen_'):
      continue  # the Frozen branch is for training only
    if collection not in ('params', 'batch_stats'):
      raise errors.CheckpointError(f'unexpected variable collection {collection!r}.')
    flax_path = '/'.join(keys)
    name = port.flax_to_torch_name(flax_path)
    a = np.asarray(leaf, np.float32)
    if leaf_name == 'kernel':
      a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T  # HWIO -> OIHW, (in, out) -> (out, in)
    if name in out or not port.torch_to_flax(name, twin=spec.twin, share_affine=spec.share_affine):
      raise AssertionError(f'{flax_path} -> {name}: not a unique torchvision name')
    out[name] = np.ascontiguousarray(a)
  for name in [n for n in out if n.endswith('.running_mean')]:
    out[name[:-len('running_mean')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return out


def input_contract(spec: models.ModelSpec) -> dict:
  """What a PyTorch user must do to the images before the exported network."""
  steps = []
  if spec.resize:
    steps.append(f"x = torch.nn.functional.interpolate(x, size=({spec.resize}, {spec.resize}), "
                 "mode='nearest')")
  steps.append('x = (x - mean[None, :, None, None]) / std[None, :, None, None]')
  return {
      'input': 'N x 3 x H x W float RGB in [0, 1]',
      'resize': spec.resize,
      'mean': list(models.IMAGENET_MEAN),
      'std': list(models.IMAGENET_STD),
      'preprocess': steps,
  }


def _torchvision_constructor(spec: models.ModelSpec) -> str:
  if spec.arch == 'tiny_resnet':
    return 'none (tiny_resnet is a test network: torchvision BasicBlock layout, width 8)'
  return f'torchvision.models.{spec.arch}(num_classes={spec.num_classes})'


def export(model_dir, out, *, overwrite: bool = False) -> Path:
  """Writes the model directory's inference network to ``out`` (``.safetensors`` or ``.pt``);
  returns its path. See the module docstring for the layout and the input contract."""
  out = Path(out)
  ext = out.suffix.lower()
  if ext not in FORMATS:
    raise errors.UserError(f'{out}: write a .safetensors or a .pt file.')
  if out.exists() and not overwrite:
    raise errors.UserError(f'{out} exists; pass --overwrite (overwrite=True) to replace it.')
  if not out.parent.is_dir():
    raise errors.UserError(f'the directory of {out} ({out.parent}) does not exist.')
  writer = _safetensors_writer() if ext == '.safetensors' else _torch_writer()
  try:
    path = model_io.resolve_model_dir(model_dir)
    _, variables, meta = model_io.load_model_dir(path)
  except model_io.ModelDirError as e:
    raise errors.CheckpointError(str(e)) from None
  spec = meta['spec']
  tensors = torch_state_dict(variables, spec)
  info = {
      'format': 'pt',  # safetensors' convention: PyTorch tensors
      'exported_by': 'twins_jax.export',
      'source': str(path),
      'network': 'Adaptive Net, eval mode (affine + batch_stats running statistics)',
      'arch': spec.arch,
      'num_classes': str(spec.num_classes),
      'torchvision': _torchvision_constructor(spec),
      'input_contract': json.dumps(input_contract(spec)),
  }
  class_names = meta['metadata'].get('class_names')
  if class_names:
    info['class_names'] = json.dumps(class_names)
  tmp = out.with_name(out.name + '.tmp')
  writer(tensors, tmp, info)
  os.replace(tmp, out)
  return out


def _safetensors_writer():
  try:
    from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.UserError("writing .safetensors needs the safetensors package: pip install "
                           "safetensors (or pip install 'twins-jax[port]').") from None

  def write(tensors, path, info):
    # Through Python's open(): safetensors' own save_file creates files readable by the
    # owner only.
    Path(path).write_bytes(save(tensors, metadata=info))

  return write


def _torch_writer():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.UserError('writing .pt needs PyTorch: pip install torch (or write a '
                           '.safetensors file, which does not).') from None

  def write(tensors, path, info):
    del info  # a plain state dict, for load_state_dict(torch.load(path))
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, str(path))

  return write


def _parser() -> argparse.ArgumentParser:
  p = errors.cli_parser(
      'twins-jax-export', 'twins_jax.export',
      'Write the inference network (Adaptive Net, eval mode) of a model directory '
      'as a torchvision-named PyTorch ResNet state dict.')
  p.add_argument('model_dir', help='model directory (from twins_jax.port or training) or a '
                 'training workdir')
  p.add_argument('out', help='OUT.safetensors (needs safetensors) or OUT.pt (needs torch)')
  p.add_argument('--overwrite', action='store_true', help='replace OUT if it exists')
  return p


def _run(args) -> int:
  out = export(args.model_dir, args.out, overwrite=args.overwrite)
  spec = model_io.read_model_json(model_io.resolve_model_dir(args.model_dir))['spec']
  contract = input_contract(spec)
  print(f'wrote {out}: {spec.arch}, {spec.num_classes} classes, the Adaptive Net (eval mode), '
        'torchvision names.')
  print('In PyTorch, with x N x 3 x H x W RGB in [0, 1], mean = '
        f'{tuple(contract["mean"])} and std = {tuple(contract["std"])}:')
  for line in contract['preprocess'] + ['logits = net.eval()(x)']:
    print(f'  {line}')
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  return errors.run_cli(lambda: _run(args), argv)


if __name__ == '__main__':
  sys.exit(main())
