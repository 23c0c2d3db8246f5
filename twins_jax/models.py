"""torchvision-layout ResNets in Flax whose every BatchNorm is a TWINS twin.

Layout and names follow torchvision (``conv1``, ``bn1``, ``layer1_0/conv1``,
``layer1_0/downsample_0``, ``fc``) so a PyTorch state dict maps onto the variable
tree almost one to one (see :mod:`twins_jax.port`). Convolutions use PyTorch's
explicit symmetric padding, never ``'SAME'``.

Variables of a twin model:

* ``params``: convolution and ``fc`` weights (shared by both nets) and, per BN,
  ``adaptive_scale/adaptive_bias`` and ``frozen_scale/frozen_bias`` (or a single
  ``scale/bias`` pair with ``share_affine=True``, or for a plain ``twin=False`` net);
* ``batch_stats``: the Adaptive Net's running ``mean``/``var`` (PyTorch momentum 0.1,
  running variance updated with the unbiased batch variance, exactly like PyTorch);
* ``frozen_stats``: the Frozen Net's pre-training ``mean``/``var``. The model only ever
  reads this collection; no training code passes it as mutable, so Flax refuses any
  write to it.

Every forward names its branch and BatchNorm mode with ``mode`` (see :data:`MODES`).
Images enter in [0, 1], NHWC; the optional nearest resize (PyTorch's
``F.interpolate(mode='nearest')`` indexing) and the mean/std normalisation happen
inside the model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# BatchNorm modes. The first names the Frozen Net, the other three the Adaptive Net.
FROZEN = 'frozen'  # Frozen Net: pre-training statistics, never updated.
TRAIN = 'train'  # Adaptive Net, batch statistics, running statistics updated.
BATCH = 'batch'  # Adaptive Net, batch statistics, no update.
EVAL = 'eval'  # Adaptive Net, running statistics (the inference net).
MODES = (FROZEN, TRAIN, BATCH, EVAL)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_mode(mode: str, twin: bool) -> None:
  if mode not in MODES:
    raise ValueError(f'Unknown BatchNorm mode {mode!r}; expected one of {MODES}.')
  if mode == FROZEN and not twin:
    raise ValueError("mode='frozen' needs a twin model (twin=True).")


class TwinBatchNorm(nn.Module):
  """BatchNorm with a Frozen and an Adaptive branch (TWINS, CVPR 2023).

  Attributes:
    twin: if False this is an ordinary BatchNorm (the Adaptive branch alone).
    share_affine: one scale/bias pair for both branches instead of one per branch
      (the reference trains a separate pair per branch, the default here).
    momentum: PyTorch convention: ``running = (1 - momentum) * running + momentum * batch``.
    epsilon: added to the variance.
    dtype: dtype of the output; statistics are computed in ``param_dtype`` (float32
      unless a test asks for float64).
    param_dtype: dtype of the affine parameters and the statistics.
  """
  twin: bool = True
  share_affine: bool = False
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mode: str) -> jax.Array:
    _check_mode(mode, self.twin)
    c = x.shape[-1]
    f32 = self.param_dtype
    zeros = lambda: jnp.zeros((c,), f32)
    ones = lambda: jnp.ones((c,), f32)
    running_mean = self.variable('batch_stats', 'mean', zeros)
    running_var = self.variable('batch_stats', 'var', ones)
    if self.twin:
      frozen_mean = self.variable('frozen_stats', 'mean', zeros)
      frozen_var = self.variable('frozen_stats', 'var', ones)

    init_s, init_b = nn.initializers.ones, nn.initializers.zeros
    if self.twin and not self.share_affine:
      pairs = {
          branch: (self.param(f'{branch}_scale', init_s, (c,), f32),
                   self.param(f'{branch}_bias', init_b, (c,), f32))
          for branch in ('adaptive', 'frozen')
      }
      scale, bias = pairs['frozen' if mode == FROZEN else 'adaptive']
    else:
      scale = self.param('scale', init_s, (c,), f32)
      bias = self.param('bias', init_b, (c,), f32)

    x32 = x.astype(f32)
    if mode == FROZEN:
      mean, var = frozen_mean.value, frozen_var.value
    elif mode == EVAL:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axes)
      # Two-pass variance: as precise as PyTorch's (Flax's fast variance is not).
      var = jnp.mean(jnp.square(x32 - mean), axes)
      if mode == TRAIN and not self.is_initializing():
        n = x.size // c
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        running_mean.value = (1 - m) * running_mean.value + m * mean
        running_var.value = (1 - m) * running_var.value + m * unbiased
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x32 * mul + (bias - mean * mul)).astype(self.dtype)


def torch_linear_init(key, shape, dtype=jnp.float32, fan_in=None):
  """PyTorch's default ``nn.Linear`` init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  fan_in = shape[0] if fan_in is None else fan_in
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class TorchDense(nn.Module):
  """A Dense layer initialised like PyTorch's ``nn.Linear`` (kernel and bias)."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param('kernel', torch_linear_init, (fan_in, self.features), self.param_dtype)
    bias = self.param('bias', functools.partial(torch_linear_init, fan_in=fan_in),
                      (self.features,), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    return (y + bias.astype(self.dtype)).astype(self.param_dtype)


# torchvision's init for convolutions: kaiming normal, fan_out, relu gain.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def torch_conv(features, kernel, stride=1, dtype=jnp.float32, name=None,
               param_dtype=jnp.float32):
  """A bias-free convolution with PyTorch's symmetric ``kernel // 2`` padding."""
  p = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((p, p), (p, p)), use_bias=False, kernel_init=conv_init,
                 dtype=dtype, param_dtype=param_dtype, name=name)


class BasicBlock(nn.Module):
  planes: int
  stride: int = 1
  downsample: bool = False
  norm: Callable[..., nn.Module] = TwinBatchNorm
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, mode):
    out = torch_conv(self.planes, 3, self.stride, self.dtype, name='conv1', param_dtype=self.param_dtype)(x)
    out = nn.relu(self.norm(name='bn1')(out, mode))
    out = torch_conv(self.planes, 3, 1, self.dtype, name='conv2', param_dtype=self.param_dtype)(out)
    out = self.norm(name='bn2')(out, mode)
    if self.downsample:
      x = torch_conv(self.planes, 1, self.stride, self.dtype, name='downsample_0', param_dtype=self.param_dtype)(x)
      x = self.norm(name='downsample_1')(x, mode)
    return nn.relu(out + x)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5: the stride sits on the 3x3 convolution)."""
  planes: int
  stride: int = 1
  downsample: bool = False
  width_per_group: int = 64
  norm: Callable[..., nn.Module] = TwinBatchNorm
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, mode):
    width = int(self.planes * (self.width_per_group / 64.0))
    out = torch_conv(width, 1, 1, self.dtype, name='conv1', param_dtype=self.param_dtype)(x)
    out = nn.relu(self.norm(name='bn1')(out, mode))
    out = torch_conv(width, 3, self.stride, self.dtype, name='conv2', param_dtype=self.param_dtype)(out)
    out = nn.relu(self.norm(name='bn2')(out, mode))
    out = torch_conv(self.planes * 4, 1, 1, self.dtype, name='conv3', param_dtype=self.param_dtype)(out)
    out = self.norm(name='bn3')(out, mode)
    if self.downsample:
      x = torch_conv(self.planes * 4, 1, self.stride, self.dtype, name='downsample_0', param_dtype=self.param_dtype)(x)
      x = self.norm(name='downsample_1')(x, mode)
    return nn.relu(out + x)


def nearest_resize(x: jax.Array, size: int) -> jax.Array:
  """PyTorch's ``F.interpolate(x, size, mode='nearest')`` for NHWC images.

  Source index ``floor(dst * in / out)``; an integer upsampling factor becomes a
  cheap ``repeat``.
  """
  _, h, w, _ = x.shape
  if (h, w) == (size, size):
    return x
  for axis, n in ((1, h), (2, w)):
    if size % n == 0:
      x = jnp.repeat(x, size // n, axis=axis)
    else:
      idx = np.minimum(np.floor(np.arange(size) * (n / size)).astype(np.int32), n - 1)
      x = jnp.take(x, idx, axis=axis)
  return x


class ResNet(nn.Module):
  """A torchvision-layout ResNet with twin BatchNorms.

  Call as ``model.apply(variables, images, mode=...)`` with images NHWC in [0, 1].
  """
  block: str  # 'basic' or 'bottleneck'
  layers: Sequence[int]
  num_classes: int
  width: int = 64
  width_per_group: int = 64
  resize: Optional[int] = None
  twin: bool = True
  share_affine: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  mean: Sequence[float] = IMAGENET_MEAN
  std: Sequence[float] = IMAGENET_STD

  @nn.compact
  def __call__(self, x: jax.Array, mode: str = EVAL) -> jax.Array:
    _check_mode(mode, self.twin)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'Expected NHWC images with 3 channels, got shape {x.shape}.')
    norm = functools.partial(TwinBatchNorm, twin=self.twin, share_affine=self.share_affine,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    if self.resize is not None:
      x = nearest_resize(x, self.resize)
    x = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)
    x = x.astype(self.dtype)

    x = torch_conv(self.width, 7, 2, self.dtype, name='conv1', param_dtype=self.param_dtype)(x)
    x = nn.relu(norm(name='bn1')(x, mode))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    if self.block == 'basic':
      block_cls, expansion = BasicBlock, 1
    elif self.block == 'bottleneck':
      block_cls = functools.partial(Bottleneck, width_per_group=self.width_per_group)
      expansion = 4
    else:
      raise ValueError(f"Unknown block {self.block!r}; expected 'basic' or 'bottleneck'.")
    in_planes = self.width
    for i, n_blocks in enumerate(self.layers):
      planes = self.width * 2**i
      for j in range(n_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        downsample = j == 0 and (stride != 1 or in_planes != planes * expansion)
        x = block_cls(planes=planes, stride=stride, downsample=downsample, norm=norm,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f'layer{i + 1}_{j}')(x, mode)
        in_planes = planes * expansion
    x = jnp.mean(x.astype(self.param_dtype), axis=(1, 2))
    return TorchDense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      name='fc')(x)


ARCHS = {
    'resnet18': dict(block='basic', layers=(2, 2, 2, 2)),
    'resnet34': dict(block='basic', layers=(3, 4, 6, 3)),
    'resnet50': dict(block='bottleneck', layers=(3, 4, 6, 3)),
    'resnet101': dict(block='bottleneck', layers=(3, 4, 23, 3)),
    'wide_resnet50_2': dict(block='bottleneck', layers=(3, 4, 6, 3), width_per_group=128),
    # Test-only: torchvision's layout at 1/8 of the width, one block per stage.
    'tiny_resnet': dict(block='basic', layers=(1, 1, 1, 1), width=8),
}


def create_model(arch: str, num_classes: int, *, resize: Optional[int] = None,
                 twin: bool = True, share_affine: bool = False,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> ResNet:
  """Builds one of :data:`ARCHS`."""
  if arch not in ARCHS:
    raise ValueError(f'Unknown architecture {arch!r}; choose one of {sorted(ARCHS)}.')
  if num_classes < 1:
    raise ValueError(f'num_classes must be positive, got {num_classes}.')
  return ResNet(num_classes=num_classes, resize=resize, twin=twin,
                share_affine=share_affine, dtype=dtype, param_dtype=param_dtype, **ARCHS[arch])


def init_variables(model: ResNet, seed: int | jax.Array = 0, image_size: int = 32) -> dict:
  """Fresh variables (params, batch_stats and, for a twin model, frozen_stats).

  An integer seed draws from the ``rbg`` generator: on CPU, XLA compiles threefry's
  per-shape hash for dozens of parameter shapes about six times slower (~35 s against
  ~6 s for the tiny test ResNet). Pass a key to choose the generator yourself.
  """
  key = jax.random.key(seed, impl='rbg') if isinstance(seed, int) else seed
  x = jnp.zeros((1, image_size, image_size, 3), model.param_dtype)
  return jax.jit(functools.partial(model.init, mode=TRAIN))(key, x)


def convert_variables(variables: dict, *, twin: bool, share_affine: bool = False) -> dict:
  """Re-lays out pre-trained variables for a twin or a plain model.

  For a twin model, both branches start from the source's (Adaptive, or only) BN:
  ``frozen_stats`` is a copy of ``batch_stats`` and the Frozen affine pair a copy of
  the Adaptive one, which is what porting a PyTorch checkpoint does. For a plain
  model the Adaptive branch is kept. Use it to fine-tune a model pre-trained here.
  """
  def relayout(tree):
    if not isinstance(tree, dict):
      return tree
    tree = {k: relayout(v) for k, v in tree.items()}
    if 'scale' in tree or 'adaptive_scale' in tree:
      scale = tree.get('adaptive_scale', tree.get('scale'))
      bias = tree.get('adaptive_bias', tree.get('bias'))
      if twin and not share_affine:
        return dict(adaptive_scale=scale, adaptive_bias=bias,
                    frozen_scale=jnp.array(scale), frozen_bias=jnp.array(bias))
      return dict(scale=scale, bias=bias)
    return tree

  out = {'params': relayout(dict(variables['params'])),
         'batch_stats': variables['batch_stats']}
  if twin:
    out['frozen_stats'] = jax.tree.map(jnp.array, variables['batch_stats'])
  return out
