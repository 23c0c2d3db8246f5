"""TWINS-AT fine-tuning of the robust ResNet-50 on CIFAR-10 (the reference settings).

  python main.py --config=configs/cifar10.py --workdir=runs/cifar10_twins_at \
      --config.pretrained=resnet50_linf_eps4.0.ckpt --config.data_dir=~/tensorflow_datasets

Cost: 60 epochs x 371 steps of PGD-10 + update at 224x224 (~4e17 FLOP): roughly two
GPU-days on one A100-class GPU in fp32. Use --config.method=twins_trades for TWINS-TRADES.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset = 'cifar10'
  return c
