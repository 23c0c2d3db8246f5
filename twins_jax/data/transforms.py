"""The reference's (torchvision's) image transforms, as numpy/PIL functions and grain transforms.

``uint8`` HxWx3 in, ``float32`` (image_size)x(image_size)x3 in [0, 1] out (like
torchvision's ``ToTensor``). ``augment``:

* ``'cifar'``: train: zero-pad 4 pixels on each side, random crop back to the image size,
  then horizontal flip with probability 1/2 (``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip()``); test: none.
* ``'imagenet'``: train: resize the shorter side to ``resize_size`` (bilinear with
  antialiasing, like torchvision on PIL images), ``RandomResizedCrop(image_size)`` (scale
  (0.08, 1), ratio (3/4, 4/3), 10 tries then torchvision's central fallback), horizontal
  flip; test: resize the shorter side to ``resize_size``, center crop ``image_size``.
* ``'none'``: no augmentation (images whose size is not ``image_size`` are resized to it).

Random draws for one training example, in order, from the generator the pipeline gives it
(:func:`example_rng`): ``'cifar'``: top offset ``integers(0, 2 * pad + 1)``, left offset
``integers(0, 2 * pad + 1)``, flip ``random() < 0.5``; ``'imagenet'``: up to 10 tries of
(``uniform(*scale)``, ``uniform(log ratio_min, log ratio_max)``, and on success
``integers(0, H - h + 1)``, ``integers(0, W - w + 1)``), then flip ``random() < 0.5``.

:class:`TrainTransform` (a ``grain.transforms.RandomMap``) and :class:`EvalTransform` (a
``grain.transforms.Map``) apply them to ``(image, label)`` records in any grain pipeline.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import grain
import numpy as np

from twins_jax.data.sources import to_rgb

AUGMENTATIONS = ('cifar', 'imagenet', 'none')
CIFAR_PAD = 4
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_TAG_AUGMENT = 0x6175  # keeps the augmentation stream apart from the others


def example_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
  """The generator for every random draw of the example at ``position`` of ``epoch``."""
  return np.random.default_rng([_TAG_AUGMENT, int(seed), int(epoch), int(position)])


def default_resize_size(image_size: int) -> int:
  """256 for 224, in proportion otherwise."""
  return int(round(image_size * 256 / 224))


def _pil_image(image: np.ndarray):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return Image.fromarray(np.ascontiguousarray(image))


def _resize_pil(pil, height: int, width: int):
  """Bilinear (antialiased) resize of a PIL image, as torchvision does for PIL images."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if pil.size == (width, height):
    return pil
  return pil.resize((width, height), Image.BILINEAR)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear (antialiased) resize of a uint8 array."""
  if image.shape[0] == height and image.shape[1] == width:
    return image
  return np.asarray(_resize_pil(_pil_image(image), height, width), np.uint8)


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """torchvision ``Resize(size)``'s output (height, width): the shorter side becomes ``size``,
  the longer one ``int(size * long / short)``."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision ``Resize(size)`` (bilinear) of a uint8 array."""
  return resize(image, *shorter_side_size(image.shape[0], image.shape[1], size))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision ``CenterCrop(size)`` (zero-pads first if the image is smaller)."""
  h, w = image.shape[:2]
  if h < size or w < size:
    ph, pw = max(size - h, 0), max(size - w, 0)
    image = np.pad(image, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
    h, w = image.shape[:2]
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def random_resized_crop_params(height: int, width: int, rng: np.random.Generator,
                               scale: tuple[float, float] = RRC_SCALE,
                               ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
  """torchvision ``RandomResizedCrop.get_params``: (top, left, h, w)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def cifar_crop_flip(image: np.ndarray, rng: np.random.Generator,
                    pad: int = CIFAR_PAD) -> np.ndarray:
  """``RandomCrop(size, padding=pad)`` with zero padding, then a horizontal flip w.p. 1/2."""
  h, w = image.shape[:2]
  top = int(rng.integers(0, 2 * pad + 1))
  left = int(rng.integers(0, 2 * pad + 1))
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  out = padded[top:top + h, left:left + w]
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def transform(image: np.ndarray, *, train: bool, augment: str, image_size: int,
              resize_size: Optional[int] = None,
              rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """One example: ``uint8`` HxWx3 -> ``float32`` (image_size)x(image_size)x3 in [0, 1]."""
  if augment not in AUGMENTATIONS:
    raise ValueError(f'unknown augment {augment!r}; valid: {AUGMENTATIONS}')
  image = to_rgb(image)
  if augment == 'imagenet':
    # Kept as a PIL image until the end (flips and copies of PIL images are cheap).
    from PIL import Image  # pylint: disable=g-import-not-at-top
    resize_size = resize_size or default_resize_size(image_size)
    height, width = shorter_side_size(image.shape[0], image.shape[1], resize_size)
    pil = _resize_pil(_pil_image(image), height, width)
    if train:
      top, left, h, w = random_resized_crop_params(height, width, rng)
      pil = _resize_pil(pil.crop((left, top, left + w, top + h)), image_size, image_size)
      if rng.random() < 0.5:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
      image = np.asarray(pil, np.uint8)
    elif height >= image_size and width >= image_size:
      top = int(round((height - image_size) / 2.0))
      left = int(round((width - image_size) / 2.0))
      image = np.asarray(pil.crop((left, top, left + image_size, top + image_size)), np.uint8)
    else:
      image = center_crop(np.asarray(pil, np.uint8), image_size)
  else:
    image = resize(image, image_size, image_size)
    if train and augment == 'cifar':
      image = cifar_crop_flip(image, rng)
  return image.astype(np.float32) / np.float32(255.0)  # like torchvision ToTensor


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
  """The training transform of ``augment`` on an ``(image, label)`` record."""
  augment: str
  image_size: int
  resize_size: Optional[int] = None

  def random_map(self, element, rng: np.random.Generator):
    image, label = element
    return transform(image, train=True, augment=self.augment, image_size=self.image_size,
                     resize_size=self.resize_size, rng=rng), label


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
  """The test transform of ``augment`` on an ``(image, label)`` record."""
  augment: str
  image_size: int
  resize_size: Optional[int] = None

  def map(self, element):
    image, label = element
    return transform(image, train=False, augment=self.augment, image_size=self.image_size,
                     resize_size=self.resize_size), label
