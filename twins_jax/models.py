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
import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from twins_jax import speed
from twins_jax.speed import CONV_IMPLS, matmul_conv

# BatchNorm modes. The first names the Frozen Net, the other three the Adaptive Net.
FROZEN = 'frozen'  # Frozen Net: pre-training statistics, never updated.
TRAIN = 'train'  # Adaptive Net, batch statistics, running statistics updated.
BATCH = 'batch'  # Adaptive Net, batch statistics, no update.
EVAL = 'eval'  # Adaptive Net, running statistics (the inference net).
# The EVAL net with every BN folded into the convolution before it (variables from
# :func:`fold_eval_bn`): each BN only adds its folded bias. Same function as EVAL.
FOLDED = 'folded'
MODES = (FROZEN, TRAIN, BATCH, EVAL, FOLDED)

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
          branch: (self.param(f'{branch}_scale', init_s, (c,),
                              f32), self.param(f'{branch}_bias', init_b, (c,),
                                               f32)) for branch in ('adaptive', 'frozen')
      }
      scale, bias = pairs['frozen' if mode == FROZEN else 'adaptive']
    else:
      scale = self.param('scale', init_s, (c,), f32)
      bias = self.param('bias', init_b, (c,), f32)

    if mode == FOLDED:  # scale and statistics live in the preceding convolution's kernel
      return (x.astype(f32) + bias).astype(self.dtype)
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
    bias = self.param('bias', functools.partial(torch_linear_init, fan_in=fan_in), (self.features,),
                      self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    return (y + bias.astype(self.dtype)).astype(self.param_dtype)


# torchvision's init for convolutions: kaiming normal, fan_out, relu gain.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class TorchConv(nn.Module):
  """A bias-free square convolution with PyTorch's symmetric ``kernel // 2`` padding.

  Its one parameter is ``kernel`` (HWIO), initialised like torchvision, exactly as
  ``nn.Conv`` would name, shape and initialise it.
  """
  features: int
  kernel: int
  stride: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x, upsample: int = 1):
    """``upsample``: convolve ``x`` nearest-upsampled by this integer factor (the
    ResNet's resize before its stem). With ``impl='auto'`` on CPU that is
    :func:`twins_jax.speed.upsampled_conv`, which never builds the upsampled image."""
    if self.impl not in CONV_IMPLS:
      raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {self.impl!r}.')
    k, s, p = self.kernel, self.stride, self.kernel // 2
    w = self.param('kernel', conv_init, (k, k, x.shape[-1], self.features), self.param_dtype)
    cpu_auto = self.impl == 'auto' and jax.default_backend() == 'cpu'
    if upsample > 1 and cpu_auto and speed.LEVERS['upsampled_stem']:
      return speed.upsampled_conv(x.astype(self.dtype), w, upsample, s, p)
    if upsample > 1:
      x = nearest_resize(x, x.shape[1] * upsample)
    x, w = x.astype(self.dtype), w.astype(self.dtype)
    if self.impl == 'matmul':
      return matmul_conv(x, w, s, p)
    if cpu_auto:
      out_h = (x.shape[1] + 2 * p - k) // s + 1
      out_w = (x.shape[2] + 2 * p - k) // s + 1
      return speed.conv(x, w, s, p, speed.conv_passes(k, out_h, out_w, self.features))
    return speed.lax_conv(x, w, s, p)


def torch_conv(features, kernel, stride=1, dtype=jnp.float32, name=None, param_dtype=jnp.float32,
               impl='auto'):
  """A bias-free convolution with PyTorch's symmetric ``kernel // 2`` padding."""
  return TorchConv(features, kernel, stride, dtype=dtype, param_dtype=param_dtype, impl=impl,
                   name=name)


class BasicBlock(nn.Module):
  planes: int
  stride: int = 1
  downsample: bool = False
  norm: Callable[..., nn.Module] = TwinBatchNorm
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = 'auto'
  expansion = 1

  @nn.compact
  def __call__(self, x, mode):
    conv = functools.partial(torch_conv, dtype=self.dtype, param_dtype=self.param_dtype,
                             impl=self.conv_impl)
    out = conv(self.planes, 3, self.stride, name='conv1')(x)
    out = nn.relu(self.norm(name='bn1')(out, mode))
    out = conv(self.planes, 3, 1, name='conv2')(out)
    out = self.norm(name='bn2')(out, mode)
    if self.downsample:
      x = conv(self.planes, 1, self.stride, name='downsample_0')(x)
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
  conv_impl: str = 'auto'
  expansion = 4

  @nn.compact
  def __call__(self, x, mode):
    conv = functools.partial(torch_conv, dtype=self.dtype, param_dtype=self.param_dtype,
                             impl=self.conv_impl)
    width = int(self.planes * (self.width_per_group / 64.0))
    out = conv(width, 1, 1, name='conv1')(x)
    out = nn.relu(self.norm(name='bn1')(out, mode))
    out = conv(width, 3, self.stride, name='conv2')(out)
    out = nn.relu(self.norm(name='bn2')(out, mode))
    out = conv(self.planes * 4, 1, 1, name='conv3')(out)
    out = self.norm(name='bn3')(out, mode)
    if self.downsample:
      x = conv(self.planes * 4, 1, self.stride, name='downsample_0')(x)
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
  conv_impl: str = 'auto'
  mean: Sequence[float] = IMAGENET_MEAN
  std: Sequence[float] = IMAGENET_STD

  @nn.compact
  def __call__(self, x: jax.Array, mode: str = EVAL) -> jax.Array:
    _check_mode(mode, self.twin)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'Expected NHWC images with 3 channels, got shape {x.shape}.')
    norm = functools.partial(TwinBatchNorm, twin=self.twin, share_affine=self.share_affine,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    # An integer upsampling factor is left to the stem (the normalisation is per pixel,
    # so it commutes with nearest upsampling): see TorchConv and speed.upsampled_conv.
    upsample = 1
    if self.resize is not None:
      h, w = x.shape[1:3]
      if h == w and self.resize % h == 0:
        upsample = self.resize // h
      else:
        x = nearest_resize(x, self.resize)
    x = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)
    x = x.astype(self.dtype)

    x = torch_conv(self.width, 7, 2, self.dtype, name='conv1', param_dtype=self.param_dtype,
                   impl=self.conv_impl)(x, upsample)
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
                      dtype=self.dtype, param_dtype=self.param_dtype, conv_impl=self.conv_impl,
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


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What a model is: everything needed to rebuild it, and what a model directory records.

  ``resize``: nearest upsampling to that size inside the model (None: none); ``twin``: a
  TWINS model (Frozen and Adaptive BN) or a plain one; ``share_affine``: one BN affine
  pair for both branches. How it computes (dtype, convolution implementation) is a
  run-time choice of :meth:`build`, not part of the spec.
  """
  arch: str
  num_classes: int
  resize: Optional[int] = None
  twin: bool = True
  share_affine: bool = False

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f'Unknown architecture {self.arch!r}; choose one of {sorted(ARCHS)}.')
    if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)) \
        or self.num_classes < 1:
      raise ValueError(f'num_classes must be a positive integer, got {self.num_classes!r}.')
    if self.resize is not None and (isinstance(self.resize, bool) or
                                    not isinstance(self.resize,
                                                   (int, np.integer)) or self.resize < 1):
      raise ValueError(f'resize must be None or a positive integer, got {self.resize!r}.')
    object.__setattr__(self, 'num_classes', int(self.num_classes))
    object.__setattr__(self, 'resize', None if self.resize is None else int(self.resize))
    object.__setattr__(self, 'twin', bool(self.twin))
    object.__setattr__(self, 'share_affine', bool(self.share_affine) and bool(self.twin))

  def build(self, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
            conv_impl: str = 'auto') -> 'ResNet':
    """The Flax module (``conv_impl``: see :data:`twins_jax.speed.CONV_IMPLS`)."""
    if conv_impl not in CONV_IMPLS:
      raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.')
    return ResNet(num_classes=self.num_classes, resize=self.resize, twin=self.twin,
                  share_affine=self.share_affine, dtype=dtype, param_dtype=param_dtype,
                  conv_impl=conv_impl, **ARCHS[self.arch])

  def replace(self, **changes) -> 'ModelSpec':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ModelSpec':
    """From :meth:`to_dict`'s output (or the ``model_kwargs`` of a version-1 model.json)."""
    if not isinstance(d, Mapping):
      raise ValueError(f'a model spec must be a dict, got {type(d).__name__}.')
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(fields))
    if unknown:
      raise ValueError(f'unknown model spec fields {unknown}; allowed: {fields}.')
    absent = [k for k in ('arch', 'num_classes') if k not in d]
    if absent:
      raise ValueError(f'a model spec needs {absent}.')
    return cls(**d)


def create_model(arch: str, num_classes: int, *, resize: Optional[int] = None, twin: bool = True,
                 share_affine: bool = False, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, conv_impl: str = 'auto') -> ResNet:
  """Builds one of :data:`ARCHS`: ``ModelSpec(arch, num_classes, ...).build(...)``."""
  return ModelSpec(arch, num_classes, resize, twin,
                   share_affine).build(dtype=dtype, param_dtype=param_dtype, conv_impl=conv_impl)


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
        return dict(adaptive_scale=scale, adaptive_bias=bias, frozen_scale=jnp.array(scale),
                    frozen_bias=jnp.array(bias))
      return dict(scale=scale, bias=bias)
    return tree

  out = {'params': relayout(dict(variables['params'])), 'batch_stats': variables['batch_stats']}
  if twin:
    out['frozen_stats'] = jax.tree.map(jnp.array, variables['batch_stats'])
  return out
