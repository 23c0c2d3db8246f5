"""Helpers shared by the benchmark scripts (import after XLA_FLAGS is set)."""

from __future__ import annotations

import collections
import re


def step_parser(doc: str, resize: str = '224', batch: int = 4):
  """An argument parser (described by ``doc``'s first line) with the options that pick the
  TWINS step a per-step benchmark runs (ab_step, profile_step)."""
  import argparse
  parser = argparse.ArgumentParser(description=doc.split('\n')[0])
  parser.add_argument('--arch', default='resnet50')
  parser.add_argument('--resize', default=resize, help="'none' (32x32 inputs) or a size")
  parser.add_argument('--batch', type=int, default=batch)
  parser.add_argument('--method', default='twins_at', choices=('twins_at', 'twins_trades'))
  parser.add_argument('--attack-steps', type=int, default=10)
  return parser


def xla_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled executable, from XLA's cost analysis.

  XLA counts a multiply-add as 2 FLOPs and the body of a loop (``while``, e.g. the
  PGD ``fori_loop``) once, whatever its trip count. Returns None when the backend
  gives no estimate.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pragma: no cover - backend without cost analysis
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def fusion_kinds(compiled) -> dict:
  """How many convolutions/dots the compiled program runs in which library.

  Counts ``__ynn_fusion``/``__xnn_fusion``/``__onednn...`` custom fusions and the
  convolutions and dots left to XLA's own emitters (Eigen), in the entry and in loop
  bodies alike.
  """
  text = compiled.as_text()
  kinds = collections.Counter(re.findall(r'"kind":"(__[a-z_]+)"', text))
  kinds.update('onednn:' + m for m in re.findall(r'custom_call_target="(__onednn\$[a-z_]+)"', text))
  # Convolutions and dots outside library fusions: a fused computation's body holds the
  # library's op too, so count only ops whose computation is not a library fusion body.
  lib_bodies = set(re.findall(r'calls=%([\w.\-]+), [^\n]*"kind":"__', text))
  current, plain = None, collections.Counter()
  for line in text.splitlines():
    m = re.match(r'^(?:ENTRY )?%?([\w.\-]+) ', line)
    if m and line.rstrip().endswith('{'):
      current = m.group(1)
      continue
    if current in lib_bodies:
      continue
    if re.search(r'= [a-z0-9]+\[[^\]]*\][^ ]* convolution\(', line):
      plain['eigen_convolution'] += 1
    elif re.search(r'= [a-z0-9]+\[[^\]]*\][^ ]* dot\(', line):
      plain['eigen_dot'] += 1
  kinds.update(plain)
  return dict(kinds)


def analytic_forward_flops(arch: str, num_classes: int, image_size: int,
                           resize: int | None) -> float:
  """FLOPs of one forward of one image through ``models.ARCHS[arch]``: 2 per multiply-add
  of every convolution (the whole kernel at every output position, padding included,
  the usual convention) and of the final linear layer; BN, ReLU and pooling not counted.
  """
  from twins_jax import models
  spec = {'width': 64, 'width_per_group': 64, **models.ARCHS[arch]}
  size = resize or image_size
  width, expansion = spec['width'], 1 if spec['block'] == 'basic' else 4
  out = lambda s, k, stride: (s + 2 * (k // 2) - k) // stride + 1
  flops = 0

  def conv(s, cin, cout, k, stride):
    nonlocal flops
    so = out(s, k, stride)
    flops += 2 * so * so * cin * cout * k * k
    return so

  s = conv(size, 3, width, 7, 2)
  s = (s + 2 - 3) // 2 + 1  # max pool 3x3, stride 2, padding 1
  cin = width
  for i, n in enumerate(spec['layers']):
    planes = width * 2**i
    for j in range(n):
      stride = 2 if (i > 0 and j == 0) else 1
      if spec['block'] == 'basic':
        s2 = conv(s, cin, planes, 3, stride)
        conv(s2, planes, planes, 3, 1)
      else:
        mid = int(planes * spec['width_per_group'] / 64)
        conv(s, cin, mid, 1, 1)
        s2 = conv(s, mid, mid, 3, stride)
        conv(s2, mid, planes * expansion, 1, 1)
      if j == 0 and (stride != 1 or cin != planes * expansion):
        conv(s, cin, planes * expansion, 1, stride)
      cin, s = planes * expansion, s2
  flops += 2 * cin * num_classes
  return float(flops)
