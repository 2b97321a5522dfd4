"""
Sample quality, offline, in plain PyTorch: the evaluation half of the paper's Sec. 4.

Two metrics, one per kind of run:

  1. CIFAR-10 toy (32x32): a small CNN classifier trained here on CIFAR-10 train
     (one command, run once on a CPU, cached in out/cifar-classifier.pt; its training
     time, accuracy and calibration: docs/metrics.md).
     Scoring a sample set gives
       (a) the classifier's accuracy on the samples w.r.t. their conditioning labels,
       (b) the Frechet distance (FD) between the classifier's penultimate features of the
           samples and of the CIFAR-10 test set,
     next to calibration rows computed the same way (real training images, real images
     blurred through 8x8 and 4x4, uniform noise). The 8x8 row is what a perfect generator
     behind a 4x8x8 latent could reach if its decoder were a plain upsampler.

         python metrics.py train-classifier --data-dir data
         python metrics.py score out/cifar-toy/samples10k.npz --data-dir data

  2. ImageNet (256x256): FID and Inception Score with an Inception-v3 whose parameter
     names match the pytorch-fid weights file, loaded from a path you give.

In file order: the Frechet distance; 1. the classifier, its training, the calibration
rows, the cached classifier and the score table; 2. the Inception-v3, its weights, FID
and IS; the command line.

Only torch, numpy and pillow are used.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data  # data.py: the CIFAR-10 reader (downloads when absent), atomic_save


# ---------------------------------------------------------------------------------------
# The Frechet distance between two Gaussians (Heusel et al. 2017, "GANs trained by a two
# time-scale update rule", the "FID" formula):
#     FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))
# Tr((S1 S2)^(1/2)) is computed without scipy: S1 S2 is similar to the symmetric PSD
# matrix S1^(1/2) S2 S1^(1/2), so its square root's trace is the sum of the square roots
# of that matrix's eigenvalues.
# ---------------------------------------------------------------------------------------

def _sqrtm_psd(a):
    """Square root of a symmetric positive semi-definite matrix (float64 numpy)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FD between N(mu1, sigma1) and N(mu2, sigma2); mu: (d,), sigma: (d, d). -> float."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape}")
    r = _sqrtm_psd(sigma1)
    eig = np.linalg.eigvalsh(r @ sigma2 @ r)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()   # Tr((S1 S2)^(1/2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def feature_statistics(features):
    """(N, d) features -> (mu (d,), sigma (d, d)), float64, sigma with N - 1 (as pytorch-fid)."""
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


# ---------------------------------------------------------------------------------------
# 1. The CIFAR-10 classifier of the toy metric
#
# A small ResNet-free CNN in the style of Keller Jordan's "airbench" (2024): three blocks of
# conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU, global max pooling, a linear head.
# Widths (32, 64, 128) keep it at ~50 MFLOP per image, small enough to train on a CPU
# (training time and accuracy: docs/metrics.md). Its penultimate layer (128 values after
# the global pool) is the feature space of the Frechet distance, the way FID uses
# Inception's pool3.
# ---------------------------------------------------------------------------------------

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _conv_bn(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


class CifarClassifier(nn.Module):
    """(B, 3, 32, 32) uint8-range images -> (logits (B, 10), features (B, widths[-1]))."""

    def __init__(self, widths=(32, 64, 128), num_classes=10):
        super().__init__()
        self.config = dict(widths=list(widths), num_classes=num_classes)
        w0, layers = 24, [nn.Conv2d(3, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.GELU()]
        for w in widths:  # block: conv at the current size, pool /2, conv at the new size
            layers += [nn.Conv2d(w0, w, 3, padding=1, bias=False), nn.MaxPool2d(2),
                       nn.BatchNorm2d(w), nn.GELU(), *_conv_bn(w, w)]
            w0 = w
        self.body = nn.Sequential(*layers)                     # (B, w, 4, 4)
        self.head = nn.Linear(w0, num_classes, bias=False)
        self.register_buffer('mean', torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer('std', torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, x):
        x = (x.float() - self.mean) / self.std                 # (B, 3, 32, 32) standardised
        feats = self.body(x).amax(dim=(2, 3))                  # (B, w): global max pool
        return self.head(feats), feats


def _to_nchw(images_uint8):
    """uint8 numpy (N, H, W, 3) -> uint8 tensor (N, 3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2)


BLUR_SIZES = (6, 8, 12, 16)


def _augment(x, g, pad=2, blur_p=0.4):
    """Random horizontal flip, a random translation by up to `pad` pixels (reflect
    padding), and with probability blur_p a blur through a random bottleneck size from
    BLUR_SIZES (area down, bicubic up, as blur_through), per image. x: (B, 3, H, W) float
    -> same shape. The blur makes the classifier read blurry images too: without it, it
    misread most VAE reconstructions of real images, so no generator behind that VAE could
    have scored well (docs/metrics.md, calibration)."""
    B, _, H, W = x.shape
    flip = torch.rand(B, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    size = torch.randint(0, len(BLUR_SIZES), (B,), generator=g)
    blur = torch.rand(B, generator=g) < blur_p
    for k, s in enumerate(BLUR_SIZES):
        idx = (blur & (size == k)).nonzero().flatten()
        if len(idx):
            y = F.interpolate(F.interpolate(x[idx], size=(s, s), mode='area'), size=(H, W),
                              mode='bicubic', align_corners=False)
            x[idx] = y.clamp(0, 255)
    xp = F.pad(x, (pad,) * 4, mode='reflect')                       # (B, 3, H + 2p, W + 2p)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B), generator=g)
    out = torch.empty_like(x)
    for sy in range(2 * pad + 1):                                   # 25 groups of shifts
        for sx in range(2 * pad + 1):
            idx = ((dy == sy) & (dx == sx)).nonzero().flatten()
            if len(idx):
                out[idx] = xp[idx, :, sy:sy + H, sx:sx + W]
    return out


@torch.no_grad()
def classify(model, images_uint8, batch_size=1000, device='cpu'):
    """uint8 (N, 32, 32, 3) -> (logits (N, 10), features (N, d)) as float64 numpy."""
    model.eval()
    logits, feats = [], []
    for i in range(0, len(images_uint8), batch_size):
        x = _to_nchw(images_uint8[i:i + batch_size]).to(device).float()
        lo, fe = model(x.contiguous(memory_format=torch.channels_last))
        logits.append(lo.double().cpu()), feats.append(fe.double().cpu())
    return torch.cat(logits).numpy(), torch.cat(feats).numpy()


def train_classifier(train_images, train_labels, test_images, test_labels, *, epochs=10,
                     batch_size=256, lr=0.2, weight_decay=5e-4, label_smoothing=0.2, seed=0,
                     device='cpu', log=print):
    """Train CifarClassifier with SGD (Nesterov), a triangular lr schedule (linear up for
    the first 20% of the steps, then linearly down to 0), label smoothing, flips, 2-pixel
    translations and random blur (_augment). Returns (model in eval mode, test accuracy)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = CifarClassifier().to(device).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0)],
                          lr=lr, momentum=0.9, nesterov=True)
    x_all, y_all = _to_nchw(train_images), torch.as_tensor(train_labels)
    steps_per_epoch = len(x_all) // batch_size
    total = epochs * steps_per_epoch
    step, t0 = 0, time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=g)
        for k in range(steps_per_epoch):
            frac = step / total
            for group in opt.param_groups:        # triangular schedule
                group['lr'] = lr * (frac / 0.2 if frac < 0.2 else (1 - frac) / 0.8)
            idx = order[k * batch_size:(k + 1) * batch_size]
            x = _augment(x_all[idx].float(), g).to(device).contiguous(memory_format=torch.channels_last)
            logits, _ = model(x)
            loss = F.cross_entropy(logits, y_all[idx].to(device), label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        rate = step * batch_size / (time.time() - t0)
        acc = accuracy(model, test_images, test_labels, device=device)
        log(f"[classifier] epoch {epoch + 1}/{epochs} loss {loss.item():.3f} test acc {acc:.4f} "
            f"{rate:.0f} img/s ETA {(total - step) * batch_size / rate / 60:.1f} min")
    return model.eval(), acc


def accuracy(model, images_uint8, labels, device='cpu'):
    logits, _ = classify(model, images_uint8, device=device)
    return float((logits.argmax(1) == np.asarray(labels)).mean())


def blur_through(images_uint8, size):
    """Real images seen through a size x size bottleneck: area down to (size, size), bicubic
    back up, rounded to uint8. (N, H, W, 3) -> same shape. The calibration rows use 8x8
    (the latent grid of the toy VAE) and 4x4."""
    x = _to_nchw(images_uint8).float()
    y = F.interpolate(F.interpolate(x, size=(size, size), mode='area'),
                      size=x.shape[-2:], mode='bicubic', align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def score(model, images_uint8, labels, ref_stats, device='cpu'):
    """The toy metric of one image set: dict(acc, fd). acc = share of images the classifier
    labels as `labels`; fd = Frechet distance of the penultimate features to ref_stats
    (mu, sigma) of the CIFAR-10 test set."""
    logits, feats = classify(model, images_uint8, device=device)
    mu, sigma = feature_statistics(feats)
    return dict(acc=float((logits.argmax(1) == np.asarray(labels)).mean()),
                fd=frechet_distance(mu, sigma, *ref_stats), n=len(images_uint8))


def calibration(model, train_images, train_labels, test_images, n=10000, seed=0, device='cpu'):
    """Reference statistics of the CIFAR-10 test set, and the calibration rows, each scored
    exactly like a sample set of n images: n real training images, the same images blurred
    through 8x8 and 4x4, and n images of uniform noise (with the training labels)."""
    _, feats = classify(model, test_images, device=device)
    ref = feature_statistics(feats)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(train_images), n, replace=False))
    real, labels = train_images[idx], np.asarray(train_labels)[idx]
    noise = rng.integers(0, 256, real.shape, dtype=np.uint8)
    rows = {'real train images': real, 'real, blurred 8x8': blur_through(real, 8),
            'real, blurred 4x4': blur_through(real, 4), 'uniform noise': noise}
    return ref, {name: score(model, imgs, labels, ref, device) for name, imgs in rows.items()}


# ---- the cached classifier and its calibration --------------------------------------------

DEFAULT_CLASSIFIER = os.path.join('out', 'cifar-classifier.pt')


def load_cifar(data_dir):
    return (*data.load_cifar10(data_dir, train=True, download=True),
            *data.load_cifar10(data_dir, train=False, download=True))


def build_classifier(path, data_dir, epochs=10, seed=0, device='cpu', log=print):
    """Train the classifier, compute the test-set statistics and the calibration rows,
    and save everything to `path` (atomically; loads with weights_only=True)."""
    xtr, ytr, xte, yte = load_cifar(data_dir)
    t0 = time.time()
    model, acc = train_classifier(xtr, ytr, xte, yte, epochs=epochs, seed=seed, device=device, log=log)
    (mu, sigma), rows = calibration(model, xtr, ytr, xte, device=device)
    ckpt = dict(model=model.state_dict(), config=model.config, test_acc=acc, epochs=epochs,
                seed=seed, ref_mu=torch.from_numpy(mu), ref_sigma=torch.from_numpy(sigma),
                calibration=rows, train_seconds=time.time() - t0)
    data.atomic_save(ckpt, path)
    log(f"[classifier] test accuracy {acc:.4f}; {time.time() - t0:.0f}s; saved to {path}")
    return path


def load_classifier(path, device='cpu'):
    """-> (model in eval mode, checkpoint dict with test_acc, ref_mu/ref_sigma, calibration)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no classifier at {path!r}: run `python metrics.py train-classifier "
                                f"--out {path}` (a few minutes on a CPU)")
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    model = CifarClassifier(**ckpt['config'])
    model.load_state_dict(ckpt['model'], strict=True)
    return model.to(device).to(memory_format=torch.channels_last).eval(), ckpt


def load_npz(path):
    """A sample set written by sample.py: (images uint8 (N, H, W, 3), labels (N,))."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found; make one with `python sample.py --ckpt "
                                f"OUT/ckpt.pt --num-images 10000 --npz {path}`")
    with np.load(path) as f:
        if 'arr_0' not in f:
            raise ValueError(f"{path!r} has no 'arr_0' (images); keys: {sorted(f.keys())}")
        images = f['arr_0']
        labels = f['labels'] if 'labels' in f else (f['arr_1'] if 'arr_1' in f else None)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path!r}: arr_0 should be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images, labels


def score_table(results, calib):
    """Markdown table: the scored sets first, then the calibration rows."""
    blur8 = calib['real, blurred 8x8']['fd']
    lines = ['| image set | n | classifier acc | FD | FD / blurred-8x8 |', '|---|---|---|---|---|']
    for name, r in list(results.items()) + [(f'*{k}*', v) for k, v in calib.items()]:
        lines.append(f"| {name} | {r['n']} | {r['acc']:.4f} | {r['fd']:.2f} | {r['fd'] / blur8:.2f}x |")
    return '\n'.join(lines)


# =======================================================================================
# 2. ImageNet: FID and Inception Score with the pytorch-fid Inception-v3.
#
# The network is Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception architecture
# for computer vision") as in the TF graph inception-2015-12-05 that the original FID
# (Heusel et al. 2017) and IS (Salimans et al. 2016) code used, ported to PyTorch by
# pytorch-fid (github.com/mseitzer/pytorch-fid, src/pytorch_fid/inception.py). It is
# torchvision's Inception3 (1008-way fc, no aux logits) with pytorch-fid's patches:
#   - the avg pools in Mixed_5b-d, Mixed_6b-e and Mixed_7b ignore padded zeros
#     (count_include_pad=False, as TF's AvgPool does): FIDInceptionA / C / E_1;
#   - Mixed_7c pools with max instead of avg in its pool branch: FIDInceptionE_2.
# Module names match pytorch-fid's weights file pt_inception-2015-12-05-6726825d.pth key by
# key (e.g. 'Mixed_5b.branch1x1.conv.weight', 'fc.weight' (1008, 2048)), so it loads as is:
# 94 conv+BN units, 23,850,960 parameters, 566 state-dict entries (472 without the 94
# BatchNorm 'num_batches_tracked' counters, which play no role in eval mode).
#
#     python -c "import metrics; metrics.download_inception('weights/pt_inception-2015-12-05-6726825d.pth')"
# =======================================================================================

INCEPTION_FILE = 'pt_inception-2015-12-05-6726825d.pth'
INCEPTION_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + INCEPTION_FILE


class _Conv(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (eps 1e-3, TF's) -> relu."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TF's 3x3 / stride 1 / SAME avg pool averages only the real pixels at the border
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    """35x35 block (Szegedy et al. Fig. 5), pytorch-fid's FIDInceptionA: (B, cin, 35, 35) ->
    (B, 224 + pool_features, 35, 35)."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),                                   # 64
                          self.branch5x5_2(self.branch5x5_1(x)),               # 64
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),  # 96
                          self.branch_pool(_avg3(x))], 1)                     # pool_features


class _InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): (B, 288, 35, 35) -> (B, 768, 17, 17)."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),                                   # 384
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),  # 96
                          F.max_pool2d(x, 3, stride=2)], 1)                    # cin = 288


class _InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convs (Fig. 6), pytorch-fid's FIDInceptionC:
    (B, 768, 17, 17) -> (B, 768, 17, 17)."""

    def __init__(self, cin, c7):
        super().__init__()
        h, v = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = _Conv(cin, c7, 1), _Conv(c7, c7, **h), _Conv(c7, 192, **v)
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = _Conv(c7, c7, **v), _Conv(c7, c7, **h)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _Conv(c7, c7, **v), _Conv(c7, 192, **h)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for k in range(1, 6):
            d = getattr(self, f'branch7x7dbl_{k}')(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)  # 4 x 192


class _InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): (B, 768, 17, 17) -> (B, 1280, 8, 8)."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)),              # 320
                          b7,                                                  # 192
                          F.max_pool2d(x, 3, stride=2)], 1)                    # cin = 768


class _InceptionE(nn.Module):
    """8x8 block with expanded 1x3 / 3x1 outputs (Fig. 7): (B, cin, 8, 8) -> (B, 2048, 8, 8).
    max_pool=False: pytorch-fid's FIDInceptionE_1 (Mixed_7b, avg pool without the padded
    zeros); True: FIDInceptionE_2 (Mixed_7c, max pool, as in the TF graph)."""

    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x),                                   # 320
                          self.branch3x3_2a(a), self.branch3x3_2b(a),          # 384 + 384
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),    # 384 + 384
                          self.branch_pool(p)], 1)                             # 192


class FIDInceptionV3(nn.Module):
    """pytorch-fid's Inception-v3. forward(x): x float (B, 3, H, W) in [0, 1], any H, W ->
    (pool features (B, 2048), logits (B, 1008)).

    The image is resized to 299x299 (bilinear, align_corners=False) and mapped to [-1, 1],
    as pytorch-fid's InceptionV3(resize_input=True, normalize_input=True). Features: the
    final average pool (FID's 'pool3'). Logits: features @ fc.weight.T WITHOUT fc.bias, as
    the original IS code (Salimans et al. 2016, openai/improved-gan inception_score.py,
    which multiplies pool3 by the 'softmax/logits/MatMul' weights) and torch-fidelity's
    'logits_unbiased'; self.fc(features) gives the biased ones."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _InceptionA(192, pool_features=32)
        self.Mixed_5c = _InceptionA(256, pool_features=64)
        self.Mixed_5d = _InceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, c7=128)
        self.Mixed_6c = _InceptionC(768, c7=160)
        self.Mixed_6d = _InceptionC(768, c7=160)
        self.Mixed_6e = _InceptionC(768, c7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, max_pool=False)
        self.Mixed_7c = _InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)      # 1000 ImageNet classes + 8 unused outputs of the TF graph

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        x = 2 * x - 1                                                 # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                              # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                 # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                              # (B, 192, 35, 35)
        for name in ['Mixed_5b', 'Mixed_5c', 'Mixed_5d',              # (B, 288, 35, 35)
                     'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e',  # (B, 768, 17, 17)
                     'Mixed_7a', 'Mixed_7b', 'Mixed_7c']:             # (B, 2048, 8, 8)
            x = getattr(self, name)(x)
        f = x.mean((2, 3))                                            # (B, 2048) pool3
        return f, f @ self.fc.weight.T                                # (B, 2048), (B, 1008)


def _inception_where_to_get(path):
    return (f"Expected pytorch-fid's Inception weights {INCEPTION_FILE} at {os.path.abspath(path)!r}; "
            f"get them from {INCEPTION_URL}, e.g. with: python -c \"import metrics; "
            f"metrics.download_inception({path!r})\"")


def load_inception(path, device='cpu'):
    """FIDInceptionV3 with the weights in path (pytorch-fid's file), eval mode, no grads.
    Strict, except that the BatchNorm 'num_batches_tracked' counters may be missing or
    extra (they are unused in eval mode, and their presence depends on the torch version
    that wrote the file); any other missing, extra or misshaped entry is an error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path!r}. {_inception_where_to_get(path)}")
    model = FIDInceptionV3()
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
        missing, unexpected = model.load_state_dict(sd, strict=False)   # shapes are still checked
    except Exception as e:
        raise RuntimeError(f"could not load {path!r} into FIDInceptionV3 ({e}). "
                           f"{_inception_where_to_get(path)}") from e
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    unexpected = [k for k in unexpected if not k.endswith('num_batches_tracked')]
    if missing or unexpected:
        raise RuntimeError(f"{path!r} does not match FIDInceptionV3: missing keys {missing}, "
                           f"unexpected keys {unexpected}. {_inception_where_to_get(path)}")
    return model.to(device).eval().requires_grad_(False)


def download_inception(path, url=INCEPTION_URL, sha256_prefix='6726825d'):
    """Download pytorch-fid's Inception weights (about 92 MB) to path; kept only once its
    sha256 starts with sha256_prefix (torch hub's convention: the 8 hex digits in the file
    name; None skips the check). Returns path."""
    return data.download_file(url, path, hash_name='sha256', expected=sha256_prefix, tag='[inception]',
                              offline_hint=f"If this machine is offline, copy {INCEPTION_FILE} to "
                                           f"{os.path.abspath(path)!r} by hand")


@torch.no_grad()
def inception_activations(model, images, batch_size=50, device='cpu', log_every=20):
    """images uint8 (N, H, W, 3) -> (features (N, 2048), logits (N, 1008)), float64 numpy.
    One progress line (rate, ETA) every log_every batches."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    model = model.to(device).eval()
    feats, logits, t0 = [], [], time.time()
    n_batches = -(-len(images) // batch_size)
    for k in range(n_batches):
        x = torch.from_numpy(images[k * batch_size:(k + 1) * batch_size]).to(device)
        f, l = model(x.permute(0, 3, 1, 2).float() / 255)            # (b, 3, H, W) in [0, 1]
        feats.append(f.double().cpu().numpy())
        logits.append(l.double().cpu().numpy())
        if (k + 1) % log_every == 0 or k + 1 == n_batches:
            done = min((k + 1) * batch_size, len(images))
            ips = done / max(time.time() - t0, 1e-9)
            print(f"[inception] {done}/{len(images)} images  {ips:.1f} img/s  "
                  f"ETA {(len(images) - done) / max(ips, 1e-9) / 60:.1f} min", flush=True)
    return np.concatenate(feats), np.concatenate(logits)


def save_reference_stats(features, path):
    """Save the (mu, sigma) of features (N, 2048) as pytorch-fid's .npz ('mu', 'sigma').
    Returns (mu, sigma)."""
    mu, sigma = feature_statistics(features)
    with data.atomic_file(path) as tmp, open(tmp, 'wb') as f:   # a file object: np.savez adds no '.npz'
        np.savez(f, mu=mu, sigma=sigma)
    return mu, sigma


def fid_from_features(features, ref):
    """FID of features (N, 2048) against reference statistics: a path to an .npz or a dict
    with 'mu' (2048,) and 'sigma' (2048, 2048) (pytorch-fid's format). Statistics made with
    another extractor (e.g. the TF graph of ADM's evaluation suite) give close, not
    identical, numbers."""
    if isinstance(ref, (str, os.PathLike)):
        with np.load(ref) as z:
            ref = {'mu': z['mu'], 'sigma': z['sigma']}
    mu, sigma = feature_statistics(features)
    return frechet_distance(mu, sigma, ref['mu'], ref['sigma'])


def inception_score(logits, splits=10):
    """Inception Score (Salimans et al. 2016): IS = exp(E_x KL(p(y|x) || p(y))), with p(y)
    the mean of p(y|x) over the split; computed on each of `splits` consecutive chunks of
    logits (N, C) -> (mean, std) over the chunks, as openai/improved-gan. p(y|x) is the
    softmax over all C = 1008 outputs (1000 ImageNet classes + 8 unused), as that code."""
    logits = np.asarray(logits, np.float64)
    n = len(logits)
    if n < splits:
        raise ValueError(f"{n} images for {splits} splits")
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))               # log p(y|x), (N, C)
    scores = []
    for k in range(splits):
        lp = logp[k * n // splits:(k + 1) * n // splits]
        m = lp.max(0)
        log_py = m + np.log(np.exp(lp - m).mean(0))                   # log p(y) = log mean_x p(y|x), (C,)
        kl = (np.exp(lp) * (lp - log_py)).sum(1)                      # KL(p(y|x) || p(y)) per image
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Sample quality: the CIFAR-10 toy metric (classifier "
                                "accuracy + Frechet distance), FID / IS for ImageNet.")
    sub = p.add_subparsers(dest='cmd', required=True)
    tc = sub.add_parser('train-classifier', help="train and cache the CIFAR-10 classifier")
    sc = sub.add_parser('score', help="score CIFAR-10 sample sets (.npz from sample.py)")
    sc.add_argument('npz', nargs='+', help="sample sets: arr_0 uint8 (N, 32, 32, 3) + labels")
    sc.add_argument('--json', help="also write the results here (one dict per set)")
    fi = sub.add_parser('fid', help="ImageNet: FID against reference statistics and the Inception Score")
    fi.add_argument('npz', help="sample set (arr_0 uint8 (N, H, W, 3)), e.g. 50,000 images from sample.py")
    fi.add_argument('--inception', required=True, help=f"pytorch-fid's weights file {INCEPTION_FILE}")
    fi.add_argument('--download', action='store_true', help="download --inception first if it is absent")
    fi.add_argument('--ref', help="reference statistics .npz with 'mu' and 'sigma' (pytorch-fid format)")
    fi.add_argument('--save-ref', help="instead: save the statistics of NPZ (e.g. real images) to this .npz")
    fi.add_argument('--batch-size', type=int, default=50)
    fi.add_argument('--device', default='cpu', help="cpu or cuda")
    for q in (tc, sc):
        q.add_argument('--classifier', default=DEFAULT_CLASSIFIER, help="the cached classifier")
        q.add_argument('--data-dir', default='data', help="folder with cifar-10-batches-py/ "
                       "(downloaded there if absent)")
        q.add_argument('--epochs', type=int, default=10, help="classifier training epochs")
        q.add_argument('--device', default='cpu', help="cpu or cuda")
    args = p.parse_args(argv)
    if args.cmd == 'fid':
        return fid_main(p, args)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")

    if args.cmd == 'train-classifier' or not os.path.isfile(args.classifier):
        if args.cmd == 'score':
            print(f"[classifier] {args.classifier} not found: training it once (cached)")
        build_classifier(args.classifier, args.data_dir, epochs=args.epochs, device=args.device)
    model, ck = load_classifier(args.classifier, args.device)
    ref = (ck['ref_mu'].numpy(), ck['ref_sigma'].numpy())
    results = {}
    if args.cmd == 'score':
        for path in args.npz:
            try:
                images, labels = load_npz(path)
            except (FileNotFoundError, ValueError) as e:
                p.error(str(e))
            if labels is None:
                p.error(f"{path} holds no labels: the accuracy needs the conditioning classes")
            if images.shape[1:] != (32, 32, 3):
                p.error(f"{path}: the CIFAR-10 metric takes 32x32 images, got {images.shape[1:3]}")
            t0 = time.time()
            results[path] = score(model, images, labels, ref, args.device)
            print(f"scored {path}: {len(images)} images in {time.time() - t0:.1f}s")
    print(f"classifier {args.classifier}: CIFAR-10 test accuracy {ck['test_acc']:.4f}; FD against "
          f"the 10,000 test images in its {ck['ref_mu'].shape[0]}-d penultimate features")
    print(score_table(results, ck['calibration']))
    if args.cmd == 'score' and args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(results=results, calibration=ck['calibration']), f, indent=1)
    return results


def fid_main(p, args):
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if not args.ref and not args.save_ref:
        p.error("give --ref REF.npz (to compute FID) and/or --save-ref OUT.npz")
    if not os.path.isfile(args.inception):
        if not args.download:
            p.error(f"{args.inception} not found: pass --download to fetch pytorch-fid's "
                    f"{INCEPTION_FILE} ({INCEPTION_URL}) there, or copy it there by hand")
        download_inception(args.inception)
    model = load_inception(args.inception, args.device)
    try:
        images, _ = load_npz(args.npz)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    feats, logits = inception_activations(model, images, batch_size=args.batch_size, device=args.device)
    if args.save_ref:
        save_reference_stats(feats, args.save_ref)
        print(f"saved the statistics of {len(feats)} images to {args.save_ref}")
    result = dict(n=len(images))
    if args.ref:
        result['fid'] = fid_from_features(feats, args.ref)
        result['is'], result['is_std'] = inception_score(logits)
        print(f"{args.npz}: {len(images)} images  FID {result['fid']:.2f}  "
              f"IS {result['is']:.2f} +- {result['is_std']:.2f}")
    return result


if __name__ == '__main__':
    data.keep_freed_memory()  # CPU: reuse freed memory instead of page-faulting it back in
    main()
