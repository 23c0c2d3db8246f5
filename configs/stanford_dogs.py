"""TWINS-AT fine-tuning of the robust ResNet-50 on Stanford Dogs (tfds stanford_dogs, 12,000 train images).

  python main.py --config=configs/stanford_dogs.py --workdir=runs/stanford_dogs_twins_at \
      --config.pretrained=resnet50_linf_eps4.0.ckpt --config.data_dir=~/tensorflow_datasets

Cost: 60 epochs of PGD-10 + update at 224x224, about 135 GFLOP per training image
(twins-reference.md section 4): a few GPU-hours per 1,000 training images.
"""

from configs import high_res


def get_config():
  c = high_res.get_config()
  c.dataset = 'stanford_dogs'
  return c
