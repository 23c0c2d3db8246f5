"""Plain-PyTorch reference for the JAX parity tests.

Written from ``docs/twins-reference.md`` (sections 2 and 5).  No torchvision: the
ResNet below reproduces torchvision's module layout and parameter/buffer names
exactly, so torchvision / robustness checkpoints load into it with
``load_state_dict`` and the JAX porting code can be checked against it.

Public API
----------
* ``TorchResNet`` and the factories ``resnet18``, ``resnet50``,
  ``wide_resnet50_2``, ``tiny_resnet``; ``randomize_bn_``.
* ``TwinBatchNorm2d``, ``make_twin``, ``set_branch``, ``twin_modules``.
* ``pgd_attack``, ``reference_step``, ``make_optimizer``, ``kl_sum``.
"""

from __future__ import annotations

import copy
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention (Flax momentum 0.9)

METHODS = ("twins_at", "twins_trades", "at", "trades")


# ---------------------------------------------------------------------------
# ResNet with torchvision names
# ---------------------------------------------------------------------------

def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride,
                     padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride,
                     bias=False)


def _bn(planes: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(planes, eps=BN_EPS, momentum=BN_MOMENTUM)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None,
                 width_per_group: int = 64):
        super().__init__()
        if width_per_group != 64:
            raise ValueError("BasicBlock only supports width_per_group=64")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = _bn(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = _bn(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None,
                 width_per_group: int = 64):
        super().__init__()
        width = int(planes * (width_per_group / 64.0))  # groups == 1
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = _bn(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = _bn(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = _bn(planes * self.expansion)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class TorchResNet(nn.Module):
    """torchvision-layout ResNet taking NCHW images in [0, 1].

    ``forward`` optionally upsamples (nearest) to ``resize`` x ``resize`` and
    then normalises with the ImageNet mean/std, in that order.  The
    normalisation constants are not buffers, so ``state_dict()`` holds exactly
    the torchvision keys.
    """

    def __init__(self, block: str, layers: Sequence[int], num_classes: int = 1000,
                 width: int = 64, width_per_group: int = 64,
                 resize: Optional[int] = None):
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if len(layers) != 4:
            raise ValueError("layers must have 4 entries")
        block_cls = _BLOCKS[block]
        self.block = block
        self.resize = resize
        self.width_per_group = width_per_group
        self.inplanes = width

        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = _bn(width)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block_cls, width, layers[0], 1)
        self.layer2 = self._make_layer(block_cls, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block_cls, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block_cls, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block_cls.expansion, num_classes)

    def _make_layer(self, block_cls, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block_cls.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block_cls.expansion, stride),
                _bn(planes * block_cls.expansion),
            )
        mods = [block_cls(self.inplanes, planes, stride, downsample,
                          width_per_group=self.width_per_group)]
        self.inplanes = planes * block_cls.expansion
        for _ in range(1, blocks):
            mods.append(block_cls(self.inplanes, planes,
                                  width_per_group=self.width_per_group))
        return nn.Sequential(*mods)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize is not None:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="nearest")
        mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet18(num_classes: int = 1000, resize: Optional[int] = None) -> TorchResNet:
    return TorchResNet("basic", [2, 2, 2, 2], num_classes, resize=resize)


def resnet50(num_classes: int = 1000, resize: Optional[int] = None) -> TorchResNet:
    return TorchResNet("bottleneck", [3, 4, 6, 3], num_classes, resize=resize)


def wide_resnet50_2(num_classes: int = 1000, resize: Optional[int] = None) -> TorchResNet:
    return TorchResNet("bottleneck", [3, 4, 6, 3], num_classes,
                       width_per_group=128, resize=resize)


def tiny_resnet(num_classes: int = 10, resize: Optional[int] = None) -> TorchResNet:
    return TorchResNet("basic", [1, 1, 1, 1], num_classes, width=8, resize=resize)


@torch.no_grad()
def randomize_bn_(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Give every ``nn.BatchNorm2d`` non-trivial affine params and running stats.

    weight ~ U(0.5, 1.5), bias ~ U(-0.5, 0.5), running_mean ~ U(-0.5, 0.5),
    running_var ~ U(0.5, 2.0).  Call it before ``make_twin`` so both branches
    start identical (called afterwards, the two branches get different values).
    """
    def u(t: torch.Tensor, lo: float, hi: float) -> None:
        r = torch.rand(t.shape, generator=generator, dtype=t.dtype)
        t.copy_(lo + (hi - lo) * r)

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            u(m.weight, 0.5, 1.5)
            u(m.bias, -0.5, 0.5)
            u(m.running_mean, -0.5, 0.5)
            u(m.running_var, 0.5, 2.0)
    return model


# ---------------------------------------------------------------------------
# Twin BatchNorm
# ---------------------------------------------------------------------------

class TwinBatchNorm2d(nn.Module):
    """Two BNs sharing nothing: ``adaptive`` (ordinary BN) and ``frozen``.

    ``frozen`` always normalises with its (pre-training) running stats and never
    updates them, whatever the module's train/eval mode; its affine weight/bias
    are trained.  ``branch`` selects which one a forward pass uses.
    """

    def __init__(self, num_features: int, eps: float = BN_EPS,
                 momentum: float = BN_MOMENTUM):
        super().__init__()
        self.adaptive = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)
        self.frozen = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)
        self.frozen.eval()
        self.branch = "adaptive"

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> "TwinBatchNorm2d":
        twin = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum)
        twin.adaptive = copy.deepcopy(bn)
        twin.frozen = copy.deepcopy(bn)
        twin.adaptive.train(bn.training)
        twin.frozen.eval()
        return twin

    def train(self, mode: bool = True) -> "TwinBatchNorm2d":
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch == "adaptive":
            return self.adaptive(x)
        if self.branch == "frozen":
            f = self.frozen
            # Explicitly inference-mode BN: running stats read, never written.
            return F.batch_norm(x, f.running_mean, f.running_var, f.weight, f.bias,
                                training=False, momentum=0.0, eps=f.eps)
        raise ValueError(f"unknown branch {self.branch!r}")

    def extra_repr(self) -> str:
        return f"branch={self.branch}"


def make_twin(model: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` of ``model`` in place by a
    ``TwinBatchNorm2d`` whose two branches are copies of it; returns ``model``.

    Parameter names become e.g. ``layer1.0.bn1.adaptive.weight`` and
    ``layer1.0.downsample.1.frozen.running_var``.
    """
    for parent in list(model.modules()):
        if isinstance(parent, TwinBatchNorm2d):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, TwinBatchNorm2d.from_bn(child))
    return model


def twin_modules(model: nn.Module) -> List[TwinBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, TwinBatchNorm2d)]


def set_branch(model: nn.Module, branch: str) -> nn.Module:
    if branch not in ("adaptive", "frozen"):
        raise ValueError(f"branch must be 'adaptive' or 'frozen', got {branch!r}")
    for m in twin_modules(model):
        m.branch = branch
    return model


# ---------------------------------------------------------------------------
# Attack, losses, one training step
# ---------------------------------------------------------------------------

def kl_sum(adv_logits: torch.Tensor, nat_logits: torch.Tensor) -> torch.Tensor:
    """KLsum(adv || nat) = sum_{i,c} q (log q - log p), q = softmax(nat),
    p = softmax(adv).  Gradient flows through both arguments."""
    return F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(nat_logits, dim=1),
                    reduction="sum")


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
               alpha: float, steps: int, random_start: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Linf PGD maximising the SUM of CE over the batch.

    The model is put in eval mode and (if it has twin BNs) on the adaptive
    branch; it is left in eval mode.  Returns a detached tensor.  Model
    parameter ``.grad`` fields are not touched.
    """
    model.eval()
    set_branch(model, "adaptive")
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        x_adv = torch.clamp(x_adv + (2.0 * noise - 1.0) * eps, 0.0, 1.0)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * torch.sign(grad)
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv.detach()


def _split_forward(model: nn.Module, x: torch.Tensor
                   ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Frozen branch on x[:N//2], adaptive branch (train mode) on x[N//2:].
    Returns (frozen_logits or None when N//2 == 0, adaptive_logits)."""
    h = x.shape[0] // 2
    out_f = None
    if h > 0:
        set_branch(model, "frozen")
        out_f = model(x[:h])
    set_branch(model, "adaptive")
    out_a = model(x[h:])
    return out_f, out_a


def reference_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                   x: torch.Tensor, y: torch.Tensor, *, method: str, eps: float,
                   alpha: float, steps: int, lambda_twins: float = 1.0,
                   beta: float = 6.0, random_start: bool = False,
                   generator: Optional[torch.Generator] = None,
                   scheduler=None, x_adv: Optional[torch.Tensor] = None
                   ) -> Dict[str, float]:
    """One optimisation step in place (twins-reference.md section 2).

    ``x_adv``: if given, the attack is skipped and these adversarial examples
    are used (lets a parity test feed identical inputs to both sides).
    ``scheduler``: if given, ``scheduler.step()`` is called after the
    optimiser step (per-iteration schedule).
    Leaves the model in train mode on the adaptive branch.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    twins = method.startswith("twins_")
    if twins and not twin_modules(model):
        raise ValueError(f"{method} needs a model converted with make_twin")
    if not twins and twin_modules(model):
        raise ValueError(f"{method} needs a plain model (no twin BNs)")

    x = x.detach()
    n = x.shape[0]
    h = n // 2
    lr = optimizer.param_groups[0]["lr"]

    if x_adv is None:
        x_adv = pgd_attack(model, x, y, eps=eps, alpha=alpha, steps=steps,
                           random_start=random_start, generator=generator)
    else:
        x_adv = x_adv.detach()
    model.train()
    optimizer.zero_grad(set_to_none=True)

    stats: Dict[str, torch.Tensor] = {}
    if method == "twins_at":
        adv_f, adv_a = _split_forward(model, x_adv)
        ce_a = F.cross_entropy(adv_a, y[h:])
        loss = ce_a
        stats["ce_adaptive"] = ce_a
        if adv_f is not None:
            ce_f = F.cross_entropy(adv_f, y[:h])
            loss = lambda_twins * ce_f + loss
            stats["ce_frozen"] = ce_f
    elif method == "twins_trades":
        nat_f, nat_a = _split_forward(model, x)
        adv_f, adv_a = _split_forward(model, x_adv)
        ce_a = F.cross_entropy(nat_a, y[h:])
        kl_a = kl_sum(adv_a, nat_a) / n
        loss_nat = ce_a
        loss_rob = kl_a
        stats["ce_adaptive"] = ce_a
        stats["kl_adaptive"] = kl_a
        if nat_f is not None:
            ce_f = F.cross_entropy(nat_f, y[:h])
            kl_f = kl_sum(adv_f, nat_f) / n
            loss_nat = lambda_twins * ce_f + loss_nat
            loss_rob = lambda_twins * kl_f + loss_rob
            stats["ce_frozen"] = ce_f
            stats["kl_frozen"] = kl_f
        loss = loss_nat + beta * loss_rob
        stats["loss_nat"] = loss_nat
        stats["loss_rob"] = loss_rob
    elif method == "at":
        loss = F.cross_entropy(model(x_adv), y)
    else:  # trades
        nat = model(x)
        adv = model(x_adv)
        loss_nat = F.cross_entropy(nat, y)
        loss_rob = kl_sum(adv, nat) / n
        loss = loss_nat + beta * loss_rob
        stats["loss_nat"] = loss_nat
        stats["loss_rob"] = loss_rob

    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    set_branch(model, "adaptive")

    out = {"loss": float(loss.detach()), "lr": float(lr)}
    out.update({k: float(v.detach()) for k, v in stats.items()})
    return out


def make_optimizer(model: nn.Module, lr: float, wd: float,
                   milestones_in_steps: Iterable[int] = (), gamma: float = 0.1):
    """SGD(momentum 0.9, coupled weight decay wd) over ALL parameters, plus a
    MultiStepLR stepped once per iteration: the step with 0-based index i uses
    lr * gamma ** (number of milestones m with m <= i)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                                weight_decay=wd)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=sorted(int(m) for m in milestones_in_steps), gamma=gamma)
    return optimizer, scheduler
