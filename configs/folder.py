"""TWINS-AT fine-tuning on any image-folder dataset (e.g. Caltech-256 split into train/test).

  python main.py --config=configs/folder.py --workdir=runs/caltech256_twins_at \
      --config.pretrained=resnet50_linf_eps4.0.ckpt \
      --config.folder_train=/data/caltech256/train --config.folder_test=/data/caltech256/test

Each folder holds one subfolder of images per class (same class names in both).
Cost: about 135 GFLOP per training image per epoch (60 epochs).
"""

from configs import high_res


def get_config():
  c = high_res.get_config()
  c.dataset = 'folder'
  return c
