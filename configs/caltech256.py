"""TWINS-AT fine-tuning on Caltech-256 with the reference's split and settings.

Once, split the extracted 256_ObjectCategories folder (the first 60 images of each of the
257 classes for training, the rest for testing, as the robustness library does):

  python -m twins_jax.prepare caltech256 256_ObjectCategories data/caltech256

then train (TWINS_high_res_data/train.sh: lr 0.003, weight decay 1e-3, lambda 0.4):

  python main.py --config=configs/caltech256.py --workdir=runs/caltech256_twins_at \
      --config.pretrained=resnet50_linf_eps4.0.ckpt

Cost: 15,420 training images x 60 epochs at 224x224, about 135 GFLOP per image per epoch.
"""

from configs import high_res


def get_config():
  c = high_res.get_config()
  c.dataset = 'folder'
  c.folder_train = 'data/caltech256/train'
  c.folder_test = 'data/caltech256/test'
  return c
