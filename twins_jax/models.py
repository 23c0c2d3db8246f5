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
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
          branch: (self.param(f'{branch}_scale', init_s, (c,), f32),
                   self.param(f'{branch}_bias', init_b, (c,), f32))
          for branch in ('adaptive', 'frozen')
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
    bias = self.param('bias', functools.partial(torch_linear_init, fan_in=fan_in),
                      (self.features,), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    return (y + bias.astype(self.dtype)).astype(self.param_dtype)


def _useful_taps(size: int, k: int, stride: int, pad: int, out: int) -> list[int]:
  """Kernel offsets along one axis that read at least one real (non-padding) input."""
  return [i for i in range(k)
          if any(pad <= o * stride + i < pad + size for o in range(out))]


def matmul_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """``lax.conv`` (NHWC, HWIO, symmetric padding) as one matrix product with patches.

  The patches are strided slices of the padded input concatenated along channels;
  kernel offsets that only ever read padding are skipped (a 3x3 convolution on a 1x1
  map is a 1x1 convolution). Same function as the convolution, summed in a different
  order. XLA:CPU runs small-map convolutions (and their gradients) much slower than
  the equivalent matrix products, which is what ResNets on 32x32 inputs consist of.
  """
  kh, kw, cin, cout = kernel.shape
  n, h, w, _ = x.shape
  ho = (h + 2 * pad - kh) // stride + 1
  wo = (w + 2 * pad - kw) // stride + 1
  rows = _useful_taps(h, kh, stride, pad, ho)
  cols = _useful_taps(w, kw, stride, pad, wo)
  if pad:
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
  patches = [x[:, i:i + span_h:stride, j:j + span_w:stride, :] for i in rows for j in cols]
  patches = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
  if len(rows) < kh or len(cols) < kw:
    kernel = kernel[np.asarray(rows)][:, np.asarray(cols)]
  # A 2-D product, so that both gradients are 2-D products too (XLA:CPU hands those to
  # its fast matmul library; dots contracting several axes go to a slower path).
  y = jnp.dot(patches.reshape(-1, patches.shape[-1]), kernel.reshape(-1, cout))
  return y.reshape(n, ho, wo, cout)


# torchvision's init for convolutions: kaiming normal, fan_out, relu gain.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


# How convolutions are computed: 'xla' (lax.conv), 'matmul' (matmul_conv) or 'auto':
# on CPU the matrix product where XLA:CPU's convolution is slow (1x1 kernels, small
# output maps; see use_matmul_conv and BENCHMARKS.md), lax.conv elsewhere and on
# every other backend. The same function either way; only the rounding differs.
CONV_IMPLS = ('auto', 'xla', 'matmul')


def use_matmul_conv(kernel: int, out_h: int, out_w: int, out_channels: int) -> bool:
  """The CPU rule of ``conv_impl='auto'`` (measured with bench/conv_ops.py)."""
  area = out_h * out_w
  return kernel == 1 or area <= 16 or (area <= 64 and out_channels >= 256)


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
  def __call__(self, x):
    if self.impl not in CONV_IMPLS:
      raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {self.impl!r}.')
    k, s, p = self.kernel, self.stride, self.kernel // 2
    w = self.param('kernel', conv_init, (k, k, x.shape[-1], self.features), self.param_dtype)
    x, w = x.astype(self.dtype), w.astype(self.dtype)
    impl = self.impl
    if impl == 'auto':
      impl = 'xla'
      if jax.default_backend() == 'cpu':
        out_h = (x.shape[1] + 2 * p - k) // s + 1
        out_w = (x.shape[2] + 2 * p - k) // s + 1
        impl = 'matmul' if use_matmul_conv(k, out_h, out_w, self.features) else 'xla'
    if impl == 'matmul':
      return matmul_conv(x, w, s, p)
    return jax.lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def torch_conv(features, kernel, stride=1, dtype=jnp.float32, name=None,
               param_dtype=jnp.float32, impl='auto'):
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
    if self.resize is not None:
      x = nearest_resize(x, self.resize)
    x = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)
    x = x.astype(self.dtype)

    x = torch_conv(self.width, 7, 2, self.dtype, name='conv1', param_dtype=self.param_dtype,
                   impl=self.conv_impl)(x)
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
                      conv_impl=self.conv_impl, name=f'layer{i + 1}_{j}')(x, mode)
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
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 conv_impl: str = 'auto') -> ResNet:
  """Builds one of :data:`ARCHS` (``conv_impl``: see :data:`CONV_IMPLS`)."""
  if arch not in ARCHS:
    raise ValueError(f'Unknown architecture {arch!r}; choose one of {sorted(ARCHS)}.')
  if num_classes < 1:
    raise ValueError(f'num_classes must be positive, got {num_classes}.')
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.')
  return ResNet(num_classes=num_classes, resize=resize, twin=twin,
                share_affine=share_affine, dtype=dtype, param_dtype=param_dtype,
                conv_impl=conv_impl, **ARCHS[arch])


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


def _folded_conv_name(bn_name: str) -> Optional[str]:
  """The convolution a BN of the torchvision layout follows: ``bnK`` -> ``convK``,
  ``downsample_1`` -> ``downsample_0``."""
  if bn_name.startswith('bn'):
    return 'conv' + bn_name[2:]
  if bn_name == 'downsample_1':
    return 'downsample_0'
  return None


def fold_eval_bn(variables: dict, epsilon: float = 1e-5) -> dict:
  """Variables of the ``mode='folded'`` net: the EVAL net with each BN folded into its conv.

  The Adaptive Net in eval mode computes ``conv(x, W) * m + (b - mean * m)`` per BN,
  ``m = scale / sqrt(var + eps)`` (running statistics). Folded, the kernel becomes
  ``W * m`` (per output channel) and the BN adds ``b - mean * m``: one multiply less
  per activation, forward and backward. Only the ``params`` differ (the Adaptive
  affine pair, or the single pair of a plain net, holds the folded bias); pass the
  result to ``model.apply(..., mode='folded')``. A pure function of the variables, so
  it can run inside a jitted step (cost: one pass over the convolution weights).
  """
  stats = variables['batch_stats']

  def fold(params, stats):
    out = dict(params)
    for name, sub in params.items():
      if not isinstance(sub, Mapping):
        continue
      if 'adaptive_scale' in sub or 'scale' in sub:
        conv = _folded_conv_name(name)
        if conv is None or conv not in params:
          raise ValueError(f'Cannot fold BN {name!r}: no convolution {conv!r} before it.')
        prefix = 'adaptive_' if 'adaptive_scale' in sub else ''
        scale, bias = sub[prefix + 'scale'], sub[prefix + 'bias']
        mean, var = stats[name]['mean'], stats[name]['var']
        mul = scale * jax.lax.rsqrt(var + epsilon)
        new_bn = dict(sub)
        new_bn[prefix + 'bias'] = bias - mean * mul
        out[name] = new_bn
        kernel = params[conv]['kernel']
        out[conv] = dict(params[conv], kernel=(kernel * mul.astype(kernel.dtype)))
      elif 'kernel' not in sub:  # a block: recurse (a kernel is handled with its BN)
        out[name] = fold(sub, stats[name]) if name in stats else sub
    return out

  return dict(variables, params=fold(variables['params'], stats))
