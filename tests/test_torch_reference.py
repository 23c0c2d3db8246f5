"""Quick tests of the plain-PyTorch reference (tests/torch_reference.py)."""

import copy
import os
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import torch_reference as tr  # noqa: E402

EPS = 8 / 255
ALPHA = 2 / 255


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def _bn_keys(prefix):
    return [f"{prefix}.{s}" for s in
            ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def expected_torchvision_keys(block, layers):
    """The torchvision ResNet state_dict keys, in order, derived by hand."""
    keys = ["conv1.weight"] + _bn_keys("bn1")
    n_convs = 2 if block == "basic" else 3
    expansion = 1 if block == "basic" else 4
    inplanes = 64
    for li, (n_blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
        stride = 1 if li == 1 else 2
        for b in range(n_blocks):
            p = f"layer{li}.{b}"
            for c in range(1, n_convs + 1):
                keys.append(f"{p}.conv{c}.weight")
                keys += _bn_keys(f"{p}.bn{c}")
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                keys.append(f"{p}.downsample.0.weight")
                keys += _bn_keys(f"{p}.downsample.1")
        inplanes = planes * expansion
    keys += ["fc.weight", "fc.bias"]
    return keys


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def tiny(num_classes=5, seed=0):
    torch.manual_seed(seed)
    m = tr.tiny_resnet(num_classes=num_classes)
    tr.randomize_bn_(m, torch.Generator().manual_seed(seed + 1))
    return m


def batch(n, num_classes=5, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y


def bn_buffers(model, branch):
    return {name: buf.clone() for name, buf in model.named_buffers()
            if f".{branch}." in name and not name.endswith("num_batches_tracked")}


# --------------------------------------------------------------------------
# architecture / names
# --------------------------------------------------------------------------

@pytest.mark.parametrize("factory,block,layers", [
    (tr.resnet18, "basic", [2, 2, 2, 2]),
    (tr.resnet50, "bottleneck", [3, 4, 6, 3]),
    (tr.wide_resnet50_2, "bottleneck", [3, 4, 6, 3]),
])
def test_state_dict_keys_match_torchvision(factory, block, layers):
    with torch.device("meta"):
        m = factory(num_classes=1000)
    assert list(m.state_dict().keys()) == expected_torchvision_keys(block, layers)


def test_specific_names():
    with torch.device("meta"):
        r18 = tr.resnet18()
        r50 = tr.resnet50()
    k18 = set(r18.state_dict())
    k50 = set(r50.state_dict())
    assert "layer4.1.bn2.running_var" in k18
    assert "layer4.1.bn2.running_var" in k50
    assert "layer1.0.downsample.0.weight" in k50
    assert "layer1.0.downsample.1.running_mean" in k50
    assert not any(k.startswith("layer1.0.downsample") for k in k18)
    assert "layer2.0.downsample.0.weight" in k18
    assert "layer4.2.conv3.weight" in k50
    assert "layer4.2.conv3.weight" not in k18


@pytest.mark.parametrize("factory,count", [
    (tr.resnet18, 11_689_512),
    (tr.resnet50, 25_557_032),
    (tr.wide_resnet50_2, 68_883_240),
])
def test_param_counts(factory, count):
    with torch.device("meta"):
        m = factory(num_classes=1000)
    assert n_params(m) == count


def test_shapes_and_strides():
    with torch.device("meta"):
        r50 = tr.resnet50(num_classes=10)
        w50 = tr.wide_resnet50_2(num_classes=10)
    sd = r50.state_dict()
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(sd["layer1.0.conv2.weight"].shape) == (64, 64, 3, 3)
    assert tuple(sd["fc.weight"].shape) == (10, 2048)
    # v1.5: stride on the 3x3 conv
    assert r50.layer2[0].conv1.stride == (1, 1)
    assert r50.layer2[0].conv2.stride == (2, 2)
    assert r50.layer2[0].downsample[0].stride == (2, 2)
    assert r50.conv1.padding == (3, 3) and r50.maxpool.padding == 1
    assert tuple(w50.state_dict()["layer1.0.conv1.weight"].shape) == (128, 64, 1, 1)
    assert tuple(w50.state_dict()["layer1.0.conv3.weight"].shape) == (256, 128, 1, 1)


def test_forward_shape_and_resize():
    m = tiny().eval()
    x, _ = batch(2, size=8)
    with torch.no_grad():
        assert m(x).shape == (2, 5)
        m.resize = 24
        up = x.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3)
        out_resized = m(x)
        m.resize = None
        out_manual = m(up)
    torch.testing.assert_close(out_resized, out_manual)


def test_normalisation_inside_forward():
    m = tiny().eval()
    x, _ = batch(2)
    mean = torch.tensor(tr.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(tr.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        h = m.bn1(m.conv1((x - mean) / std))
        h = m.maxpool(F.relu(h))
        h = m.layer4(m.layer3(m.layer2(m.layer1(h))))
        expected = m.fc(h.mean(dim=(2, 3)))
        torch.testing.assert_close(m(x), expected)


# --------------------------------------------------------------------------
# twin BN
# --------------------------------------------------------------------------

def test_make_twin_copies_and_frozen_stays_eval():
    base = tiny()
    n_bn = sum(isinstance(mod, nn.BatchNorm2d) for mod in base.modules())
    twin = tr.make_twin(copy.deepcopy(base))
    tw = tr.twin_modules(twin)
    assert len(tw) == n_bn
    sd = twin.state_dict()
    assert "layer1.0.bn1.adaptive.running_var" in sd
    assert "layer1.0.bn1.frozen.weight" in sd
    torch.testing.assert_close(sd["layer1.0.bn1.frozen.running_var"],
                               base.state_dict()["layer1.0.bn1.running_var"])
    twin.train()
    assert all(t.training and t.adaptive.training and not t.frozen.training for t in tw)

    x, _ = batch(4)
    base.eval()
    with torch.no_grad():
        ref = base(x)
        # frozen branch in train mode == original network in eval mode
        tr.set_branch(twin, "frozen")
        torch.testing.assert_close(twin(x), ref)
        # adaptive branch in eval mode == original in eval mode
        twin.eval()
        tr.set_branch(twin, "adaptive")
        torch.testing.assert_close(twin(x), ref)
        # adaptive branch in train mode uses batch stats -> differs
        twin.train()
        assert not torch.allclose(twin(x), ref, atol=1e-3)


def test_twins_at_step_freezes_frozen_stats_and_updates_adaptive():
    model = tr.make_twin(tiny())
    x, y = batch(6)
    frozen_before = bn_buffers(model, "frozen")
    adaptive_before = bn_buffers(model, "adaptive")
    fw_before = model.bn1.frozen.weight.detach().clone()
    opt, _ = tr.make_optimizer(model, lr=0.1, wd=1e-4)
    out = tr.reference_step(model, opt, x, y, method="twins_at", eps=EPS,
                            alpha=ALPHA, steps=2)
    assert set(out) >= {"loss", "ce_frozen", "ce_adaptive"}
    frozen_after = bn_buffers(model, "frozen")
    adaptive_after = bn_buffers(model, "adaptive")
    for k in frozen_before:
        assert torch.equal(frozen_before[k], frozen_after[k]), k
    for k in adaptive_before:
        assert not torch.allclose(adaptive_before[k], adaptive_after[k]), k
    # frozen affine params are trained
    assert not torch.allclose(fw_before, model.bn1.frozen.weight)


def test_adaptive_running_stats_update_is_unbiased_momentum_01():
    base = tiny()
    model = tr.make_twin(copy.deepcopy(base))
    x, y = batch(7)
    h = 7 // 2
    x_adv = tr.pgd_attack(model, x, y, eps=EPS, alpha=ALPHA, steps=1)
    rm0 = model.bn1.adaptive.running_mean.clone()
    rv0 = model.bn1.adaptive.running_var.clone()
    opt, _ = tr.make_optimizer(model, lr=0.0, wd=0.0)
    tr.reference_step(model, opt, x, y, method="twins_at", eps=EPS, alpha=ALPHA,
                      steps=1, x_adv=x_adv)
    with torch.no_grad():
        z = base.conv1(base.preprocess(x_adv[h:]))
        mu = z.mean(dim=(0, 2, 3))
        var_unbiased = z.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(model.bn1.adaptive.running_mean, 0.9 * rm0 + 0.1 * mu)
    torch.testing.assert_close(model.bn1.adaptive.running_var,
                               0.9 * rv0 + 0.1 * var_unbiased)


def test_twins_at_loss_matches_independent_computation():
    base = tiny()
    x, y = batch(7)
    h = 3
    twin = tr.make_twin(copy.deepcopy(base))
    x_adv = tr.pgd_attack(twin, x, y, eps=EPS, alpha=ALPHA, steps=2)
    lam = 0.4
    with torch.no_grad():
        b_eval = copy.deepcopy(base).eval()
        b_train = copy.deepcopy(base).train()
        expected = (lam * F.cross_entropy(b_eval(x_adv[:h]), y[:h])
                    + F.cross_entropy(b_train(x_adv[h:]), y[h:]))
    opt, _ = tr.make_optimizer(twin, lr=0.01, wd=0.0)
    out = tr.reference_step(twin, opt, x, y, method="twins_at", eps=EPS, alpha=ALPHA,
                            steps=2, lambda_twins=lam)
    assert out["loss"] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


def test_twins_trades_loss_matches_independent_computation():
    base = tiny()
    n, h, lam, beta = 7, 3, 0.4, 6.0
    x, y = batch(n)
    twin = tr.make_twin(copy.deepcopy(base))
    x_adv = tr.pgd_attack(twin, x, y, eps=EPS, alpha=ALPHA, steps=2)

    def kl(adv, nat):
        q = F.softmax(nat, 1)
        return (q * (F.log_softmax(nat, 1) - F.log_softmax(adv, 1))).sum()

    with torch.no_grad():
        b_eval = copy.deepcopy(base).eval()
        b_train = copy.deepcopy(base).train()
        nat_f, adv_f = b_eval(x[:h]), b_eval(x_adv[:h])
        nat_a = b_train(x[h:])
        adv_a = b_train(x_adv[h:])
        l_nat = lam * F.cross_entropy(nat_f, y[:h]) + F.cross_entropy(nat_a, y[h:])
        l_rob = lam * kl(adv_f, nat_f) / n + kl(adv_a, nat_a) / n
        expected = l_nat + beta * l_rob
    opt, _ = tr.make_optimizer(twin, lr=0.01, wd=0.0)
    out = tr.reference_step(twin, opt, x, y, method="twins_trades", eps=EPS,
                            alpha=ALPHA, steps=2, lambda_twins=lam, beta=beta)
    assert out["loss"] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert out["loss_rob"] == pytest.approx(float(l_rob), rel=1e-4, abs=1e-6)
    # running stats were updated twice (clean half, then adversarial half)
    torch.testing.assert_close(twin.bn1.adaptive.running_mean, b_train.bn1.running_mean)


# --------------------------------------------------------------------------
# attack
# --------------------------------------------------------------------------

@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_inside_eps_ball_and_box(random_start):
    model = tiny()
    x, y = batch(5)
    x[0, 0, :4, :4] = 0.0  # exercise the [0, 1] clamp at the borders
    x[1, 1, :4, :4] = 1.0
    x_adv = tr.pgd_attack(model, x, y, eps=EPS, alpha=ALPHA, steps=5,
                          random_start=random_start,
                          generator=torch.Generator().manual_seed(3))
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert (x_adv - x).abs().max() >= EPS - 1e-6  # 5 steps of 2/255 reach the ball edge
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        model.eval()
        assert (F.cross_entropy(model(x_adv), y, reduction="sum")
                > F.cross_entropy(model(x), y, reduction="sum"))


def test_pgd_does_not_touch_running_stats():
    model = tr.make_twin(tiny())
    x, y = batch(4)
    before = {k: v.clone() for k, v in model.named_buffers()}
    tr.pgd_attack(model, x, y, eps=EPS, alpha=ALPHA, steps=2, random_start=True,
                  generator=torch.Generator().manual_seed(0))
    for k, v in model.named_buffers():
        assert torch.equal(before[k], v), k


# --------------------------------------------------------------------------
# steps / optimiser
# --------------------------------------------------------------------------

@pytest.mark.parametrize("method", tr.METHODS)
def test_every_method_odd_batch(method):
    model = tiny()
    if method.startswith("twins_"):
        tr.make_twin(model)
    x, y = batch(5)
    opt, sched = tr.make_optimizer(model, lr=0.05, wd=1e-4, milestones_in_steps=(1,))
    before = [p.detach().clone() for p in model.parameters()]
    out = tr.reference_step(model, opt, x, y, method=method, eps=EPS, alpha=ALPHA,
                            steps=1, random_start=True,
                            generator=torch.Generator().manual_seed(1),
                            scheduler=sched)
    assert all(isinstance(v, float) for v in out.values())
    assert torch.isfinite(torch.tensor(out["loss"]))
    # every parameter (both BN affine sets included) received an update
    for p0, p in zip(before, model.parameters()):
        assert not torch.equal(p0, p)
    assert model.training
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)


def test_method_model_mismatch_raises():
    x, y = batch(4)
    plain = tiny()
    opt, _ = tr.make_optimizer(plain, 0.1, 0.0)
    with pytest.raises(ValueError):
        tr.reference_step(plain, opt, x, y, method="twins_at", eps=EPS, alpha=ALPHA, steps=1)
    twin = tr.make_twin(tiny())
    opt, _ = tr.make_optimizer(twin, 0.1, 0.0)
    with pytest.raises(ValueError):
        tr.reference_step(twin, opt, x, y, method="at", eps=EPS, alpha=ALPHA, steps=1)


def test_at_step_is_sgd_with_coupled_weight_decay():
    model = tiny()
    x, y = batch(4)
    x_adv = tr.pgd_attack(model, x, y, eps=EPS, alpha=ALPHA, steps=1)
    ref = copy.deepcopy(model).train()
    loss = F.cross_entropy(ref(x_adv), y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    lr, wd = 0.1, 0.01
    opt, _ = tr.make_optimizer(model, lr=lr, wd=wd)
    params0 = [p.detach().clone() for p in model.parameters()]
    tr.reference_step(model, opt, x, y, method="at", eps=EPS, alpha=ALPHA, steps=1,
                      x_adv=x_adv)
    for p0, g, p in zip(params0, grads, model.parameters()):
        torch.testing.assert_close(p.detach(), p0 - lr * (g + wd * p0))


def test_schedule_per_iteration():
    model = tiny()
    opt, sched = tr.make_optimizer(model, lr=1.0, wd=0.0, milestones_in_steps=(2, 4))
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_randomize_bn_is_nontrivial():
    m = tiny()
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    for bn in bns:
        assert (bn.running_var > 0.49).all() and (bn.running_var < 2.01).all()
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
