"""twins_jax.export: a model directory back to PyTorch. A plain torchvision-layout ResNet
(``tests/torch_reference.py``) that loads the exported state dict computes our eval-mode
(Adaptive Net) logits."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('safetensors')

sys.path.insert(0, os.path.dirname(__file__))
import torch_reference as tr  # noqa: E402
from flax_torch import randomize_bn  # noqa: E402

import jax  # noqa: E402

from twins_jax import errors, export, model_io, models, port  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
NUM_CLASSES = 5


def trained_like_model_dir(path, spec, seed=0):
  """A model directory whose two BN branches differ (as after TWINS training): a PyTorch
  tiny_resnet ported, then every BN's affine and statistics redrawn per branch."""
  torch.manual_seed(seed)
  m = tr.tiny_resnet(spec.num_classes)
  tr.randomize_bn_(m, torch.Generator().manual_seed(seed + 1))
  sd = {k: v.numpy() for k, v in m.state_dict().items()}
  variables, _ = port.port_checkpoint(sd, spec)
  variables = randomize_bn(jax.device_get(variables), seed + 2)
  model_io.save_model_dir(path, variables, spec, {'class_names': list('abcde')})
  return spec.build(), variables


def load_exported(path):
  if str(path).endswith('.safetensors'):
    from safetensors.torch import load_file
    return load_file(str(path))
  return torch.load(str(path), weights_only=True)


@pytest.mark.parametrize('twin,resize', [(True, 48), (False, None)])
def test_export_roundtrip_to_pytorch(tmp_path, twin, resize):
  spec = models.ModelSpec('tiny_resnet', NUM_CLASSES, resize=resize, twin=twin)
  model, variables = trained_like_model_dir(tmp_path / 'model', spec)
  x = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
  ours = np.asarray(model.apply(variables, x, mode=models.EVAL))
  if twin:  # the branches differ, so matching the eval logits shows which one was exported
    frozen = np.asarray(model.apply(variables, x, mode=models.FROZEN))
    assert np.abs(frozen - ours).max() > 0.1
  for ext in ('.safetensors', '.pt'):
    out = export.export(tmp_path / 'model', tmp_path / f'net{ext}')
    (tmp_path / 'plain.txt').write_text('')  # the permissions of an ordinary new file
    assert out.stat().st_mode & 0o777 == (tmp_path / 'plain.txt').stat().st_mode & 0o777
    state = load_exported(out)
    net = tr.tiny_resnet(NUM_CLASSES, resize)  # resize + ImageNet normalisation in forward
    assert set(state) == set(net.state_dict())  # torchvision's keys, num_batches_tracked too
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
      theirs = net.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    err = float(np.abs(theirs - ours).max())
    print(f'export {ext} twin={twin} resize={resize}: max-abs {err:.3g} '
          f'(|logits| <= {np.abs(ours).max():.3g})')
    assert err < TOL, (ext, err)

  # The input contract, in the safetensors metadata.
  from safetensors import safe_open
  with safe_open(str(tmp_path / 'net.safetensors'), 'np') as f:
    meta = f.metadata()
  contract = json.loads(meta['input_contract'])
  assert contract['resize'] == resize and contract['mean'] == list(models.IMAGENET_MEAN)
  assert contract['std'] == list(models.IMAGENET_STD)
  assert ('interpolate' in contract['preprocess'][0]) == bool(resize)
  assert meta['format'] == 'pt' and json.loads(meta['class_names']) == list('abcde')


def test_export_matches_torchvision_names_for_resnet50():
  spec = models.ModelSpec('resnet50', 7, twin=True)
  abstract = model_io.abstract_variables(spec.build())
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  state = export.torch_state_dict(variables, spec)
  want = tr.resnet50(7).state_dict()
  assert set(state) == set(want)
  for k, v in want.items():
    assert state[k].shape == tuple(v.shape), k


def test_export_command_line_and_errors(tmp_path):
  spec = models.ModelSpec('tiny_resnet', NUM_CLASSES)
  trained_like_model_dir(tmp_path / 'run' / 'final_model', spec)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)

  def cli(*args):
    return subprocess.run([sys.executable, '-m', 'twins_jax.export', *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)

  r = cli(tmp_path / 'run', tmp_path / 'net.safetensors')  # a workdir: its final_model
  assert r.returncode == 0, r.stderr
  assert 'Adaptive Net' in r.stdout and 'x = (x - mean' in r.stdout
  assert 'interpolate' not in r.stdout  # no resize in this model
  r = cli(tmp_path / 'run', tmp_path / 'net.safetensors')
  assert r.returncode == errors.EXIT_USER_ERROR and '--overwrite' in r.stderr
  assert r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr
  for args, msg in (((tmp_path / 'run', tmp_path / 'net.onnx'), '.safetensors or a .pt'),
                    ((tmp_path / 'nowhere', tmp_path / 'x.pt'), 'does not exist')):
    with pytest.raises(errors.UserError, match=msg):
      export.export(*args)
