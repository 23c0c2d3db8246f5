"""Speed layers: other ways of computing the same function, faster on some hardware.

* :func:`matmul_conv`: a convolution as one 2-D matrix product over patches. XLA:CPU runs
  1x1 and small-map convolutions (and their gradients) much slower than the equivalent
  matrix products, which is what ResNets on 32x32 inputs consist of. ``conv_impl='auto'``
  (:data:`CONV_IMPLS`, :func:`use_matmul_conv`) picks it on CPU where it is faster.
* :func:`fold_eval_bn`: the Adaptive Net in eval mode with every BatchNorm folded into the
  convolution before it (``mode='folded'``), one multiply less per activation.

Same functions as :mod:`twins_jax.models` computes without them, summed in another order;
BENCHMARKS.md has what each changes.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

# How convolutions are computed: 'xla' (lax.conv), 'matmul' (matmul_conv) or 'auto':
# on CPU the matrix product where XLA:CPU's convolution is slow (1x1 kernels, small
# output maps; see use_matmul_conv and BENCHMARKS.md), lax.conv elsewhere and on
# every other backend. The same function either way; only the rounding differs.
CONV_IMPLS = ('auto', 'xla', 'matmul')

# The levers of conv_impl='auto' on CPU beyond the matrix products, all on. Benchmarks
# switch them off (``with levers(upsampled_stem=False): ...`` around the tracing) to
# measure what each changes; read when a model is traced.
LEVERS = dict(
    hwio_input_grad=True,  # 3x3/7x7 input gradients with an explicit HWIO kernel
    upsampled_stem=True,  # the stem after an integer nearest upsampling: upsampled_conv
)


@contextlib.contextmanager
def levers(**settings):
  """Sets :data:`LEVERS` inside the ``with`` block (for benchmarks)."""
  unknown = set(settings) - set(LEVERS)
  if unknown:
    raise ValueError(f'Unknown levers {sorted(unknown)}; known: {sorted(LEVERS)}.')
  old = dict(LEVERS)
  LEVERS.update(settings)
  try:
    yield
  finally:
    LEVERS.update(old)


def use_matmul_conv(kernel: int, out_h: int, out_w: int, out_channels: int) -> bool:
  """The CPU rule of ``conv_impl='auto'`` (measured with bench/conv_ops.py)."""
  area = out_h * out_w
  return kernel == 1 or area <= 16 or (area <= 64 and out_channels >= 256)


def _useful_taps(size: int, k: int, stride: int, pad: int, out: int) -> list[int]:
  """Kernel offsets along one axis that read at least one real (non-padding) input."""
  return [i for i in range(k) if any(pad <= o * stride + i < pad + size for o in range(out))]


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


def lax_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """``lax.conv`` as the models use it: NHWC, HWIO, symmetric padding."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def hwio_input_grad(g: jax.Array, kernel: jax.Array, in_hw: tuple[int, int], stride: int,
                    pad: int) -> jax.Array:
  """The input gradient of :func:`lax_conv`, as a convolution whose kernel is materialised
  in HWIO order.

  It is the transposed convolution JAX's own rule builds (``g`` dilated by the stride,
  convolved with the spatially flipped kernel, input and output channels swapped), but
  JAX leaves the swap to the convolution's dimension numbers (``01oi``), and XLA:CPU
  runs a convolution with an ``01oi`` kernel through a slow generic path: inside the PGD
  loop that made every 3x3 input gradient 4-6x slower than its forward. Here the flipped,
  swapped kernel is a real HWIO array (an ``optimization_barrier`` keeps XLA from folding
  the transpose back into the dimension numbers), so XLA hands the convolution to its
  fast library. Same function; the kernel costs one copy.
  """
  kh, kw = kernel.shape[:2]
  flipped = jax.lax.optimization_barrier(jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
  padding = [(k - 1 - pad, size - 1 - (out - 1) * stride + pad)
             for k, size, out in zip((kh, kw), in_hw, g.shape[1:3])]
  return jax.lax.conv_general_dilated(g, flipped, (1, 1), padding, lhs_dilation=(stride, stride),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


# The implementations of each pass of a convolution (see conv):
PASS_IMPLS = dict(
    fwd=('xla', 'matmul'),  # lax.conv, or matmul_conv
    dx=('xla', 'hwio', 'matmul'),  # JAX's transpose of lax.conv, hwio_input_grad, or matmul_conv's
    dw=('xla', 'matmul'),  # JAX's transpose of lax.conv, or of matmul_conv
)


def _forward(impl, x, kernel, stride, pad):
  return (matmul_conv if impl == 'matmul' else lax_conv)(x, kernel, stride, pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, stride, pad, impls):
  return _forward(impls[0], x, kernel, stride, pad)


def _conv_fwd(x, kernel, stride, pad, impls):
  return _forward(impls[0], x, kernel, stride, pad), (x, kernel)


def _conv_bwd(stride, pad, impls, res, g):
  x, kernel = res
  _, dx_impl, dw_impl = impls
  if dx_impl == 'hwio':
    dx = hwio_input_grad(g, kernel, x.shape[1:3], stride, pad)
  else:
    dx = jax.vjp(lambda x: _forward(dx_impl, x, kernel, stride, pad), x)[1](g)[0]
  dw = jax.vjp(lambda k: _forward(dw_impl, x, k, stride, pad), kernel)[1](g)[0]
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int,
         impls: tuple[str, str, str] = ('xla', 'hwio', 'xla')) -> jax.Array:
  """:func:`lax_conv` whose forward, input gradient and weight gradient are each computed
  by the implementation ``impls`` names (:data:`PASS_IMPLS`; :func:`conv_passes` is the
  CPU rule of ``conv_impl='auto'``). Every choice is the same function, summed in
  another order. A ``custom_vjp``: reverse-mode only.
  """
  impls = tuple(impls)
  for name, impl in zip(PASS_IMPLS, impls):
    if impl not in PASS_IMPLS[name]:
      raise ValueError(f'{name} implementation must be one of {PASS_IMPLS[name]}, got {impl!r}.')
  if impls == ('matmul',) * 3:
    return matmul_conv(x, kernel, stride, pad)
  if impls == ('xla',) * 3:
    return lax_conv(x, kernel, stride, pad)
  return _conv(x, kernel, stride, pad, impls)


def conv_passes(kernel: int, out_h: int, out_w: int, out_channels: int) -> tuple[str, str, str]:
  """The CPU rule of ``conv_impl='auto'``: the implementation of each pass (see conv)."""
  if use_matmul_conv(kernel, out_h, out_w, out_channels):
    return ('matmul', 'matmul', 'matmul')
  return ('xla', 'hwio' if LEVERS['hwio_input_grad'] else 'xla', 'xla')


def _upsample_taps(size: int, factor: int, k: int, stride: int, pad: int):
  """For :func:`upsampled_conv`, along one axis: the output phase period P, the source
  stride S, the source padding (lo, hi), the blocks A and the 0/1 matrix M[b, t, r] (output
  phase b, source tap t, kernel tap r), or None when nothing is gained."""
  g = math.gcd(stride, factor)
  period, src_stride = factor // g, stride // g
  out = (size * factor + 2 * pad - k) // stride + 1
  # Upsampled row of output i = period * a + b, kernel tap r: stride * i - pad + r; its
  # source row is floor(that / factor) = src_stride * a + offset[b, r].
  offset = np.array([[(stride * b - pad + r) // factor for r in range(k)] for b in range(period)])
  lo, top = int(offset.min()), int(offset.max())
  taps = top - lo + 1
  blocks = -(-out // period)
  onehot = (offset[:, None, :] - lo == np.arange(taps)[None, :, None]).astype(np.float32)
  pad_hi = (blocks - 1) * src_stride + top - (size - 1)
  return period, src_stride, (-lo, pad_hi), blocks, out, onehot


def upsampled_conv(x: jax.Array, kernel: jax.Array, factor: int, stride: int,
                   pad: int) -> jax.Array:
  """``lax_conv(nearest_upsample(x, factor), kernel, stride, pad)`` without upsampling.

  With an integer factor f, output row i of the convolution reads upsampled rows
  ``stride * i - pad + r`` (r < k), i.e. source rows ``floor((stride * i - pad + r) / f)``;
  these depend on i only through its phase ``b = i mod P`` (``P = f / gcd(stride, f)``)
  and a shift of ``stride / gcd`` source rows per period. So each output phase is a
  convolution of the *source* image with a small kernel whose taps are sums of the
  original taps that read the same source pixel, and the P x P phases are one
  convolution with P*P times the output channels, interleaved afterwards (depth to
  space). Zero padding maps to zero padding. The same function, summed in another order.
  The ResNet stem at 224 from 32x32 (f=7, 7x7, stride 2, pad 3) becomes a 4x4,
  stride-2 convolution of the 32x32 image with 49 * 64 outputs, as one matrix product:
  a third of the multiply-adds, and the input gradient lands on the 32x32 image directly.
  """
  n, h, w, cin = x.shape
  kh, kw, _, cout = kernel.shape
  ph, sh, pad_h, ah, oh, mh = _upsample_taps(h, factor, kh, stride, pad)
  pw, sw, pad_w, aw, ow, mw = _upsample_taps(w, factor, kw, stride, pad)
  if sh != sw or ph != pw:
    raise ValueError('upsampled_conv needs the same phase structure along both axes.')
  # W_eff[t, u, cin, (b, c, cout)] = sum_{r, s} M_h[b, t, r] M_w[c, u, s] W[r, s, cin, cout],
  # summed in at least float32 (a bfloat16 model still sums its taps in float32).
  acc = jnp.promote_types(kernel.dtype, jnp.float32)
  mh, mw = jnp.asarray(mh, acc), jnp.asarray(mw, acc)
  eff = jnp.einsum('btr,cus,rsio->tuibco', mh, mw, kernel.astype(acc), precision='highest')
  eff = eff.reshape(mh.shape[1], mw.shape[1], cin, ph * pw * cout).astype(x.dtype)
  xp = jnp.pad(x, ((0, 0), (max(pad_h[0], 0), max(pad_h[1], 0)),
                   (max(pad_w[0], 0), max(pad_w[1], 0)), (0, 0)))
  xp = xp[:,
          max(-pad_h[0], 0):xp.shape[1] - max(-pad_h[1], 0),
          max(-pad_w[0], 0):xp.shape[2] - max(-pad_w[1], 0)]
  y = matmul_conv(xp, eff, sh, 0)  # (n, ah, aw, ph * pw * cout)
  y = y.reshape(n, ah, aw, ph, pw, cout).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(n, ah * ph, aw * pw, cout)[:, :oh, :ow]


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
