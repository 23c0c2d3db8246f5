"""The offline demo (the README's first command): no network, under 5 minutes on 2 CPU cores.

  python main.py --config=configs/demo.py --workdir=runs/demo

Adversarially pre-trains a small ResNet once on scikit-learn's handwritten digits 0-4,
fine-tunes it on digits 5-9 with TWINS-AT and with the AT baseline (3 seeds each), and
prints and writes (runs/demo/results.md) mean and standard deviation of clean and PGD test
accuracy per method, and a figure of the two methods' effective learning rates
(runs/demo/effective_lr.png).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.mode = 'demo'
  c.arch = 'tiny_resnet'
  c.resize = 0
  c.dataset = 'digits'
  c.image_size = 32  # 8x8 digits upsampled (nearest) to 32x32
  c.source_classes = (0, 1, 2, 3, 4)
  c.target_classes = (5, 6, 7, 8, 9)
  c.source_epochs = 12
  c.source_lr = 0.1
  c.target_epochs = 8
  c.seeds = (0, 1, 2)
  c.num_epochs = 8
  c.lr = 0.01
  c.lr_milestones = (6,)
  c.weight_decay = 5e-4
  c.batch_size = 64
  c.eval_batch_size = 256
  c.eps = 16 / 255
  c.alpha = 4 / 255
  c.attack_steps = 5
  c.eval_attack_steps = 10
  c.log_every_steps = 10
  return c
