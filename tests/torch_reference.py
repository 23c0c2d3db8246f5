"""Plain-PyTorch reference of the authors' TWINS code, for the JAX parity tests.

Rebuilt line by line from the official repository ``ziquanliu/CVPR2023-TWINS`` (saved
read-only under ``/work/official``; nothing is copied from it, every line here is ours).
Each semantic line carries a comment naming the official file and line(s) it mirrors;
paths are relative to the repository root, e.g. ``TWINS_cifar/train-TWINS-TRADES.py:93``,
or shortened to a line number alone (the file named just above), or to:

* ``AT resnet.py``: ``AT_high_res_data/robustness/imagenet_models/resnet.py``
* ``TWINS resnet.py``: ``TWINS_high_res_data/robustness/imagenet_models/resnet.py``
* ``fast_gradient_sign_untargeted.py``: in ``AT_high_res_data/src/attack/``
* ``attacker.py``: in ``AT_cifar/robustness/``; ``model_utils.py``: in
  ``TWINS_cifar/robustness/``; ``argument.py``: in ``AT_cifar/src/``
* ``train-TWINS-AT.py``, ``train-TWINS-TRADES.py``: in ``TWINS_cifar/``; ``train-AT.py``,
  ``train-TRADES.py``: in ``AT_cifar/``

Every place where this file must differ from the official code to run or to be tested is
marked ``# DEVIATION:`` with the reason.  No torchvision (it does not import here).

Public API
----------
Networks (NCHW images in [0, 1]; the resize + normalisation of the official
``AttackerModel`` runs inside ``forward``):

* ``TorchResNet``: the plain ResNet of ``AT_high_res_data/robustness/imagenet_models/
  resnet.py`` (the AT / TRADES baselines) with torchvision's state_dict keys; factories
  ``resnet18``, ``resnet50``, ``wide_resnet50_2``, ``tiny_resnet``; ``randomize_bn_``.
* ``TwinResNet``: the twin-BN ``AdvResNet`` of ``TWINS_high_res_data/robustness/
  imagenet_models/resnet.py`` (``MixBatchNorm2d`` = Adaptive BN holding a
  ``FixBatchNorm2d`` ``main_bn`` = Frozen BN; head ``fc_downstream``, unused ``fc``);
  factories ``twin_resnet18``, ``twin_resnet50``, ``twin_wide_resnet50_2``,
  ``twin_tiny_resnet``; ``load_pretrained_twin_`` (``model_utils.py``'s "copy every
  pre-trained BN into ``main_bn`` too") and ``make_twin`` (a twin of a plain net).

Training (``Trainer.train`` of the four official scripts):

* ``FastGradientSignUntargeted`` (``perturb``): the official PGD.
* ``Args``: the ``args`` fields the step reads; ``make_optimizer``: SGD + MultiStepLR.
* ``twins_at_iteration``, ``twins_trades_iteration``, ``at_iteration``,
  ``trades_iteration`` (``ITERATIONS[method]``): one iteration of the inner loop.
* ``test``: ``Trainer.test`` (clean and PGD accuracy).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

METHODS = ('twins_at', 'twins_trades', 'at', 'trades')

# ---------------------------------------------------------------------------
# Input pipeline inside the model (AttackerModel.forward)
# ---------------------------------------------------------------------------


def preprocess(inp: torch.Tensor, resize: Optional[int]) -> torch.Tensor:
  """The part of ``AttackerModel.forward`` in front of the classifier."""
  # DEVIATION: the official CIFAR attacker hard-codes 224, the high-resolution one
  # resizes nothing; here the size is a parameter (None = no resize).
  if resize is not None:
    inp = F.interpolate(inp, resize)  # AT_cifar/robustness/attacker.py:319 (nearest)
  # AT_cifar/robustness/attacker.py:320 -> helpers.InputNormalize.forward (the MadryLab
  # robustness helper the repository vendors; its file is not among the saved ones):
  # clamp to [0, 1], then (x - mean) / std.
  inp = torch.clamp(inp, 0, 1)
  # DEVIATION: the official mean/std are float32 buffers (train-TWINS-AT.py:278-279); here
  # they are the exact decimal constants in the input's dtype (so float64 is float64), and
  # not buffers, so that the state dict holds only the classifier's keys.
  mean = torch.tensor(IMAGENET_MEAN, dtype=inp.dtype, device=inp.device).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD, dtype=inp.dtype, device=inp.device).view(1, 3, 1, 1)
  return (inp - mean) / std


# ---------------------------------------------------------------------------
# Twin BatchNorm (TWINS resnet.py:28-144)
# ---------------------------------------------------------------------------


def to_status(m: nn.Module, status: str) -> None:
  if hasattr(m, 'batch_type'):  # TWINS resnet.py:28-30
    m.batch_type = status


to_target_status = partial(to_status, status='target')  # TWINS resnet.py:33
to_source_status = partial(to_status, status='source')  # TWINS resnet.py:34
to_mix_status = partial(to_status, status='mix')  # TWINS resnet.py:35


class FixBatchNorm2d(nn.modules.batchnorm._NormBase):
  """The Frozen BN: always normalises with its running statistics, never updates them
    (its affine weight/bias are trained).  ``TWINS resnet.py:38-106``."""

  def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
               affine: bool = True, track_running_stats: bool = True):
    super().__init__(num_features, eps, momentum, affine, track_running_stats)  # :49-52

  def _check_input_dim(self, input: torch.Tensor) -> None:
    if input.dim() != 4:  # TWINS resnet.py:103-105
      raise ValueError(f'expected 4D input (got {input.dim()}D input)')

  def forward(self, input: torch.Tensor) -> torch.Tensor:
    self._check_input_dim(input)  # TWINS resnet.py:55
    # TWINS resnet.py:60-63
    exponential_average_factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats:  # TWINS resnet.py:65
      if self.num_batches_tracked is not None:  # TWINS resnet.py:67
        # Only the counter moves (TWINS resnet.py:68); the statistics do not.
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # TWINS resnet.py:69-72
          exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        else:
          exponential_average_factor = self.momentum
    bn_train = False  # TWINS resnet.py:78: running statistics, whatever the mode
    return F.batch_norm(
        input,
        self.running_mean,
        self.running_var,  # :89-99
        self.weight,
        self.bias,
        bn_train,
        exponential_average_factor,
        self.eps)


class MixBatchNorm2d(nn.BatchNorm2d):
  """The Adaptive BN (an ordinary ``nn.BatchNorm2d``: ``bn.weight``, ``bn.running_mean``
    ...) holding the Frozen BN as ``main_bn`` (``bn.main_bn.weight`` ...).

    ``batch_type``: 'target' = Adaptive only, 'source' = Frozen only, 'mix' = Frozen on
    ``input[:N // 2]``, Adaptive on ``input[N // 2:]``.  ``TWINS resnet.py:110-144``."""

  def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
               affine: bool = True, track_running_stats: bool = True):
    # TWINS resnet.py:126: the Adaptive BN gets nn.BatchNorm2d's defaults (eps 1e-5,
    # momentum 0.1), whatever eps/momentum were passed.
    super().__init__(num_features=num_features)
    self.main_bn = FixBatchNorm2d(
        num_features,
        eps=eps,
        momentum=momentum,  # :127-128
        affine=affine,
        track_running_stats=track_running_stats)
    self.batch_type = 'target'  # TWINS resnet.py:129

  def forward(self, input: torch.Tensor) -> torch.Tensor:
    if self.batch_type == 'target':  # TWINS resnet.py:132-133
      input = super().forward(input)
    elif self.batch_type == 'source':  # TWINS resnet.py:134-135
      input = self.main_bn.forward(input)
    else:
      assert self.batch_type == 'mix'  # TWINS resnet.py:137
      batch_size = input.shape[0]  # TWINS resnet.py:138
      input0 = self.main_bn.forward(input[:batch_size // 2])  # TWINS resnet.py:141
      input1 = super().forward(input[batch_size // 2:])  # TWINS resnet.py:142
      input = torch.cat((input0, input1), 0)  # TWINS resnet.py:143
    return input


# ---------------------------------------------------------------------------
# ResNet (AT resnet.py:27-244 = TWINS resnet.py:147-364, torchvision layout)
# ---------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
  # AT resnet.py:27-30 (groups = dilation = 1 in every network used here)
  return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
  # AT resnet.py:33-35
  return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
  expansion = 1  # AT resnet.py:39

  def __init__(self, inplanes: int, planes: int, stride: int = 1,
               downsample: Optional[nn.Module] = None, base_width: int = 64,
               norm_layer=nn.BatchNorm2d):
    super().__init__()
    if base_width != 64:  # AT resnet.py:47-48
      raise ValueError('BasicBlock only supports base_width=64')
    self.conv1 = conv3x3(inplanes, planes, stride)  # AT resnet.py:52
    self.bn1 = norm_layer(planes)  # AT resnet.py:53
    self.relu = nn.ReLU(inplace=True)  # AT resnet.py:54
    self.conv2 = conv3x3(planes, planes)  # AT resnet.py:55
    self.bn2 = norm_layer(planes)  # AT resnet.py:56
    self.downsample = downsample  # AT resnet.py:57
    self.stride = stride

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # AT resnet.py:60-79 (fake_relu / no_relu are never set by the training scripts)
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    out += identity
    return self.relu(out)


class Bottleneck(nn.Module):
  """v1.5 bottleneck: the stride sits on the 3x3 conv (AT resnet.py:92-95)."""

  expansion = 4  # AT resnet.py:83

  def __init__(self, inplanes: int, planes: int, stride: int = 1,
               downsample: Optional[nn.Module] = None, base_width: int = 64,
               norm_layer=nn.BatchNorm2d):
    super().__init__()
    width = int(planes * (base_width / 64.))  # AT resnet.py:91 (groups = 1)
    self.conv1 = conv1x1(inplanes, width)  # AT resnet.py:93
    self.bn1 = norm_layer(width)  # AT resnet.py:94
    self.conv2 = conv3x3(width, width, stride)  # AT resnet.py:95
    self.bn2 = norm_layer(width)  # AT resnet.py:96
    self.conv3 = conv1x1(width, planes * self.expansion)  # AT resnet.py:97
    self.bn3 = norm_layer(planes * self.expansion)  # AT resnet.py:98
    self.relu = nn.ReLU(inplace=True)  # AT resnet.py:99
    self.downsample = downsample  # AT resnet.py:100
    self.stride = stride

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x  # AT resnet.py:103-126
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    out += identity
    return self.relu(out)


_BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


class TorchResNet(nn.Module):
  """The plain ResNet of the AT / TRADES baselines (``AT resnet.py:129-244``) with the
    input pipeline of ``AttackerModel.forward`` in front: NCHW images in [0, 1].  Its
    state dict has torchvision's keys exactly (see the head below).
    """

  norm_layer = nn.BatchNorm2d  # AT resnet.py:135-136

  def __init__(self, block: str, layers: Sequence[int], num_classes: int = 1000, width: int = 64,
               width_per_group: int = 64, resize: Optional[int] = None):
    super().__init__()
    if block not in _BLOCKS:
      raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
    if len(layers) != 4:
      raise ValueError('layers must have 4 entries')
    block_cls = _BLOCKS[block]
    self.block, self.layers, self.width = block, tuple(layers), width
    self.width_per_group, self.resize = width_per_group, resize
    # DEVIATION: the stem width is a parameter (official: 64, AT resnet.py:139) so that
    # the tests can run a tiny network with the same layout.
    self.inplanes = width
    self.base_width = width_per_group  # AT resnet.py:149
    norm_layer = type(self).norm_layer
    self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3,
                           bias=False)  # AT resnet.py:150-151
    self.bn1 = norm_layer(self.inplanes)  # AT resnet.py:152
    self.relu = nn.ReLU(inplace=True)  # AT resnet.py:153
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # AT resnet.py:154
    self.layer1 = self._make_layer(block_cls, width, layers[0])  # AT resnet.py:155
    self.layer2 = self._make_layer(block_cls, width * 2, layers[1], stride=2)  # :156-157
    self.layer3 = self._make_layer(block_cls, width * 4, layers[2], stride=2)  # :158-159
    self.layer4 = self._make_layer(block_cls, width * 8, layers[3], stride=2)  # :160-161
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))  # AT resnet.py:162
    self._make_heads(width * 8 * block_cls.expansion, num_classes)  # AT resnet.py:163-164
    for m in self.modules():  # AT resnet.py:166-171 (zero_init_residual=False)
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def _make_heads(self, in_features: int, num_classes: int) -> None:
    # DEVIATION: the official class holds two heads, fc_downstream (the one its forward
    # uses, AT resnet.py:163, 221) and fc (the ImageNet head of forward_IN, which the
    # training code never calls).  Here one head, 'fc', used by forward: torchvision's
    # keys exactly, so that torchvision / robustness checkpoints load into this class
    # and the porting tests can use it.  (Same function: a linear head on pre_out.)
    self.fc = nn.Linear(in_features, num_classes)

  def head(self, pre_out: torch.Tensor) -> torch.Tensor:
    return self.fc(pre_out)

  def _make_layer(self, block_cls, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    norm_layer = type(self).norm_layer  # AT resnet.py:184
    downsample = None
    if stride != 1 or self.inplanes != planes * block_cls.expansion:  # AT resnet.py:190
      downsample = nn.Sequential(  # AT resnet.py:191-194
          conv1x1(self.inplanes, planes * block_cls.expansion, stride),
          norm_layer(planes * block_cls.expansion),
      )
    layers = [
        block_cls(
            self.inplanes,
            planes,
            stride,
            downsample,  # AT resnet.py:197-198
            base_width=self.base_width,
            norm_layer=norm_layer)
    ]
    self.inplanes = planes * block_cls.expansion  # AT resnet.py:199
    for _ in range(1, blocks):  # AT resnet.py:200-203
      layers.append(
          block_cls(self.inplanes, planes, base_width=self.base_width, norm_layer=norm_layer))
    # DEVIATION: AT resnet.py:205 returns SequentialWithArgs (tools/custom_modules.py, not
    # saved: a Sequential passing fake_relu / no_relu to the last block); with those
    # unset, as in training, it is an nn.Sequential (same 'layerK.i' names).
    return nn.Sequential(*layers)

  def preprocess(self, x: torch.Tensor) -> torch.Tensor:
    return preprocess(x, self.resize)  # AT_cifar/robustness/attacker.py:319-320

  def _forward(self, x: torch.Tensor) -> torch.Tensor:
    """The classifier on an already normalised input (AT resnet.py:208-224)."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # AT resnet.py:209-212
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # AT resnet.py:214-217
    pre_out = torch.flatten(self.avgpool(x), 1)  # AT resnet.py:219-220
    return self.head(pre_out)  # AT resnet.py:221

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # AttackerModel.forward (attacker.py:319-328): resize, normalise, classifier.
    # DEVIATION: the AttackerModel / DummyModel wrappers are folded into this forward,
    # so the state dict has no 'model.' / 'attacker.model.' / 'normalizer.' entries.
    return self._forward(self.preprocess(x))


class TwinResNet(TorchResNet):
  """The official twin-BN ``AdvResNet`` (``TWINS resnet.py:249-417``), input pipeline in
    front.  Every BN is a ``MixBatchNorm2d``: ``bn1.weight`` / ``bn1.running_mean`` ... are
    the Adaptive BN, ``bn1.main_bn.weight`` / ``bn1.main_bn.running_mean`` ... the Frozen BN.

    Train mode: every BN in 'mix' status (Frozen on the first half of the batch, Adaptive
    with batch statistics on the second half); the logits come back as
    ``.view(2, n // 2, -1).transpose(1, 0)``, i.e. shape (n // 2, 2, classes).  Eval mode:
    'target' status (Adaptive BN with running statistics), logits (n, classes).
    """

  norm_layer = MixBatchNorm2d  # TWINS resnet.py:375, 378

  def _make_heads(self, in_features: int, num_classes: int) -> None:
    self.fc_downstream = nn.Linear(in_features, num_classes)  # TWINS resnet.py:283
    self.fc = nn.Linear(in_features, num_classes)  # TWINS resnet.py:284 (forward_IN only)

  def head(self, pre_out: torch.Tensor) -> torch.Tensor:
    return self.fc_downstream(pre_out)  # TWINS resnet.py:341

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.preprocess(x)  # attacker.py:319-320, in front of DummyModel -> AdvResNet
    training = self.training  # TWINS resnet.py:389
    input_len = len(x)  # TWINS resnet.py:390
    if training:  # TWINS resnet.py:392
      self.apply(to_mix_status)  # TWINS resnet.py:394
      if input_len % 2:
        # DEVIATION: with an odd batch the official view(2, n // 2, -1) crashes; the
        # 'mix' BNs still give the Frozen BN input[:n // 2] (TWINS resnet.py:141), and
        # the logits are returned unviewed, (n, classes), in batch order.
        return self._forward(x)
      input_len = int(input_len / 2)  # TWINS resnet.py:395
      return self._forward(x).view(2, input_len, -1).transpose(1, 0)  # :414
    self.apply(to_target_status)  # TWINS resnet.py:416
    return self._forward(x)  # TWINS resnet.py:417


def resnet18(num_classes: int = 1000, resize: Optional[int] = None) -> TorchResNet:
  return TorchResNet('basic', [2, 2, 2, 2], num_classes, resize=resize)  # AT resnet.py:257-266


def resnet50(num_classes: int = 1000, resize: Optional[int] = None) -> TorchResNet:
  return TorchResNet('bottleneck', [3, 4, 6, 3], num_classes, resize=resize)  # :283-292


def wide_resnet50_2(num_classes: int = 1000, resize: Optional[int] = None) -> TorchResNet:
  return TorchResNet('bottleneck', [3, 4, 6, 3], num_classes, width_per_group=128,
                     resize=resize)  # AT resnet.py:352-366


def tiny_resnet(num_classes: int = 10, resize: Optional[int] = None) -> TorchResNet:
  # DEVIATION: not an official network: the torchvision layout at width 8 with one block
  # per stage, small enough for the float64 parity tests.
  return TorchResNet('basic', [1, 1, 1, 1], num_classes, width=8, resize=resize)


def twin_resnet18(num_classes: int = 1000, resize: Optional[int] = None) -> TwinResNet:
  return TwinResNet('basic', [2, 2, 2, 2], num_classes, resize=resize)  # TWINS resnet.py:439-448


def twin_resnet50(num_classes: int = 1000, resize: Optional[int] = None) -> TwinResNet:
  return TwinResNet('bottleneck', [3, 4, 6, 3], num_classes, resize=resize)  # :465-474


def twin_wide_resnet50_2(num_classes: int = 1000, resize: Optional[int] = None) -> TwinResNet:
  return TwinResNet('bottleneck', [3, 4, 6, 3], num_classes, width_per_group=128,
                    resize=resize)  # TWINS resnet.py:534-549


def twin_tiny_resnet(num_classes: int = 10, resize: Optional[int] = None) -> TwinResNet:
  # DEVIATION: see tiny_resnet.
  return TwinResNet('basic', [1, 1, 1, 1], num_classes, width=8, resize=resize)


def twin_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
  """``model_utils.py``'s key conversion: every BN entry is kept and also copied into
    ``main_bn``, so both branches start from the pre-trained BN."""
  sd_v2 = {}
  for k, v in state_dict.items():  # TWINS_cifar/robustness/model_utils.py:107-115
    if 'bn' in k or 'downsample.1' in k:
      split_k = k.split('.')
      split_k.insert(-1, 'main_bn')
      sd_v2['.'.join(split_k)] = v
      sd_v2[k] = v
    else:
      sd_v2[k] = v
  return sd_v2


def load_pretrained_twin_(model: TwinResNet, state_dict: Dict[str, torch.Tensor]):
  """Loads a pre-trained plain (torchvision-keyed) state dict into a twin network as
    ``make_and_restore_model`` does; returns ``load_state_dict``'s message.  As officially,
    the pre-trained ``fc`` lands in the unused ``fc`` head; ``fc_downstream`` keeps its
    initialisation (how the official ``fine_tunify.ft``, not among the saved files, sets the
    downstream head is not visible).
    """
  # DEVIATION: the official function reads a robustness .ckpt and strips 'module.'
  # (model_utils.py:94-105); this one takes the classifier's plain keys (our network has
  # no AttackerModel prefix, see TorchResNet.forward).
  return model.load_state_dict(twin_state_dict(state_dict), strict=False)  # model_utils.py:140


def make_twin(plain: TorchResNet) -> TwinResNet:
  """A new ``TwinResNet`` of ``plain``'s architecture (same dtype), both BN branches and
    every conv loaded from ``plain`` through ``load_pretrained_twin_``; the head
    ``fc_downstream`` gets ``plain.fc`` too (our choice, see ``load_pretrained_twin_``)."""
  p = next(plain.parameters())
  twin = TwinResNet(plain.block, plain.layers, plain.fc.out_features, width=plain.width,
                    width_per_group=plain.width_per_group, resize=plain.resize)
  twin = twin.to(dtype=p.dtype, device=p.device)
  sd = plain.state_dict()
  load_pretrained_twin_(twin, sd)
  # DEVIATION (a test convenience): fc_downstream := the plain head, so that the twin
  # computes what the plain network does.
  with torch.no_grad():
    twin.fc_downstream.weight.copy_(sd['fc.weight'])
    twin.fc_downstream.bias.copy_(sd['fc.bias'])
  return twin.train(plain.training)


@torch.no_grad()
def randomize_bn_(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
  """Give every BatchNorm (Adaptive and Frozen alike) non-trivial affine params and
    running stats: weight ~ U(0.5, 1.5), bias ~ U(-0.5, 0.5), running_mean ~ U(-0.5, 0.5),
    running_var ~ U(0.5, 2.0).  (A test helper, not official.)"""

  def u(t: torch.Tensor, lo: float, hi: float) -> None:
    r = torch.rand(t.shape, generator=generator, dtype=t.dtype)
    t.copy_(lo + (hi - lo) * r)

  for m in model.modules():
    if isinstance(m, nn.modules.batchnorm._NormBase):
      u(m.weight, 0.5, 1.5)
      u(m.bias, -0.5, 0.5)
      u(m.running_mean, -0.5, 0.5)
      u(m.running_var, 0.5, 2.0)
  return model


# ---------------------------------------------------------------------------
# PGD (AT_high_res_data/src/attack/fast_gradient_sign_untargeted.py)
# ---------------------------------------------------------------------------


def project(x: torch.Tensor, original_x: torch.Tensor, epsilon: float,
            _type: str = 'linf') -> torch.Tensor:
  if _type == 'linf':  # fast_gradient_sign_untargeted.py:20-24
    max_x = original_x + epsilon
    min_x = original_x - epsilon
    x = torch.max(torch.min(x, max_x), min_x)
  else:
    # DEVIATION: the 'l2' branch (fast_gradient_sign_untargeted.py:26-43) is not
    # reproduced; every published run uses -p 'linf' (train.sh).
    raise NotImplementedError(_type)
  return x


class FastGradientSignUntargeted:
  """The official PGD (fast_gradient_sign_untargeted.py:50-120)."""

  def __init__(self, model: nn.Module, epsilon: float, alpha: float, min_val: float, max_val: float,
               max_iters: int, _type: str = 'linf'):
    self.model = model  # fast_gradient_sign_untargeted.py:55-70
    self.epsilon = epsilon
    self.alpha = alpha
    self.min_val = min_val
    self.max_val = max_val
    self.max_iters = max_iters
    self._type = _type

  def perturb(self, original_images: torch.Tensor, labels: torch.Tensor,
              reduction4loss: str = 'mean', random_start: bool = False,
              rand_perturb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Returns the adversarial images (like the official code: a tensor that still
        requires grad, attached to the attack's graph).  ``rand_perturb``: see below."""
    if random_start:  # fast_gradient_sign_untargeted.py:76
      # DEVIATION: rand_perturb, if given, replaces the uniform_(-eps, eps) draw so that
      # a test can feed two implementations the same noise.
      if rand_perturb is None:
        # fast_gradient_sign_untargeted.py:77-78: a float32 draw on the CPU.
        rand_perturb = torch.FloatTensor(original_images.shape).uniform_(
            -self.epsilon, self.epsilon)
      # DEVIATION: tensor2cuda (:79) -> moved to the images' device (no CUDA here).
      rand_perturb = rand_perturb.to(original_images.device)
      x = original_images + rand_perturb  # fast_gradient_sign_untargeted.py:80
      x.clamp_(self.min_val, self.max_val)  # fast_gradient_sign_untargeted.py:81
    else:
      x = original_images.clone()  # fast_gradient_sign_untargeted.py:83
    x.requires_grad = True  # fast_gradient_sign_untargeted.py:85
    self.model.eval()  # fast_gradient_sign_untargeted.py:90
    with torch.enable_grad():  # fast_gradient_sign_untargeted.py:92
      for _iter in range(self.max_iters):  # fast_gradient_sign_untargeted.py:93
        # DEVIATION: only the 1-D label branch (:94-96); the 2-D one (:97-99) serves
        # the ImageNet attack (attack_IN), which the training loop never calls.
        if len(labels.size()) != 1:
          raise NotImplementedError('soft labels')
        outputs = self.model(x)  # fast_gradient_sign_untargeted.py:95
        loss = F.cross_entropy(outputs, labels, reduction=reduction4loss)  # :96
        if reduction4loss == 'none':  # fast_gradient_sign_untargeted.py:101-105
          grad_outputs = torch.ones(loss.shape, dtype=loss.dtype, device=loss.device)
        else:
          grad_outputs = None
        grads = torch.autograd.grad(
            loss,
            x,
            grad_outputs=grad_outputs,  # :107-108
            only_inputs=True)[0]
        x.data += self.alpha * torch.sign(grads.data)  # :110
        x = project(x, original_images, self.epsilon, self._type)  # :114
        x.clamp_(self.min_val, self.max_val)  # fast_gradient_sign_untargeted.py:116
    self.model.train()  # fast_gradient_sign_untargeted.py:118
    return x  # fast_gradient_sign_untargeted.py:120


# ---------------------------------------------------------------------------
# Trainer.train: optimizer, scheduler, one iteration of the inner loop
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Args:
  """The ``args`` fields the step reads (defaults: AT_cifar/src/argument.py:21-53)."""
  epsilon: float = 0.0157  # argument.py:22-23
  alpha: float = 0.00784  # argument.py:26-27
  k: int = 10  # argument.py:28-29
  batch_size: int = 128  # argument.py:31 (the configured one: divides the KL terms)
  num_classes: int = 10  # argument.py:33
  learning_rate: float = 0.1  # argument.py:36
  momentum: float = 0.9  # argument.py:37
  weight_decay: float = 2e-4  # argument.py:46-47
  beta_trades: float = 6.0  # argument.py:48-49
  lambda_twins: float = 0.3  # argument.py:52-53
  perturbation_type: str = 'linf'  # argument.py:63-64


def make_attack(model: nn.Module, args: Args) -> FastGradientSignUntargeted:
  # train-TWINS-AT.py:284-290 (same in the other three scripts)
  return FastGradientSignUntargeted(model, args.epsilon, args.alpha, min_val=0, max_val=1,
                                    max_iters=args.k, _type=args.perturbation_type)


def make_optimizer(model: nn.Module, args: Args, iter_per_epoch: int = 0,
                   milestones: Optional[Iterable[int]] = None):
  """``Trainer.train``'s SGD over ALL parameters (coupled weight decay, momentum) and the
    per-iteration MultiStepLR: the iteration with 0-based index i runs at
    lr * 0.1 ** #{m in milestones: m <= i}."""
  opt = torch.optim.SGD(
      model.parameters(),
      args.learning_rate,  # train-TWINS-AT.py:55-57
      weight_decay=args.weight_decay,
      momentum=args.momentum)
  if milestones is None:
    milestones = [iter_per_epoch * 30, iter_per_epoch * 50]  # train-TWINS-AT.py:60
  # DEVIATION: ``milestones`` may be given so that a test reaches one in a few steps.
  scheduler = torch.optim.lr_scheduler.MultiStepLR(  # train-TWINS-AT.py:59-61
      opt, milestones=list(milestones), gamma=0.1)
  return opt, scheduler


def _halves(t: torch.Tensor) -> torch.Tensor:
  """``torch.cat([t[:n // 2], t[n // 2:]], dim=0)`` (an identity, kept as written)."""
  batch_size = len(t)
  return torch.cat([t[:batch_size // 2], t[batch_size // 2:]], dim=0)


def _report(lr: float, **losses) -> Dict[str, float]:
  out = {k: float(v.detach()) for k, v in losses.items()}
  out['lr'] = float(lr)
  return out


# DEVIATION: not reproduced in the iterations below, as they change no state: the
# per-iteration accuracy print and the logging block every n_eval_step iterations
# (train-TWINS-AT.py:105-164: an eval-mode, no_grad forward; in the AT scripts it raises
# NameError on 'outputs', a defect of twins-reference.md section 6), and the per-epoch
# test() and checkpointing.
# DEVIATION: only the --adv_train branch is reproduced (every published run sets it,
# train.sh; the other branch of the TWINS scripts uses an undefined 'targets').
# DEVIATION: tensor2cuda (train-*.py:78) is dropped (no CUDA).


def twins_at_iteration(model: TwinResNet, attack: FastGradientSignUntargeted, opt, scheduler,
                       data: torch.Tensor, label: torch.Tensor, args: Args,
                       rand_perturb: Optional[torch.Tensor] = None) -> Dict[str, float]:
  """One iteration of ``TWINS_cifar/train-TWINS-AT.py`` Trainer.train (lines 78-177)."""
  model.train()  # train-TWINS-AT.py:79
  batch_size = len(data)  # train-TWINS-AT.py:80
  adv_data = attack.perturb(data, label, 'mean', True, rand_perturb=rand_perturb)  # :86
  images = _halves(adv_data)  # train-TWINS-AT.py:87
  targets = _halves(label)  # train-TWINS-AT.py:88
  outputs = model(images)  # train-TWINS-AT.py:91
  # DEVIATION: with an odd batch the view/transpose round trip (:94-96) is skipped (the
  # official view crashes); outputs / targets are already in batch order.
  if batch_size % 2 == 0:
    targets = targets.view(2, batch_size // 2).transpose(1, 0)  # train-TWINS-AT.py:94
    outputs = outputs.transpose(1, 0).contiguous().view(-1, args.num_classes)  # :95
    targets = targets.transpose(1, 0).contiguous().view(-1)  # train-TWINS-AT.py:96
  loss_main = F.cross_entropy(outputs[:batch_size // 2], targets[:batch_size // 2])  # :97
  loss_aux = F.cross_entropy(outputs[batch_size // 2:], targets[batch_size // 2:])  # :98
  loss = args.lambda_twins * loss_main + loss_aux  # train-TWINS-AT.py:99
  opt.zero_grad()  # train-TWINS-AT.py:100
  loss.backward()  # train-TWINS-AT.py:101
  lr = opt.param_groups[0]['lr']  # reported (the lr of this iteration), not official
  opt.step()  # train-TWINS-AT.py:103
  scheduler.step()  # train-TWINS-AT.py:177
  return _report(lr, loss=loss, ce_frozen=loss_main, ce_adaptive=loss_aux)


def twins_trades_iteration(model: TwinResNet, attack: FastGradientSignUntargeted, opt, scheduler,
                           data: torch.Tensor, label: torch.Tensor, args: Args,
                           rand_perturb: Optional[torch.Tensor] = None) -> Dict[str, float]:
  """One iteration of ``TWINS_cifar/train-TWINS-TRADES.py`` Trainer.train (lines 78-188):
    the adversarial forward comes first, then the clean one."""
  criterion_kl = nn.KLDivLoss(reduction='sum')  # train-TWINS-TRADES.py:67 (size_average=False)
  model.train()  # train-TWINS-TRADES.py:79
  batch_size = len(data)  # train-TWINS-TRADES.py:80
  adv_data = attack.perturb(data, label, 'mean', True, rand_perturb=rand_perturb)  # :87
  nature_images = _halves(data)  # train-TWINS-TRADES.py:88
  images = _halves(adv_data)  # train-TWINS-TRADES.py:89
  targets = _halves(label)  # train-TWINS-TRADES.py:90
  outputs = model(images)  # train-TWINS-TRADES.py:93 (adversarial forward first)
  # DEVIATION: with an odd batch the view/transpose round trips (:96-98, :100) are skipped
  # (the official view crashes); outputs / targets are already in batch order.
  even = batch_size % 2 == 0
  if even:
    targets = targets.view(2, batch_size // 2).transpose(1, 0)  # :96
    outputs = outputs.transpose(1, 0).contiguous().view(-1, args.num_classes)  # :97
    targets = targets.transpose(1, 0).contiguous().view(-1)  # :98
  outputs_nature = model(nature_images)  # train-TWINS-TRADES.py:99 (clean forward second)
  if even:
    outputs_nature = outputs_nature.transpose(1, 0).contiguous().view(
        -1, args.num_classes)  # train-TWINS-TRADES.py:100
  h = batch_size // 2
  outputs_nature_fix_bn = outputs_nature[:h]  # train-TWINS-TRADES.py:102
  outputs_nature_ada_bn = outputs_nature[h:]  # train-TWINS-TRADES.py:103
  outputs_fix_bn = outputs[:h]  # train-TWINS-TRADES.py:105
  outputs_ada_bn = outputs[h:]  # train-TWINS-TRADES.py:106
  loss = (
      args.lambda_twins * F.cross_entropy(outputs_nature_fix_bn, targets[:h])  # :108
      + F.cross_entropy(outputs_nature_ada_bn, targets[h:]))
  loss_TRADES_robust = (  # train-TWINS-TRADES.py:110
      args.lambda_twins * (1.0 / args.batch_size) *
      criterion_kl(F.log_softmax(outputs_fix_bn, dim=1), F.softmax(outputs_nature_fix_bn, dim=1)) +
      (1.0 / args.batch_size) *
      criterion_kl(F.log_softmax(outputs_ada_bn, dim=1), F.softmax(outputs_nature_ada_bn, dim=1)))
  opt.zero_grad()  # train-TWINS-TRADES.py:111
  total = loss + args.beta_trades * loss_TRADES_robust
  total.backward()  # train-TWINS-TRADES.py:112
  lr = opt.param_groups[0]['lr']  # reported (the lr of this iteration), not official
  opt.step()  # train-TWINS-TRADES.py:113
  scheduler.step()  # train-TWINS-TRADES.py:188
  return _report(lr, loss=total, loss_nat=loss, loss_rob=loss_TRADES_robust)


def at_iteration(model: TorchResNet, attack: FastGradientSignUntargeted, opt, scheduler,
                 data: torch.Tensor, label: torch.Tensor, args: Args,
                 rand_perturb: Optional[torch.Tensor] = None) -> Dict[str, float]:
  """One iteration of ``AT_cifar/train-AT.py`` Trainer.train (lines 78-162)."""
  model.train()  # train-AT.py:79
  batch_size = len(data)  # noqa: F841  train-AT.py:80 (unused by the AT loss)
  adv_data = attack.perturb(data, label, 'mean', True, rand_perturb=rand_perturb)  # :86
  output = model(adv_data)  # train-AT.py:89
  loss = F.cross_entropy(output, label)  # train-AT.py:93
  opt.zero_grad()  # train-AT.py:94
  loss.backward()  # train-AT.py:95
  lr = opt.param_groups[0]['lr']  # reported (the lr of this iteration), not official
  opt.step()  # train-AT.py:96
  scheduler.step()  # train-AT.py:162
  return _report(lr, loss=loss)


def trades_iteration(model: TorchResNet, attack: FastGradientSignUntargeted, opt, scheduler,
                     data: torch.Tensor, label: torch.Tensor, args: Args,
                     rand_perturb: Optional[torch.Tensor] = None) -> Dict[str, float]:
  """One iteration of ``AT_cifar/train-TRADES.py`` Trainer.train (lines 78-169): the
    adversarial forward comes first, then the clean one."""
  criterion_kl = nn.KLDivLoss(reduction='sum')  # train-TRADES.py:67 (size_average=False)
  model.train()  # train-TRADES.py:79
  batch_size = len(data)  # noqa: F841  train-TRADES.py:80 (unused: KL / args.batch_size)
  model.train()  # train-TRADES.py:82
  adv_data = attack.perturb(data, label, 'mean', True, rand_perturb=rand_perturb)  # :88
  output = model(adv_data)  # train-TRADES.py:91 (adversarial forward first)
  output_nature = model(data)  # train-TRADES.py:95 (clean forward second)
  loss = F.cross_entropy(output_nature, label)  # train-TRADES.py:96
  loss_TRADES_robust = (1.0 / args.batch_size) * criterion_kl(  # train-TRADES.py:98
      F.log_softmax(output, dim=1), F.softmax(output_nature, dim=1))
  opt.zero_grad()  # train-TRADES.py:99
  total = loss + args.beta_trades * loss_TRADES_robust
  total.backward()  # train-TRADES.py:100
  lr = opt.param_groups[0]['lr']  # reported (the lr of this iteration), not official
  opt.step()  # train-TRADES.py:102
  scheduler.step()  # train-TRADES.py:169
  return _report(lr, loss=total, loss_nat=loss, loss_rob=loss_TRADES_robust)


ITERATIONS = {
    'twins_at': twins_at_iteration, 'twins_trades': twins_trades_iteration, 'at': at_iteration,
    'trades': trades_iteration
}

# ---------------------------------------------------------------------------
# Trainer.test
# ---------------------------------------------------------------------------


def evaluate(_input: np.ndarray, _target: np.ndarray, method: str = 'mean') -> float:
  # src/utils.py evaluate (not among the saved files): the fraction (or, with 'sum', the
  # number) of predictions equal to the labels.
  correct = (_input == _target).astype(np.float32)
  return float(correct.sum()) if method == 'sum' else float(correct.mean())


def test(model: nn.Module, attack: FastGradientSignUntargeted,
         loader: Iterable[Tuple[torch.Tensor, torch.Tensor]], adv_test: bool = False,
         use_pseudo_label: bool = False,
         record: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None) -> Tuple[float, float]:
  """``Trainer.test`` (train-TWINS-AT.py:200-237; identical in the other three scripts):
    clean accuracy and PGD accuracy (no random start) of the model in eval mode.
    ``record``: see below."""
  # DEVIATION (an addition): if ``record`` is a list, each batch appends its per-example
  # (clean correct, adversarial correct) boolean tensors so a test can compare examples.
  # DEVIATION: tensor2cuda (train-TWINS-AT.py:209) is dropped (no CUDA).
  total_acc = 0.0  # train-TWINS-AT.py:203
  num = 0  # train-TWINS-AT.py:204
  total_adv_acc = 0.0  # train-TWINS-AT.py:205
  model.eval()  # train-TWINS-AT.py:206
  with torch.no_grad():  # train-TWINS-AT.py:207
    for data, label in loader:  # train-TWINS-AT.py:208
      output = model(data)  # train-TWINS-AT.py:211
      pred = torch.max(output, dim=1)[1]  # train-TWINS-AT.py:213
      te_acc = evaluate(pred.cpu().numpy(), label.cpu().numpy(), 'sum')  # :214
      total_acc += te_acc  # train-TWINS-AT.py:216
      num += output.shape[0]  # train-TWINS-AT.py:217
      adv_pred = None
      if adv_test:  # train-TWINS-AT.py:219
        with torch.enable_grad():  # train-TWINS-AT.py:221-225
          adv_data = attack.perturb(data, pred if use_pseudo_label else label, 'mean', False)
        model.eval()  # train-TWINS-AT.py:226
        adv_output = model(adv_data)  # train-TWINS-AT.py:227
        adv_pred = torch.max(adv_output, dim=1)[1]  # train-TWINS-AT.py:230
        adv_acc = evaluate(adv_pred.cpu().numpy(), label.cpu().numpy(), 'sum')  # :231
        total_adv_acc += adv_acc  # train-TWINS-AT.py:232
      else:
        total_adv_acc = -num  # train-TWINS-AT.py:234
      if record is not None:
        record.append((pred == label, None if adv_pred is None else adv_pred == label))
  model.train()  # train-TWINS-AT.py:235
  return total_acc / num, total_adv_acc / num  # train-TWINS-AT.py:237
