"""TWINS-AT fine-tuning of the robust ResNet-50 on CIFAR-100 (the reference settings).

  python main.py --config=configs/cifar100.py --workdir=runs/cifar100_twins_at \
      --config.pretrained=resnet50_linf_eps4.0.ckpt --config.data_dir=~/tensorflow_datasets

Cost: as CIFAR-10 (60 epochs at 224x224, ~4e17 FLOP).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset = 'cifar100'
  return c
