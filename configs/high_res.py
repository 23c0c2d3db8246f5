"""Shared settings of the high-resolution presets (twins-reference.md section 3).

Resize 256 + RandomResizedCrop 224 + flip for training, Resize 256 + CenterCrop 224 for
testing; lambda 0.4; weight decay 1e-3; no upsampling inside the model.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.resize = 0
  c.augment = 'imagenet'
  c.image_size = 224
  c.lambda_twins = 0.4
  c.weight_decay = 1e-3
  return c
