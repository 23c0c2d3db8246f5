"""The presets reproduce the official scripts' settings, and Caltech-256 gets the official split.

Every expected value below is read off the authors' code (repository
``ziquanliu/CVPR2023-TWINS``) at the file and line given; ``docs/fidelity.md`` has the whole
table, with the deviations and why.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from twins_jax import data, prepare, setup

# (config key, official value, where) shared by every preset: the step and the protocol.
COMMON = [
    ('batch_size', 128, 'AT_cifar/src/argument.py:31 (-b default 128)'),
    ('num_epochs', 60, 'TWINS_cifar/train.sh:6 (-m_e 60)'),
    ('lr', 0.003, 'TWINS_cifar/train.sh:3 (lr=0.003)'),
    ('momentum', 0.9, 'AT_cifar/src/argument.py:37'),
    ('lr_milestones', (30, 50), 'TWINS_cifar/train-TWINS-AT.py:59-61 (iter_per_epoch*30, *50)'),
    ('lr_gamma', 0.1, 'TWINS_cifar/train-TWINS-AT.py:61'),
    ('eps', 0.0314, 'TWINS_cifar/train.sh:6 (-e 0.0314)'),
    ('alpha', 0.00784, 'AT_cifar/src/argument.py:26 (-a default 0.00784)'),
    ('attack_steps', 10, 'AT_cifar/src/argument.py:28 (-k default 10)'),
    ('norm', 'Linf', "TWINS_cifar/train.sh:6 (-p 'linf')"),
    ('random_start', True, "TWINS_cifar/train-TWINS-AT.py:86 (perturb(..., 'mean', True))"),
    ('attack_loss', 'ce', 'AT_high_res_data/src/attack/fast_gradient_sign_untargeted.py:96'),
    ('beta', 6.0, 'AT_cifar/src/argument.py:48 (beta_trades 6.0)'),
    ('eval_attack_steps', 10, 'TWINS_cifar/train-TWINS-AT.py:222-225 (the same attack)'),
    ('eval_random_start', False, 'TWINS_cifar/train-TWINS-AT.py:222-225 (random_start False)'),
    ('val_fraction', 0.0, 'TWINS_cifar/train-TWINS-AT.py:337-342 (all 50,000 images)'),
    ('last_batch', 'partial', 'TWINS_cifar/train-TWINS-AT.py:342 (DataLoader, drop_last False)'),
    ('share_affine', False, 'TWINS_high_res_data/robustness/imagenet_models/resnet.py:126-128'),
    ('method', 'twins_at', 'TWINS_cifar/train-TWINS-AT.py'),
]
CIFAR = [
    ('weight_decay', 1e-5, 'TWINS_cifar/train.sh:4 (wd=0.00001)'),
    ('lambda_twins', 1.0, 'TWINS_cifar/train.sh:5 (lambda_twins=1.0)'),
    ('resize', 224, 'AT_cifar/robustness/attacker.py:319 (F.interpolate(inp, 224))'),
    ('augment', '', "'' = the CIFAR augmentation, TWINS_cifar/train-TWINS-AT.py:331-335"),
]
HIGH_RES = [
    ('weight_decay', 1e-3, 'TWINS_high_res_data/train.sh:4 (wd=0.001)'),
    ('lambda_twins', 0.4, 'TWINS_high_res_data/train.sh:5 (lambda_twins=0.4)'),
    ('resize', 0, 'TWINS_high_res_data/robustness/attacker.py:319 (no interpolate)'),
    ('augment', 'imagenet', 'TWINS_high_res_data/train-TWINS-AT.py:332-347'),
    ('image_size', 224, 'TWINS_high_res_data/train-TWINS-AT.py:334 and 344'),
]
PRESETS = {
    'cifar10': CIFAR, 'cifar100': CIFAR, 'cub200': HIGH_RES, 'stanford_dogs': HIGH_RES,
    'dtd': HIGH_RES, 'folder': HIGH_RES, 'caltech256': HIGH_RES
}


@pytest.mark.parametrize('preset', sorted(PRESETS))
def test_preset_matches_the_official_settings(preset):
  config = importlib.import_module(f'configs.{preset}').get_config()
  for key, official, where in COMMON + PRESETS[preset]:
    value = config[key]
    value = tuple(value) if isinstance(value, (list, tuple)) else value
    assert value == official, f'{preset}: config.{key}={value!r}, official {official!r} ({where})'
  setup.check_config(config)


def test_high_res_augmentation_is_the_official_one():
  """Resize 256 then RandomResizedCrop 224 and a flip for training; Resize 256 and
  CenterCrop 224 for testing (TWINS_high_res_data/train-TWINS-AT.py:332-347)."""
  config = importlib.import_module('configs.high_res').get_config()
  assert data.default_resize_size(config.image_size) == 256
  image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
  test = data.transform(image, train=False, augment='imagenet', image_size=224)
  resized = data.resize_shorter_side(image, 256)  # 256 x 341
  assert resized.shape[:2] == (256, 341)
  np.testing.assert_array_equal(test, data.center_crop(resized, 224) / np.float32(255))


def _synthetic_caltech(root: Path, sizes: dict[str, int]) -> Path:
  rng = np.random.default_rng(0)
  for name, n in sizes.items():
    (root / name).mkdir(parents=True)
    prefix = name.split('.')[0]
    for i in range(n, 0, -1):  # written in reverse: the split must sort by name
      pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / name / f'{prefix}_{i:04d}.jpg')
    (root / name / 'notes.txt').write_text('not an image')
  return root


def test_caltech256_split_and_preset(tmp_path, capsys):
  src = _synthetic_caltech(tmp_path / '256_ObjectCategories',
                           {'001.ak47': 62, '002.american-flag': 61, '257.clutter': 65})
  dst = tmp_path / 'caltech256'
  assert prepare.main(['caltech256', str(src), str(dst)]) == 0
  out = capsys.readouterr()
  assert '3 classes: 180 training images' in out.out and '8 test images' in out.out
  assert 'Caltech-256 has 257' in out.err  # a warning: this is not the real dataset
  for name, n in (('001.ak47', 62), ('002.american-flag', 61), ('257.clutter', 65)):
    prefix = name.split('.')[0]
    train_files = sorted(p.name for p in (dst / 'train' / name).iterdir())
    test_files = sorted(p.name for p in (dst / 'test' / name).iterdir())
    assert train_files == [f'{prefix}_{i:04d}.jpg' for i in range(1, 61)]
    assert test_files == [f'{prefix}_{i:04d}.jpg' for i in range(61, n + 1)]
    link = dst / 'test' / name / test_files[0]
    assert link.is_symlink() and link.resolve() == (src / name / test_files[0]).resolve()

  # The preset reads the two folders.
  config = importlib.import_module('configs.caltech256').get_config()
  config.folder_train, config.folder_test = str(dst / 'train'), str(dst / 'test')
  config.image_size = 16
  ds = data.build_datasets(setup.data_config(config))
  assert (ds.num_classes, len(ds.train), len(ds.test), ds.val) == (3, 180, 8, None)
  plan = ds.train_plan(config.batch_size)
  assert plan.steps_per_epoch == math.ceil(180 / 128)
  (batch,) = list(ds.train_batches(plan, start_step=1, num_steps=1))
  assert batch['image'].shape == (52, 16, 16, 3)

  # A second run refuses to overwrite, with one line; so does a class without test images.
  assert prepare.main(['caltech256', str(src), str(dst)]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'not empty' in err and err.count('\n') == 1
  assert prepare.main(['split', str(src), str(tmp_path / 'x'), '--train-per-class', '61']) == 2
  assert 'no test images' in capsys.readouterr().err
  assert not (tmp_path / 'x').exists()
