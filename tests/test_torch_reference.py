"""Tests of the PyTorch reference itself (tests/torch_reference.py).

They pin the reference to the official TWINS semantics without our JAX code: torchvision
key layout, the official twin-BN names, the 'mix' forward (Frozen statistics on the first
half, never updated; batch statistics on the second half), the order in which the TRADES
steps update the running statistics (hand computations with ``F.batch_norm``), the KL
divided by the configured batch size, the PGD, the optimiser and ``Trainer.test``.
"""

import copy
import os
import sys

import pytest

torch = pytest.importorskip('torch')
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import torch_reference as tr  # noqa: E402

EPS = 8 / 255
ALPHA = 2 / 255
NC = 5

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

_BN_FIELDS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def _bn_keys(prefix, twin=False):
  keys = [f'{prefix}.{s}' for s in _BN_FIELDS]
  if twin:
    keys += [f'{prefix}.main_bn.{s}' for s in _BN_FIELDS]
  return keys


def expected_keys(block, layers, twin=False):
  """The torchvision ResNet state_dict keys, in order, derived by hand; with ``twin``, the
    official AdvResNet's (a main_bn inside every BN, heads fc_downstream and fc)."""
  keys = ['conv1.weight'] + _bn_keys('bn1', twin)
  n_convs = 2 if block == 'basic' else 3
  expansion = 1 if block == 'basic' else 4
  inplanes = 64
  for li, (n_blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
    stride = 1 if li == 1 else 2
    for b in range(n_blocks):
      p = f'layer{li}.{b}'
      for c in range(1, n_convs + 1):
        keys.append(f'{p}.conv{c}.weight')
        keys += _bn_keys(f'{p}.bn{c}', twin)
      if b == 0 and (stride != 1 or inplanes != planes * expansion):
        keys.append(f'{p}.downsample.0.weight')
        keys += _bn_keys(f'{p}.downsample.1', twin)
    inplanes = planes * expansion
  if twin:
    keys += ['fc_downstream.weight', 'fc_downstream.bias']
  keys += ['fc.weight', 'fc.bias']
  return keys


def n_params(model):
  return sum(p.numel() for p in model.parameters())


def tiny(num_classes=NC, seed=0):
  torch.manual_seed(seed)
  m = tr.tiny_resnet(num_classes=num_classes).double()
  tr.randomize_bn_(m, torch.Generator().manual_seed(seed + 1))
  return m


def tiny_twin(num_classes=NC, seed=0):
  """A twin network whose two BN branches (and heads) hold different values."""
  torch.manual_seed(seed)
  m = tr.twin_tiny_resnet(num_classes=num_classes).double()
  tr.randomize_bn_(m, torch.Generator().manual_seed(seed + 1))
  return m


def batch(n, num_classes=NC, size=16, seed=0):
  g = torch.Generator().manual_seed(seed)
  x = torch.rand(n, 3, size, size, generator=g, dtype=torch.float64)
  y = torch.randint(0, num_classes, (n,), generator=g)
  return x, y


def branch_as_plain(twin, branch):
  """A plain network computing what one branch of ``twin`` computes, built by hand from
    the official names: Adaptive = ``<bn>.*``, Frozen = ``<bn>.main_bn.*``."""
  plain = tr.TorchResNet(twin.block, twin.layers, twin.fc_downstream.out_features, width=twin.width,
                         resize=twin.resize).double()
  sd = twin.state_dict()
  new = {}
  for k in plain.state_dict():
    if k.startswith('fc.'):
      new[k] = sd['fc_downstream.' + k[3:]]
    elif k in sd and (k.rsplit('.', 1)[0] + '.main_bn.weight') in sd and branch == 'frozen':
      prefix, field = k.rsplit('.', 1)
      new[k] = sd[f'{prefix}.main_bn.{field}']
    else:
      new[k] = sd[k]
  plain.load_state_dict(new)
  return plain


def frozen_buffers(model):
  return {k: v.clone() for k, v in model.state_dict().items() if '.main_bn.running_' in k}


def adaptive_buffers(model):
  return {
      k: v.clone() for k, v in model.state_dict().items() if 'running_' in k and '.main_bn.' not in k
  }


def args_for(n, **kw):
  base = dict(epsilon=EPS, alpha=ALPHA, k=2, batch_size=n, num_classes=NC, learning_rate=0.05,
              weight_decay=1e-4, lambda_twins=0.4)
  base.update(kw)
  return tr.Args(**base)


def adv_examples(model, x, y, args, noise):
  """The step's adversarial examples, computed on a copy (perturb leaves state alone)."""
  m = copy.deepcopy(model)
  return tr.make_attack(m, args).perturb(x, y, 'mean', True, rand_perturb=noise).detach()


# --------------------------------------------------------------------------
# architecture / names
# --------------------------------------------------------------------------

ARCHS = [
    (tr.resnet18, tr.twin_resnet18, 'basic', [2, 2, 2, 2]),
    (tr.resnet50, tr.twin_resnet50, 'bottleneck', [3, 4, 6, 3]),
    (tr.wide_resnet50_2, tr.twin_wide_resnet50_2, 'bottleneck', [3, 4, 6, 3]),
]


@pytest.mark.parametrize('factory,_,block,layers', ARCHS)
def test_state_dict_keys_match_torchvision(factory, _, block, layers):
  with torch.device('meta'):
    m = factory(num_classes=1000)
  assert list(m.state_dict().keys()) == expected_keys(block, layers)


@pytest.mark.parametrize('_,factory,block,layers', ARCHS)
def test_twin_state_dict_keys_are_the_official_ones(_, factory, block, layers):
  with torch.device('meta'):
    m = factory(num_classes=1000)
  assert list(m.state_dict().keys()) == expected_keys(block, layers, twin=True)
  assert isinstance(m.bn1, tr.MixBatchNorm2d) and isinstance(m.bn1, nn.BatchNorm2d)
  assert isinstance(m.bn1.main_bn, tr.FixBatchNorm2d)


def test_specific_names():
  with torch.device('meta'):
    r18 = tr.resnet18()
    r50 = tr.resnet50()
  k18 = set(r18.state_dict())
  k50 = set(r50.state_dict())
  assert 'layer4.1.bn2.running_var' in k18
  assert 'layer4.1.bn2.running_var' in k50
  assert 'layer1.0.downsample.0.weight' in k50
  assert 'layer1.0.downsample.1.running_mean' in k50
  assert not any(k.startswith('layer1.0.downsample') for k in k18)
  assert 'layer2.0.downsample.0.weight' in k18
  assert 'layer4.2.conv3.weight' in k50
  assert 'layer4.2.conv3.weight' not in k18


@pytest.mark.parametrize('factory,twin_factory,count', [
    (tr.resnet18, tr.twin_resnet18, 11_689_512),
    (tr.resnet50, tr.twin_resnet50, 25_557_032),
    (tr.wide_resnet50_2, tr.twin_wide_resnet50_2, 68_883_240),
])
def test_param_counts(factory, twin_factory, count):
  with torch.device('meta'):
    m = factory(num_classes=1000)
    t = twin_factory(num_classes=1000)
  assert n_params(m) == count
  bn_affine = sum(mod.weight.numel() * 2 for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
  fc = m.fc.weight.numel() + m.fc.bias.numel()
  # The twin network: a second BN affine set (main_bn) and a second head.
  assert n_params(t) == count + bn_affine + fc


def test_shapes_and_strides():
  with torch.device('meta'):
    r50 = tr.resnet50(num_classes=10)
    w50 = tr.wide_resnet50_2(num_classes=10)
  sd = r50.state_dict()
  assert tuple(sd['conv1.weight'].shape) == (64, 3, 7, 7)
  assert tuple(sd['layer1.0.conv2.weight'].shape) == (64, 64, 3, 3)
  assert tuple(sd['fc.weight'].shape) == (10, 2048)
  # v1.5: stride on the 3x3 conv
  assert r50.layer2[0].conv1.stride == (1, 1)
  assert r50.layer2[0].conv2.stride == (2, 2)
  assert r50.layer2[0].downsample[0].stride == (2, 2)
  assert r50.conv1.padding == (3, 3) and r50.maxpool.padding == 1
  assert tuple(w50.state_dict()['layer1.0.conv1.weight'].shape) == (128, 64, 1, 1)
  assert tuple(w50.state_dict()['layer1.0.conv3.weight'].shape) == (256, 128, 1, 1)


def test_official_initialisation():
  torch.manual_seed(0)
  t = tr.twin_tiny_resnet()
  for mod in t.modules():
    if isinstance(mod, nn.modules.batchnorm._NormBase):  # both branches: 1 / 0
      assert torch.equal(mod.weight, torch.ones_like(mod.weight))
      assert torch.equal(mod.bias, torch.zeros_like(mod.bias))
  w = t.conv1.weight  # kaiming normal, fan_out, relu: std sqrt(2 / (out * k * k))
  assert abs(float(w.detach().std()) / (2 / (8 * 49))**0.5 - 1) < 0.15


def test_forward_shape_and_resize():
  m = tiny().eval()
  x, _ = batch(2, size=8)
  with torch.no_grad():
    assert m(x).shape == (2, NC)
    m.resize = 24
    up = x.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3)
    out_resized = m(x)
    m.resize = None
    out_manual = m(up)
  torch.testing.assert_close(out_resized, out_manual)


def test_normalisation_inside_forward():
  m = tiny().eval()
  x, _ = batch(2)
  mean = torch.tensor(tr.IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
  std = torch.tensor(tr.IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
  with torch.no_grad():
    h = m.bn1(m.conv1((x - mean) / std))
    h = m.maxpool(F.relu(h))
    h = m.layer4(m.layer3(m.layer2(m.layer1(h))))
    expected = m.fc(h.mean(dim=(2, 3)))
    torch.testing.assert_close(m(x), expected)
    # robustness' InputNormalize clamps to [0, 1] first
    torch.testing.assert_close(m(x * 3 - 1), m(torch.clamp(x * 3 - 1, 0, 1)))


# --------------------------------------------------------------------------
# twin BN: the official 'mix' / 'target' forward
# --------------------------------------------------------------------------


def test_view_transpose_round_trip_is_identity_for_even_batches():
  n, c = 8, NC
  out = torch.randn(n, c, dtype=torch.float64)
  viewed = out.view(2, n // 2, -1).transpose(1, 0)  # TWINS resnet.py:414
  back = viewed.transpose(1, 0).contiguous().view(-1, c)  # train-TWINS-AT.py:95
  assert torch.equal(back, out)
  label = torch.arange(n)
  t = label.view(2, n // 2).transpose(1, 0)  # train-TWINS-AT.py:94
  assert torch.equal(t.transpose(1, 0).contiguous().view(-1), label)  # :96
  # ... and through the network: train-mode output, put back in batch order.
  twin = tiny_twin()
  x, _ = batch(n)
  with torch.no_grad():
    y = twin.train()(x)
    assert y.shape == (n // 2, 2, c)
    assert torch.equal(y[:, 0], y.transpose(1, 0)[0])


@pytest.mark.parametrize('n', [8, 7])
def test_mix_forward_frozen_first_half_adaptive_second_half(n):
  twin = tiny_twin()
  h = n // 2
  frozen_net = branch_as_plain(twin, 'frozen').eval()
  adaptive_net = branch_as_plain(twin, 'adaptive').train()
  # the two branches really differ
  assert not torch.equal(twin.bn1.weight, twin.bn1.main_bn.weight)
  assert not torch.equal(twin.bn1.running_mean, twin.bn1.main_bn.running_mean)
  frozen0, adaptive0 = frozen_buffers(twin), adaptive_buffers(twin)
  counter0 = int(twin.bn1.main_bn.num_batches_tracked)
  x, _ = batch(n)
  with torch.no_grad():
    out = twin.train()(x)
    if n % 2 == 0:
      out = out.transpose(1, 0).contiguous().view(-1, NC)
    expected = torch.cat([frozen_net(x[:h]), adaptive_net(x[h:])])
  torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
  assert all(m.batch_type == 'mix' for m in twin.modules() if hasattr(m, 'batch_type'))
  # Frozen statistics never change (only the counter moves); Adaptive ones are updated as
  # an ordinary BN on the second half does.
  for k, v in frozen_buffers(twin).items():
    assert torch.equal(v, frozen0[k]), k
  assert int(twin.bn1.main_bn.num_batches_tracked) == counter0 + 1
  sd_a = adaptive_net.state_dict()
  for k, v in adaptive_buffers(twin).items():
    assert not torch.equal(v, adaptive0[k]), k
    torch.testing.assert_close(v, sd_a[k], rtol=1e-12, atol=1e-12)


def test_eval_forward_is_the_adaptive_net_with_running_stats():
  twin = tiny_twin()
  x, _ = batch(5)
  before = {k: v.clone() for k, v in twin.state_dict().items()}
  with torch.no_grad():
    out = twin.eval()(x)
    expected = branch_as_plain(twin, 'adaptive').eval()(x)
  torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
  assert all(m.batch_type == 'target' for m in twin.modules() if hasattr(m, 'batch_type'))
  for k, v in twin.state_dict().items():
    assert torch.equal(v, before[k]), k


def test_pretrained_loading_copies_each_bn_into_main_bn():
  plain = tiny()
  twin = tr.twin_tiny_resnet(num_classes=NC).double()
  msg = tr.load_pretrained_twin_(twin, plain.state_dict())
  assert not msg.unexpected_keys
  assert sorted(msg.missing_keys) == ['fc_downstream.bias', 'fc_downstream.weight']
  sd_p, sd_t = plain.state_dict(), twin.state_dict()
  n_bn = 0
  for k, v in sd_p.items():
    assert torch.equal(sd_t[k], v), k  # Adaptive BN, convs, and fc (the unused head)
    if 'bn' in k or 'downsample.1' in k:
      prefix, field = k.rsplit('.', 1)
      assert torch.equal(sd_t[f'{prefix}.main_bn.{field}'], v), k  # Frozen BN
      n_bn += 1
  assert n_bn == 5 * sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
  # make_twin: the same, plus the head; both branches then compute the plain network.
  t2 = tr.make_twin(plain)
  x, _ = batch(4)
  with torch.no_grad():
    ref = plain.eval()(x)
    torch.testing.assert_close(t2.eval()(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(branch_as_plain(t2, 'frozen').eval()(x), ref)


# --------------------------------------------------------------------------
# PGD
# --------------------------------------------------------------------------


@pytest.mark.parametrize('random_start', [False, True])
def test_pgd_inside_eps_ball_and_box(random_start):
  model = tiny()
  model.train()
  x, y = batch(5)
  x[0, 0, :4, :4] = 0.0  # exercise the [0, 1] clamp at the borders
  x[1, 1, :4, :4] = 1.0
  before = {k: v.clone() for k, v in model.state_dict().items()}
  attack = tr.FastGradientSignUntargeted(model, EPS, ALPHA, 0, 1, 5)
  torch.manual_seed(3)
  x_adv = attack.perturb(x, y, 'mean', random_start)
  assert x_adv.requires_grad  # as officially: still attached to the attack's graph
  x_adv = x_adv.detach()
  assert (x_adv - x).abs().max() <= EPS + 1e-12
  assert (x_adv - x).abs().max() >= EPS - 1e-12  # 5 steps of 2/255 reach the ball edge
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert all(p.grad is None for p in model.parameters())
  assert model.training  # perturb ends with model.train()
  for k, v in model.state_dict().items():  # eval mode: no statistics update
    assert torch.equal(before[k], v), k
  with torch.no_grad():
    model.eval()
    assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_pgd_random_start_injection_and_manual_steps():
  model = tiny().eval()
  x, y = batch(3)
  noise = (torch.rand(x.shape, dtype=x.dtype) * 2 - 1) * EPS
  start = tr.FastGradientSignUntargeted(model, EPS, ALPHA, 0, 1,
                                        0).perturb(x, y, 'mean', True, rand_perturb=noise)
  assert torch.equal(start.detach(), torch.clamp(x + noise, 0, 1))
  assert model.training  # perturb ends with model.train() ...
  model.eval()  # ... and attacks the model in eval mode
  # one step by hand: sign of the mean-CE input gradient, project, clamp
  x0 = torch.clamp(x + noise, 0, 1).requires_grad_(True)
  g, = torch.autograd.grad(F.cross_entropy(model(x0), y), x0)
  expected = torch.clamp(torch.max(torch.min(x0.detach() + ALPHA * g.sign(), x + EPS), x - EPS), 0,
                         1)
  one = tr.FastGradientSignUntargeted(model, EPS, ALPHA, 0, 1,
                                      1).perturb(x, y, 'mean', True, rand_perturb=noise)
  assert torch.equal(one.detach(), expected)
  # default draw: uniform in [-eps, eps]
  torch.manual_seed(0)
  drawn = tr.FastGradientSignUntargeted(model, 0.3, ALPHA, -10, 10, 0).perturb(x, y, 'mean',
                                                                               True).detach() - x
  assert drawn.abs().max() <= 0.3 + 1e-6 and drawn.abs().max() > 0.29


# --------------------------------------------------------------------------
# training iterations
# --------------------------------------------------------------------------


def test_twins_at_iteration_matches_hand_computation():
  n, h = 8, 4
  twin = tiny_twin()
  x, y = batch(n)
  args = args_for(n, learning_rate=0.0, weight_decay=0.0)
  noise = (torch.rand(x.shape, dtype=x.dtype) * 2 - 1) * EPS
  x_adv = adv_examples(twin, x, y, args, noise)
  frozen_net = branch_as_plain(twin, 'frozen').eval()
  adaptive_net = branch_as_plain(twin, 'adaptive').train()
  frozen0 = frozen_buffers(twin)
  with torch.no_grad():
    expected = (0.4 * F.cross_entropy(frozen_net(x_adv[:h]), y[:h]) +
                F.cross_entropy(adaptive_net(x_adv[h:]), y[h:]))
  opt, sched = tr.make_optimizer(twin, args, milestones=[5])
  out = tr.twins_at_iteration(twin, tr.make_attack(twin, args), opt, sched, x, y, args,
                              rand_perturb=noise)
  assert out['loss'] == pytest.approx(float(expected), rel=1e-12)
  for k, v in frozen_buffers(twin).items():
    assert torch.equal(v, frozen0[k]), k
  sd_a = adaptive_net.state_dict()
  for k, v in adaptive_buffers(twin).items():
    torch.testing.assert_close(v, sd_a[k], rtol=1e-12, atol=1e-12)


def test_adaptive_running_stats_update_is_unbiased_momentum_01():
  twin = tiny_twin()
  n, h = 7, 3
  x, y = batch(n)
  args = args_for(n, learning_rate=0.0, weight_decay=0.0)
  noise = torch.zeros_like(x)
  x_adv = adv_examples(twin, x, y, args, noise)
  rm0, rv0 = twin.bn1.running_mean.clone(), twin.bn1.running_var.clone()
  opt, sched = tr.make_optimizer(twin, args, milestones=[5])
  tr.twins_at_iteration(twin, tr.make_attack(twin, args), opt, sched, x, y, args,
                        rand_perturb=noise)
  with torch.no_grad():
    z = twin.conv1(twin.preprocess(x_adv[h:]))
    mu = z.mean(dim=(0, 2, 3))
    var_unbiased = z.var(dim=(0, 2, 3), unbiased=True)
  torch.testing.assert_close(twin.bn1.running_mean, 0.9 * rm0 + 0.1 * mu)
  torch.testing.assert_close(twin.bn1.running_var, 0.9 * rv0 + 0.1 * var_unbiased)


def _bn1_after(model, inputs):
  """bn1's running stats after ordinary train-mode BN updates on ``inputs`` in order."""
  rm = model.bn1.running_mean.clone()
  rv = model.bn1.running_var.clone()
  with torch.no_grad():
    for inp in inputs:
      z = model.conv1(model.preprocess(inp))
      F.batch_norm(z, rm, rv, None, None, training=True, momentum=0.1, eps=1e-5)
  return rm, rv


@pytest.mark.parametrize('twin', [True, False], ids=['twins_trades', 'trades'])
def test_trades_updates_running_stats_with_the_adversarial_batch_first(twin):
  n, h = 8, 4
  model = tiny_twin() if twin else tiny()
  x, y = batch(n)
  args = args_for(n, learning_rate=0.0, weight_decay=0.0)
  noise = (torch.rand(x.shape, dtype=x.dtype) * 2 - 1) * EPS
  x_adv = adv_examples(model, x, y, args, noise)
  part = (lambda t: t[h:]) if twin else (lambda t: t)  # the Adaptive half / whole batch
  adv_first = _bn1_after(model, [part(x_adv), part(x)])
  clean_first = _bn1_after(model, [part(x), part(x_adv)])
  assert not torch.allclose(adv_first[0], clean_first[0], rtol=1e-9, atol=0)
  opt, sched = tr.make_optimizer(model, args, milestones=[5])
  iteration = tr.twins_trades_iteration if twin else tr.trades_iteration
  iteration(model, tr.make_attack(model, args), opt, sched, x, y, args, rand_perturb=noise)
  torch.testing.assert_close(model.bn1.running_mean, adv_first[0], rtol=1e-13, atol=1e-15)
  torch.testing.assert_close(model.bn1.running_var, adv_first[1], rtol=1e-13, atol=1e-15)


def _kl_sum(adv, nat):
  q = F.softmax(nat, 1)
  return (q * (F.log_softmax(nat, 1) - F.log_softmax(adv, 1))).sum()


def test_twins_trades_loss_matches_hand_computation_kl_over_configured_batch():
  n, h, lam, beta, configured = 8, 4, 0.4, 6.0, 128
  twin = tiny_twin()
  x, y = batch(n)
  args = args_for(n, batch_size=configured, learning_rate=0.0, weight_decay=0.0)
  noise = (torch.rand(x.shape, dtype=x.dtype) * 2 - 1) * EPS
  x_adv = adv_examples(twin, x, y, args, noise)
  frozen_net = branch_as_plain(twin, 'frozen').eval()
  adaptive_net = branch_as_plain(twin, 'adaptive').train()
  with torch.no_grad():
    adv_f, adv_a = frozen_net(x_adv[:h]), adaptive_net(x_adv[h:])  # adversarial first
    nat_f, nat_a = frozen_net(x[:h]), adaptive_net(x[h:])
    l_nat = lam * F.cross_entropy(nat_f, y[:h]) + F.cross_entropy(nat_a, y[h:])
    l_rob = lam * _kl_sum(adv_f, nat_f) / configured + _kl_sum(adv_a, nat_a) / configured
  opt, sched = tr.make_optimizer(twin, args, milestones=[5])
  out = tr.twins_trades_iteration(twin, tr.make_attack(twin, args), opt, sched, x, y, args,
                                  rand_perturb=noise)
  assert out['loss_nat'] == pytest.approx(float(l_nat), rel=1e-12)
  assert out['loss_rob'] == pytest.approx(float(l_rob), rel=1e-10)
  assert out['loss'] == pytest.approx(float(l_nat + beta * l_rob), rel=1e-12)
  sd_a = adaptive_net.state_dict()
  for k, v in adaptive_buffers(twin).items():
    torch.testing.assert_close(v, sd_a[k], rtol=1e-12, atol=1e-12)


def test_trades_loss_matches_hand_computation():
  n, beta = 7, 6.0
  model = tiny()
  x, y = batch(n)
  args = args_for(n, learning_rate=0.0, weight_decay=0.0)
  noise = torch.zeros_like(x)
  x_adv = adv_examples(model, x, y, args, noise)
  net = copy.deepcopy(model).train()
  with torch.no_grad():
    adv, nat = net(x_adv), net(x)
    expected = F.cross_entropy(nat, y) + beta * _kl_sum(adv, nat) / n
  opt, sched = tr.make_optimizer(model, args, milestones=[5])
  out = tr.trades_iteration(model, tr.make_attack(model, args), opt, sched, x, y, args,
                            rand_perturb=noise)
  assert out['loss'] == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize('method', tr.METHODS)
@pytest.mark.parametrize('n', [5, 6])
def test_every_method_runs_and_updates_every_used_parameter(method, n):
  twin = method.startswith('twins_')
  model = tiny_twin() if twin else tiny()
  x, y = batch(n)
  args = args_for(n)
  opt, sched = tr.make_optimizer(model, args, milestones=(1,))
  before = {k: p.detach().clone() for k, p in model.named_parameters()}
  frozen0 = frozen_buffers(model)
  torch.manual_seed(1)
  out = tr.ITERATIONS[method](model, tr.make_attack(model, args), opt, sched, x, y, args)
  assert all(isinstance(v, float) for v in out.values())
  assert torch.isfinite(torch.tensor(out['loss']))
  assert out['lr'] == pytest.approx(0.05)
  for k, p in model.named_parameters():
    if twin and k.startswith('fc.'):  # the unused ImageNet head: no gradient
      assert p.grad is None and torch.equal(p, before[k]), k
    else:  # both BN affine sets included
      assert not torch.equal(p, before[k]), k
  for k, v in frozen_buffers(model).items():
    assert torch.equal(v, frozen0[k]), k
  assert model.training
  assert opt.param_groups[0]['lr'] == pytest.approx(0.005)


# --------------------------------------------------------------------------
# optimiser, schedule, test()
# --------------------------------------------------------------------------


def test_at_iteration_is_sgd_with_coupled_weight_decay():
  model = tiny()
  x, y = batch(4)
  lr, wd = 0.1, 0.01
  args = args_for(4, learning_rate=lr, weight_decay=wd, k=1)
  noise = torch.zeros_like(x)
  x_adv = adv_examples(model, x, y, args, noise)
  ref = copy.deepcopy(model).train()
  loss = F.cross_entropy(ref(x_adv), y)
  grads = torch.autograd.grad(loss, list(ref.parameters()))
  opt, sched = tr.make_optimizer(model, args, milestones=[5])
  params0 = [p.detach().clone() for p in model.parameters()]
  tr.at_iteration(model, tr.make_attack(model, args), opt, sched, x, y, args, rand_perturb=noise)
  for p0, g, p in zip(params0, grads, model.parameters()):
    torch.testing.assert_close(p.detach(), p0 - lr * (g + wd * p0))


def test_schedule_per_iteration():
  model = tiny()
  args = args_for(4, learning_rate=1.0)
  opt, sched = tr.make_optimizer(model, args, milestones=(2, 4))
  lrs = []
  for _ in range(6):
    lrs.append(opt.param_groups[0]['lr'])
    opt.step()
    sched.step()
  assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
  _, sched = tr.make_optimizer(model, args, iter_per_epoch=391)
  assert sorted(sched.milestones) == [391 * 30, 391 * 50]


def test_test_function():
  twin = tiny_twin()
  x, y = batch(6)
  args = args_for(6, k=3)
  attack = tr.make_attack(twin, args)
  record = []
  before = {k: v.clone() for k, v in twin.state_dict().items()}
  acc, adv_acc = tr.test(twin, attack, [(x[:4], y[:4]), (x[4:], y[4:])], adv_test=True,
                         record=record)
  assert twin.training  # test() ends with model.train()
  for k, v in twin.state_dict().items():
    assert torch.equal(v, before[k]), k
  clean = torch.cat([r[0] for r in record])
  robust = torch.cat([r[1] for r in record])
  net = branch_as_plain(twin, 'adaptive').eval()
  with torch.no_grad():
    assert torch.equal(clean, net(x).argmax(1) == y)
  x_adv = tr.FastGradientSignUntargeted(net, EPS, ALPHA, 0, 1, 3).perturb(x, y).detach()
  with torch.no_grad():
    net.eval()
    assert torch.equal(robust, net(x_adv).argmax(1) == y)
  assert acc == pytest.approx(float(clean.double().mean()))
  assert adv_acc == pytest.approx(float(robust.double().mean()))
  _, no_adv = tr.test(twin, attack, [(x, y)], adv_test=False)
  assert no_adv == -1.0


def test_randomize_bn_is_nontrivial():
  m = tiny_twin()
  bns = [mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._NormBase)]
  assert len(bns) == 2 * sum(isinstance(mod, tr.MixBatchNorm2d) for mod in m.modules())
  for bn in bns:
    assert (bn.running_var > 0.49).all() and (bn.running_var < 2.01).all()
    assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
