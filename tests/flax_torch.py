"""Test helpers: Flax variables <-> PyTorch state dicts of ``tests/torch_reference.py``,
and the norm-wise relative error the numerical tests compare with.

Written independently of :mod:`twins_jax.port` so that the parity tests of the
training step do not rest on the code the porting tests check.
"""

from __future__ import annotations

import jax
import numpy as np
import torch


def rel_err(a, b) -> float:
  """Norm-wise relative error of a tensor, ``||a - b|| / ||b||``, computed in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


_BN_PARAM = {'scale': 'weight', 'bias': 'bias'}
_BN_STAT = {'mean': 'running_mean', 'var': 'running_var'}
# Our Adaptive BN is the official MixBatchNorm2d itself ('bn1.weight'), our Frozen BN its
# FixBatchNorm2d 'main_bn' ('bn1.main_bn.weight'); torch_reference.TwinResNet.
_TWIN_BRANCH = {'adaptive': '', 'frozen': '.main_bn'}
_TWIN_STATS = {'batch_stats': '', 'frozen_stats': '.main_bn'}
# The official twin network's head is 'fc_downstream'; its 'fc' (the ImageNet head of
# forward_IN) is never used and has no counterpart in our variables.
TWIN_UNUSED = frozenset({'fc.weight', 'fc.bias'})


def _torch_module(path) -> str:
  """('layer1_0', 'downsample_1') -> 'layer1.0.downsample.1'."""
  parts = []
  for p in path:
    if p.startswith('layer') or p.startswith('downsample'):
      parts.extend(p.split('_'))
    else:
      parts.append(p)
  return '.'.join(parts)


def flax_to_torch(variables: dict, twin: bool) -> dict[str, torch.Tensor]:
  """The state dict a ``TorchResNet`` (``twin=False``) or the official twin ``TwinResNet``
  (``twin=True``) of ``tests/torch_reference.py`` needs to compute what ``variables`` do.

  Twin: ``adaptive_scale/adaptive_bias`` and ``batch_stats`` -> ``<bn>.weight/bias/
  running_mean/running_var``; ``frozen_scale/frozen_bias`` and ``frozen_stats`` ->
  ``<bn>.main_bn.*``; our head ``fc`` -> ``fc_downstream``.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    keys = [k.key for k in path]
    collection, name, module = keys[0], keys[-1], _torch_module(keys[1:-1])
    if twin and module == 'fc':
      module = 'fc_downstream'
    a = np.asarray(leaf)
    if collection == 'params' and name == 'kernel':
      a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
      out[f'{module}.weight'] = a
    elif collection == 'params' and module in ('fc', 'fc_downstream'):
      out[f'{module}.bias'] = a
    elif collection == 'params':
      branch, _, kind = name.rpartition('_')
      if twin and branch not in _TWIN_BRANCH:
        raise ValueError(f'twin BN parameter without a branch: {keys} (share_affine?)')
      suffix = _TWIN_BRANCH[branch] if twin else ''
      out[f'{module}{suffix}.{_BN_PARAM[kind]}'] = a
    else:
      suffix = _TWIN_STATS[collection] if twin else ''
      out[f'{module}{suffix}.{_BN_STAT[name]}'] = a
  return {k: torch.from_numpy(np.array(v)) for k, v in out.items()}


def load_into(torch_model: torch.nn.Module, variables: dict, twin: bool) -> None:
  """Loads ``variables`` into ``torch_model``; every tensor but the BN batch counters (and,
  for a twin network, the unused ``fc`` head) must be covered."""
  state = flax_to_torch(variables, twin)
  missing, unexpected = torch_model.load_state_dict(state, strict=False)
  missing = [
      m for m in missing
      if not m.endswith('num_batches_tracked') and not (twin and m in TWIN_UNUSED)
  ]
  assert not missing and not unexpected, (missing, unexpected)


def randomize_bn(variables: dict, seed: int) -> dict:
  """Non-trivial BN affine and statistics, different in the two branches."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name.endswith('scale'):
      return rng.uniform(0.5, 1.5, shape).astype(leaf.dtype)
    if name == 'var':
      return rng.uniform(0.5, 2.0, shape).astype(leaf.dtype)
    if name == 'mean' or (name.endswith('bias') and path[-2].key != 'fc'):
      return rng.uniform(-0.5, 0.5, shape).astype(leaf.dtype)
    return np.asarray(leaf)

  return jax.tree_util.tree_map_with_path(fill, variables)
