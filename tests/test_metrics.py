"""Tests of metrics.py: the toy metric (Frechet distance, blur, the CIFAR-10 classifier and its
score) and FID / IS with pytorch-fid's Inception-v3 (random weights, no download): layout,
pools, input contract, loading and downloading the weights, FID and IS closed forms. The
cached-classifier test skips without out/cifar-classifier.pt and ../shared/data."""

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import metrics

from conftest import CIFAR_ROOT


# ---------------------------------------------------------------------------------------
# the toy metric: CIFAR-10 classifier + Frechet distance
# ---------------------------------------------------------------------------------------

def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 6))
    mu, sigma = metrics.feature_statistics(f)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9          # FD(a, a) = 0
    # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    m1, m2, s1, s2 = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expect = ((m1 - m2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    got = metrics.frechet_distance(m1, np.diag(s1), m2, np.diag(s2))
    assert got == pytest.approx(expect, rel=1e-9)
    # Non-commuting full covariances: symmetric, and equal to the formula with
    # Tr((S1 S2)^(1/2)) from the eigenvalues of S1 S2 (real and >= 0, since it is similar
    # to a PSD matrix).
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    S1, S2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    tr = np.sqrt(np.linalg.eigvals(S1 @ S2).real.clip(0)).sum()
    expect = ((m1 - m2) ** 2).sum() + np.trace(S1) + np.trace(S2) - 2 * tr
    assert metrics.frechet_distance(m1, S1, m2, S2) == pytest.approx(expect, rel=1e-8)
    assert metrics.frechet_distance(m2, S2, m1, S1) == pytest.approx(expect, rel=1e-8)
    with pytest.raises(ValueError, match='shapes'):
        metrics.frechet_distance(m1, S1, m2[:5], S2[:5, :5])


def test_blur_through_is_area_down_bicubic_up():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(metrics.blur_through(x, 32), x)               # no bottleneck: identity
    flat = np.full((1, 32, 32, 3), 77, np.uint8)
    assert np.array_equal(metrics.blur_through(flat, 4), flat)          # a constant survives
    b8 = metrics.blur_through(x, 8).astype(float)
    # The 8x8 block means survive (area down of the blurred image ~ area down of the image).
    down = lambda im: im.reshape(-1, 8, 4, 8, 4, 3).mean(axis=(2, 4))
    assert np.abs(down(b8) - down(x.astype(float))).mean() < 12
    assert np.abs(b8 - x).mean() > 40                                   # and the detail is gone


class _FixedClassifier(torch.nn.Module):
    """Logits = the mean colour of the image (3 classes: red, green, blue dominant)."""

    def forward(self, x):
        f = x.float().mean(dim=(2, 3))                                   # (B, 3)
        return f, f


def test_score_counts_the_conditioning_labels_and_measures_fd():
    imgs = np.zeros((6, 32, 32, 3), np.uint8)
    for i in range(6):
        imgs[i, ..., i % 3] = 200 + i                                    # image i is colour i % 3
    labels = np.array([0, 1, 2, 0, 1, 0])                                # the last one is wrong
    mu, sigma = metrics.feature_statistics(np.random.default_rng(0).normal(size=(50, 3)))
    r = metrics.score(_FixedClassifier(), imgs, labels, (mu, sigma))
    assert r['acc'] == pytest.approx(5 / 6) and r['n'] == 6
    _, feats = metrics.classify(_FixedClassifier(), imgs)
    assert r['fd'] == pytest.approx(metrics.frechet_distance(*metrics.feature_statistics(feats), mu, sigma))


def test_classifier_learns_shapes_in_one_epoch():
    x, y = data.make_shapes(1200, seed=0)
    xt, yt = data.make_shapes(300, seed=1)
    model, acc = metrics.train_classifier(x, y, xt, yt, epochs=2, batch_size=64, lr=0.1, log=lambda *a: None)
    logits, feats = metrics.classify(model, xt)
    assert logits.shape == (300, 10) and feats.shape == (300, 128)
    assert acc == float((logits.argmax(1) == yt).mean()) and acc > 0.5  # chance is 0.1


def test_cached_cifar_classifier_reaches_85_percent_on_the_test_set():
    path = Path(metrics.DEFAULT_CLASSIFIER)
    if not path.is_file():
        pytest.skip(f"{path} not found: `python metrics.py train-classifier` makes it (minutes)")
    if not (CIFAR_ROOT / 'cifar-10-batches-py').is_dir():
        pytest.skip(f"real CIFAR-10 not found under {CIFAR_ROOT}")
    model, ck = metrics.load_classifier(str(path))
    xte, yte = data.load_cifar10(str(CIFAR_ROOT), train=False)
    acc = metrics.accuracy(model, xte, yte)
    assert acc >= 0.85 and acc == pytest.approx(ck['test_acc'], abs=1e-6)
    calib = ck['calibration']   # the calibration rows are ordered as the metric promises
    assert calib['real train images']['acc'] > calib['real, blurred 8x8']['acc'] > calib['uniform noise']['acc']
    assert calib['real train images']['fd'] < calib['real, blurred 8x8']['fd'] < calib['real, blurred 4x4']['fd']


# ---------------------------------------------------------------------------------------
# FID / IS: pytorch-fid's Inception-v3 with random weights (no download)
# ---------------------------------------------------------------------------------------

def _calibrate(model, seed):
    """Set every BatchNorm's running statistics to those of one batch of random images, as
    trained BatchNorm layers would be: the random network's activations are then O(1). (With
    PyTorch's default init and unit statistics they shrink to ~1e-7 by Mixed_7c, which
    would make every absolute tolerance below vacuous.)"""
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None                 # cumulative average: = the one batch's statistics
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.train()(torch.rand(4, 3, 64, 64, generator=g))
    return model.eval()


@pytest.fixture(scope='module')
def net():
    torch.manual_seed(0)
    return _calibrate(metrics.FIDInceptionV3(), seed=100)


# ---------------------------------------------------------------------------------------
# The network: pytorch-fid's state-dict layout
# ---------------------------------------------------------------------------------------

def test_inception_state_dict_matches_pytorch_fid(net):
    sd = net.state_dict()
    # 94 conv+BN units x (conv.weight, bn.{weight, bias, running_mean, running_var,
    # num_batches_tracked}) + fc.{weight, bias}
    assert len(sd) == 94 * 6 + 2 == 566
    assert sum(k.endswith('num_batches_tracked') for k in sd) == 94
    expected = {
        'Conv2d_1a_3x3.conv.weight': (32, 3, 3, 3),
        'Conv2d_1a_3x3.bn.running_mean': (32,),
        'Conv2d_2b_3x3.conv.weight': (64, 32, 3, 3),
        'Conv2d_4a_3x3.conv.weight': (192, 80, 3, 3),
        'Mixed_5b.branch1x1.conv.weight': (64, 192, 1, 1),
        'Mixed_5b.branch5x5_2.conv.weight': (64, 48, 5, 5),
        'Mixed_5b.branch_pool.conv.weight': (32, 192, 1, 1),
        'Mixed_5d.branch_pool.conv.weight': (64, 288, 1, 1),
        'Mixed_6a.branch3x3.conv.weight': (384, 288, 3, 3),
        'Mixed_6b.branch7x7_2.conv.weight': (128, 128, 1, 7),
        'Mixed_6b.branch7x7dbl_2.conv.weight': (128, 128, 7, 1),
        'Mixed_6e.branch7x7dbl_5.conv.weight': (192, 192, 1, 7),
        'Mixed_7a.branch3x3_2.conv.weight': (320, 192, 3, 3),
        'Mixed_7a.branch7x7x3_4.conv.weight': (192, 192, 3, 3),
        'Mixed_7b.branch3x3dbl_1.conv.weight': (448, 1280, 1, 1),
        'Mixed_7b.branch3x3_2b.conv.weight': (384, 384, 3, 1),
        'Mixed_7c.branch3x3dbl_3a.conv.weight': (384, 384, 1, 3),
        'Mixed_7c.branch_pool.conv.weight': (192, 2048, 1, 1),
        'Mixed_7c.branch_pool.bn.running_var': (192,),
        'fc.weight': (1008, 2048),
        'fc.bias': (1008,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any('AuxLogits' in k for k in sd)
    assert all(m.bias is None for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # torchvision's inception_v3(aux_logits=False) has 23,834,568 parameters with a 1000-way
    # fc; pytorch-fid's 1008-way fc adds 8 * 2048 + 8 = 16,392
    assert sum(p.numel() for p in net.parameters()) == 23_834_568 + 16_392 == 23_850_960


def test_inception_forward_shapes_and_logits(net):
    torch.manual_seed(1)
    seen = {}
    handle = net.Mixed_7c.register_forward_hook(lambda mod, args, out: seen.update(x=out))
    for h, w in [(32, 32), (64, 80)]:
        x = torch.rand(2, 3, h, w)
        with torch.no_grad():
            f, l = net(x)
        assert f.shape == (2, 2048) and l.shape == (2, 1008)
        # features: the mean over the final 8x8 grid (pytorch-fid's adaptive avg pool)
        assert seen['x'].shape == (2, 2048, 8, 8)
        torch.testing.assert_close(f, seen['x'].mean((2, 3)), rtol=1e-5, atol=0)
        assert torch.isfinite(f).all() and (f >= 0).all() and 0.05 < f.std() < 20   # after relu
        # logits without fc.bias, as the original IS code (and torch-fidelity's 'logits_unbiased')
        torch.testing.assert_close(l, f @ net.fc.weight.T)
    handle.remove()


class _Stop(Exception):
    pass


def test_inception_input_contract(net):
    """The first conv sees the image resized to 299x299 (bilinear, align_corners=False) and
    mapped from [0, 1] to [-1, 1], as pytorch-fid's InceptionV3(resize_input, normalize_input)."""
    seen = {}

    def hook(mod, args):
        seen['x'] = args[0]
        raise _Stop                             # no need to run the rest of the network

    handle = net.Conv2d_1a_3x3.register_forward_pre_hook(hook)
    try:
        torch.manual_seed(2)
        x = torch.rand(2, 3, 64, 80)
        for inp, want in [(x, 2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1),
                          (torch.zeros(1, 3, 40, 40), -torch.ones(1, 3, 299, 299)),
                          (torch.ones(1, 3, 299, 299), torch.ones(1, 3, 299, 299))]:
            with pytest.raises(_Stop):
                net(inp)
            torch.testing.assert_close(seen['x'], want)
    finally:
        handle.remove()


def _pool_branch(block, x):
    """The pool branch of an Inception block (the last channels of its output) with its 1x1
    conv + BN set to the identity on the first n channels: relu(pool(x))[:, :n]."""
    conv, bn = block.branch_pool.conv, block.branch_pool.bn
    n, cin = conv.weight.shape[:2]
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 0, 0] = torch.eye(n, cin)
        bn.weight.fill_(1), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1 - bn.eps)
        return block(x)[:, -n:], n


def test_inception_fid_pools():
    """pytorch-fid's patches: avg pools that ignore padded zeros (TF) in Mixed_5b-d, 6b-e,
    7b; a max pool in Mixed_7c. References written with explicit 3x3 windows."""
    torch.manual_seed(3)
    net = metrics.FIDInceptionV3().eval()
    for name, kind in [('Mixed_5b', 'avg'), ('Mixed_5d', 'avg'), ('Mixed_6b', 'avg'),
                       ('Mixed_6e', 'avg'), ('Mixed_7b', 'avg'), ('Mixed_7c', 'max')]:
        block = getattr(net, name)
        cin = block.branch_pool.conv.weight.shape[1]
        x = torch.rand(1, cin, 5, 6) + 0.5                  # positive: relu is the identity
        got, n = _pool_branch(block, x)
        xs = x[:, :n]
        if kind == 'avg':                                   # window sum / number of real pixels
            ones = torch.ones(n, 1, 3, 3)
            s = F.conv2d(F.pad(xs, (1, 1, 1, 1)), ones, groups=n)
            c = F.conv2d(F.pad(torch.ones_like(xs), (1, 1, 1, 1)), ones, groups=n)
            want = s / c
            assert c[0, 0, 0, 0] == 4 and c[0, 0, 2, 2] == 9
        else:
            want = F.pad(xs, (1, 1, 1, 1), value=-math.inf).unfold(2, 3, 1).unfold(3, 3, 1).amax((-1, -2))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


# Each block's branches in concatenation order: (the conv units of the chain, its width);
# 'pool' = the parameter-free max-pool passthrough of the grid reductions (torchvision's order)
_A = [(['branch1x1'], 64), (['branch5x5_1', 'branch5x5_2'], 64),
      (['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'], 96), (['branch_pool'], None)]


_B = [(['branch3x3'], 384), (['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'], 96), ('pool', None)]


_C = [(['branch1x1'], 192), ([f'branch7x7_{i}' for i in (1, 2, 3)], 192),
      ([f'branch7x7dbl_{i}' for i in (1, 2, 3, 4, 5)], 192), (['branch_pool'], 192)]


_D = [(['branch3x3_1', 'branch3x3_2'], 320), ([f'branch7x7x3_{i}' for i in (1, 2, 3, 4)], 192), ('pool', None)]


_E = [(['branch1x1'], 320), (['branch3x3_1', 'branch3x3_2a'], 384), (['branch3x3_1', 'branch3x3_2b'], 384),
      (['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3a'], 384),
      (['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3b'], 384), (['branch_pool'], 192)]


def _set_unit(unit, identity):
    """A conv+BN+relu unit as the identity on the first channels (centre tap; stride-2 convs
    subsample) or as zero."""
    conv, bn = unit.conv, unit.bn
    kh, kw = conv.weight.shape[2:]
    conv.weight.zero_()
    if identity:
        conv.weight[:, :, kh // 2, kw // 2] = torch.eye(*conv.weight.shape[:2])
    bn.weight.fill_(1), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1 - bn.eps)


@torch.no_grad()
def test_inception_block_layout():
    """Channel counts, branch wiring and concatenation order of every kind of block, against
    the layout above (torchvision's): with random weights each conv branch's channel slice
    is its chain of units applied in order; with one chain set to the identity and every
    other conv to zero, only that branch's slice (and the max-pool passthrough of B / D) is
    non-zero."""
    torch.manual_seed(11)
    net = metrics.FIDInceptionV3().eval()
    for name, cin, cout, layout in [('Mixed_5b', 192, 256, _A), ('Mixed_5d', 288, 288, _A),
                                    ('Mixed_6a', 288, 768, _B), ('Mixed_6b', 768, 768, _C),
                                    ('Mixed_6d', 768, 768, _C), ('Mixed_7a', 768, 1280, _D),
                                    ('Mixed_7b', 1280, 2048, _E), ('Mixed_7c', 2048, 2048, _E)]:
        block = getattr(net, name)
        x = torch.rand(1, cin, 7, 7) + 0.5
        widths = [cin if units == 'pool' else w or block.branch_pool.conv.weight.shape[0]
                  for units, w in layout]
        assert sum(widths) == cout, name
        edges = np.cumsum([0] + widths)
        # random weights: each conv branch's slice is its chain applied in order
        y = block(x)
        for i, (units, _) in enumerate(layout):
            if units not in ('pool', ['branch_pool']):
                h = x
                for u in units:
                    h = getattr(block, u)(h)
                assert h.abs().max() > 0
                torch.testing.assert_close(y[:, edges[i]:edges[i + 1]], h, rtol=1e-4,
                                           atol=1e-5 * h.abs().max().item(), msg=f'{name} {units}')
        # one chain at the identity, the other convs at zero: only its slice is non-zero
        for i, (units, _) in enumerate(layout):
            if units == 'pool':
                continue
            for unit in block.children():
                _set_unit(unit, identity=False)
            for u in units:
                _set_unit(getattr(block, u), identity=True)
            y = block(x)
            hw = 3 if layout[-1][0] == 'pool' else 7          # grid reductions: 7x7 -> 3x3
            assert y.shape == (1, cout, hw, hw), name
            inside = torch.zeros(cout, dtype=torch.bool)
            inside[edges[i]:edges[i + 1]] = True
            if layout[-1][0] == 'pool':                       # the passthrough: max pool of x
                assert torch.equal(y[:, -cin:], F.max_pool2d(x, 3, stride=2)), name
                inside[-cin:] = True
            assert (y[:, edges[i]:edges[i + 1]].abs().sum((2, 3)) > 0).any(), (name, units)
            assert (y[:, ~inside] == 0).all(), (name, units)


# ---------------------------------------------------------------------------------------
# Loading and downloading the weights
# ---------------------------------------------------------------------------------------

def test_load_inception_round_trip(tmp_path, net):
    torch.manual_seed(4)
    src = _calibrate(metrics.FIDInceptionV3(), seed=5)
    path = str(tmp_path / 'w.pth')
    torch.save(src.state_dict(), path)
    x = torch.rand(1, 3, 48, 48)
    loaded = metrics.load_inception(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        want, got, other = src(x), loaded(x), net(x)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert not torch.equal(want[0], other[0])          # the weights did change the output

    # a file without the num_batches_tracked counters, in torch's pre-1.6 (non-zip) format,
    # as a 2018 file may be, loads too
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith('num_batches_tracked')}
    assert len(sd) == 472
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    with torch.no_grad():
        assert torch.equal(metrics.load_inception(path)(x)[0], want[0])


def test_load_inception_errors(tmp_path):
    sd = metrics.FIDInceptionV3().state_dict()
    path = str(tmp_path / 'w.pth')
    # one key renamed: both names in the message
    bad = dict(sd)
    bad['Mixed_6c.branch7x7_2.conv.weights'] = bad.pop('Mixed_6c.branch7x7_2.conv.weight')
    torch.save(bad, path)
    with pytest.raises(RuntimeError, match=r'Mixed_6c\.branch7x7_2\.conv\.weight') as e:
        metrics.load_inception(path)
    assert 'Mixed_6c.branch7x7_2.conv.weights' in str(e.value) and metrics.INCEPTION_FILE in str(e.value)
    # one key missing / one extra key: named
    bad = {k: v for k, v in sd.items() if k != 'Mixed_7c.branch_pool.bn.running_var'}
    torch.save(bad, path)
    with pytest.raises(RuntimeError, match=r"missing keys \['Mixed_7c\.branch_pool\.bn\.running_var'\]"):
        metrics.load_inception(path)
    torch.save(dict(sd, **{'AuxLogits.fc.weight': torch.zeros(1008, 768)}), path)
    with pytest.raises(RuntimeError, match=r"unexpected keys \['AuxLogits\.fc\.weight'\]"):
        metrics.load_inception(path)
    # a wrong shape (1000-way fc, torchvision's ImageNet head)
    bad = dict(sd)
    bad['fc.weight'], bad['fc.bias'] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(bad, path)
    with pytest.raises(RuntimeError, match='fc.weight'):
        metrics.load_inception(path)
    # a missing file: where to get it
    with pytest.raises(FileNotFoundError, match='download_inception') as e:
        metrics.load_inception(str(tmp_path / 'nope.pth'))
    assert metrics.INCEPTION_URL in str(e.value)


def test_download_inception_checks_sha256(tmp_path):
    src = tmp_path / 'src.bin'
    payload = np.random.default_rng(0).bytes(3 << 20)          # 3 MB: several read blocks
    src.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    url = src.as_uri()                                          # file:///...
    dest = tmp_path / 'sub' / 'w.pth'

    assert metrics.download_inception(str(dest), url=url, sha256_prefix=digest[:8]) == str(dest)
    assert dest.read_bytes() == payload and os.listdir(tmp_path / 'sub') == ['w.pth']

    dest.unlink()
    bad_prefix = ('0' if digest[0] != '0' else '1') + digest[1:8]
    with pytest.raises(ValueError, match='sha256'):
        metrics.download_inception(str(dest), url=url, sha256_prefix=bad_prefix)
    assert os.listdir(tmp_path / 'sub') == []                 # nothing left behind

    with pytest.raises(RuntimeError, match='could not download'):
        metrics.download_inception(str(dest), url=(tmp_path / 'missing.bin').as_uri())
    assert os.listdir(tmp_path / 'sub') == []                 # nothing left behind


def test_inception_activations_batches(net, capsys):
    rng = np.random.default_rng(6)
    imgs = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    f, l = metrics.inception_activations(net, imgs, batch_size=2, log_every=1)
    assert f.shape == (3, 2048) and l.shape == (3, 1008) and f.dtype == l.dtype == np.float64
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want_f, want_l = net(x)
    # batches of 2 vs one batch of 3: float32 rounding differs, hence the scale-relative atol
    for got, want in [(f, want_f), (l, want_l)]:
        want = want.double().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    out = capsys.readouterr().out
    assert '2/3 images' in out and '3/3 images' in out and 'ETA' in out
    with pytest.raises(ValueError, match='uint8'):
        metrics.inception_activations(net, imgs.astype(np.float32))


# ---------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------

def test_fid_same_features_is_zero_and_symmetric(tmp_path):
    rng = np.random.default_rng(7)
    a = rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64))
    b = 0.5 + rng.normal(size=(250, 64)) @ rng.normal(size=(64, 64))
    path = str(tmp_path / 'ref.npz')
    mu, sigma = metrics.save_reference_stats(a, path)
    with np.load(path) as z:
        assert sorted(z.files) == ['mu', 'sigma'] and z['sigma'].shape == (64, 64)
        np.testing.assert_array_equal(z['mu'], mu)
    assert abs(metrics.fid_from_features(a, path)) < 1e-6
    assert abs(metrics.fid_from_features(a, {'mu': mu, 'sigma': sigma})) < 1e-6
    ab = metrics.fid_from_features(a, {'mu': b.mean(0), 'sigma': np.cov(b, rowvar=False)})
    ba = metrics.fid_from_features(b, path)
    assert ab > 1 and abs(ab - ba) < 1e-8 * ab


def _tr_sqrt_newton_schulz(s1, s2, iters=60):
    """Tr((S1 S2)^(1/2)) by the coupled Newton-Schulz iteration on A = S1 S2 (whose
    eigenvalues are real and >= 0): Y -> A^(1/2), Z -> A^(-1/2)."""
    a = s1 @ s2
    norm = np.linalg.norm(a)
    y, z, eye = a / norm, np.eye(len(a)), np.eye(len(a))
    for _ in range(iters):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return np.trace(y) * np.sqrt(norm)


def test_fid_closed_forms():
    rng = np.random.default_rng(8)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    d = 10
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert abs(metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) - want) < 1e-9

    # 2x2, non-commuting: a 2x2 matrix with eigenvalues l1, l2 >= 0 has
    # Tr(A^(1/2)) = sqrt(l1) + sqrt(l2) = sqrt(Tr A + 2 sqrt(det A))
    S1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    S2 = np.array([[1.0, -0.3], [-0.3, 0.5]])
    assert not np.allclose(S1 @ S2, S2 @ S1)
    A = S1 @ S2
    tr_sqrt = math.sqrt(np.trace(A) + 2 * math.sqrt(np.linalg.det(A)))
    m1, m2 = np.array([1.0, -2.0]), np.array([0.5, 0.0])
    want = ((m1 - m2) ** 2).sum() + np.trace(S1) + np.trace(S2) - 2 * tr_sqrt
    assert abs(metrics.frechet_distance(m1, S1, m2, S2) - want) < 1e-10

    # d = 16, random full-rank covariances, against a Newton-Schulz square root
    d = 16
    X, Y = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    S1, S2 = X @ X.T / d + 0.1 * np.eye(d), Y @ Y.T / d + 0.1 * np.eye(d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    want = ((m1 - m2) ** 2).sum() + np.trace(S1) + np.trace(S2) - 2 * _tr_sqrt_newton_schulz(S1, S2)
    assert abs(metrics.frechet_distance(m1, S1, m2, S2) - want) < 1e-8 * max(1, abs(want))


# ---------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------

def test_inception_score_bounds():
    # the same (here uniform) prediction for every image: p(y|x) = p(y), KL = 0, IS = 1
    mean, std = metrics.inception_score(np.zeros((50, 1008)), splits=5)
    assert abs(mean - 1) < 1e-12 and std < 1e-12
    mean, _ = metrics.inception_score(np.tile(np.random.default_rng(9).normal(size=1008), (20, 1)), splits=2)
    assert abs(mean - 1) < 1e-9

    # confident and diverse: N images per split, one-hot on N distinct classes -> IS = N
    n, splits = 12, 4
    logits = np.zeros((n * splits, 1008))
    for s in range(splits):
        logits[s * n + np.arange(n), 100 * s + np.arange(n)] = 60.0   # other classes at 0
    mean, std = metrics.inception_score(logits, splits=splits)
    assert abs(mean - n) < 1e-6 and std < 1e-6

    # splits of different diversity: N = 3 and 6 distinct classes -> scores 3 and 6
    logits = np.zeros((12, 1008))
    logits[np.arange(6), [0, 1, 2, 0, 1, 2]] = 60.0
    logits[6 + np.arange(6), np.arange(6)] = 60.0
    mean, std = metrics.inception_score(logits, splits=2)
    assert abs(mean - 4.5) < 1e-6 and abs(std - 1.5) < 1e-6

    with pytest.raises(ValueError):
        metrics.inception_score(np.zeros((3, 1008)), splits=10)


def test_inception_score_matches_direct_formula():
    """Soft predictions: against exp(mean_x sum_y p(y|x) log(p(y|x) / p(y))) written out."""
    rng = np.random.default_rng(10)
    logits = 3 * rng.normal(size=(40, 1008))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = []
    for part in np.split(p, 4):
        py = part.mean(0)
        want.append(np.exp(np.mean(np.sum(part * np.log(part / py), 1))))
    mean, std = metrics.inception_score(logits, splits=4)
    assert abs(mean - np.mean(want)) < 1e-9 * mean and abs(std - np.std(want)) < 1e-9 * mean
    assert mean > 1
