"""
Sample quality, offline, in plain PyTorch: the evaluation half of the paper's Sec. 4.

Two metrics, one per kind of run:

  1. CIFAR-10 toy (32x32): a small CNN classifier trained here on CIFAR-10 train
     (one command, a few minutes on 2 CPU cores, cached in out/cifar-classifier.pt).
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
# Widths (32, 64, 128) keep it at ~50 MFLOP per image so that it trains in minutes on 2
# CPU cores. Its penultimate layer (128 values after the global pool) is the feature space
# of the Frechet distance, the way FID uses Inception's pool3.
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


def _augment(x, g, pad=2):
    """Random horizontal flip and a random translation by up to `pad` pixels (reflect
    padding), per image. x: (B, 3, H, W) float -> same shape."""
    B, _, H, W = x.shape
    flip = torch.rand(B, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
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


def train_classifier(train_images, train_labels, test_images, test_labels, *, epochs=8,
                     batch_size=256, lr=0.2, weight_decay=5e-4, label_smoothing=0.2, seed=0,
                     device='cpu', log=print):
    """Train CifarClassifier with SGD (Nesterov), a triangular lr schedule (linear up for
    the first 20% of the steps, then linearly down to 0), label smoothing, flips and
    2-pixel translations. Returns (model in eval mode, test accuracy)."""
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
    import data  # data.py: the CIFAR-10 reader (downloads when absent)
    return (*data.load_cifar10(data_dir, train=True, download=True),
            *data.load_cifar10(data_dir, train=False, download=True))


def build_classifier(path, data_dir, epochs=8, seed=0, device='cpu', log=print):
    """Train the classifier, compute the test-set statistics and the calibration rows,
    and save everything to `path` (atomically; loads with weights_only=True)."""
    xtr, ytr, xte, yte = load_cifar(data_dir)
    t0 = time.time()
    model, acc = train_classifier(xtr, ytr, xte, yte, epochs=epochs, seed=seed, device=device, log=log)
    (mu, sigma), rows = calibration(model, xtr, ytr, xte, device=device)
    ckpt = dict(model=model.state_dict(), config=model.config, test_acc=acc, epochs=epochs,
                seed=seed, ref_mu=torch.from_numpy(mu), ref_sigma=torch.from_numpy(sigma),
                calibration=rows, train_seconds=time.time() - t0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(ckpt, path + '.tmp')
    os.replace(path + '.tmp', path)
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
    for q in (tc, sc):
        q.add_argument('--classifier', default=DEFAULT_CLASSIFIER, help="the cached classifier")
        q.add_argument('--data-dir', default='data', help="folder with cifar-10-batches-py/ "
                       "(downloaded there if absent)")
        q.add_argument('--epochs', type=int, default=8, help="classifier training epochs")
        q.add_argument('--device', default='cpu', help="cpu or cuda")
    args = p.parse_args(argv)
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
            images, labels = load_npz(path)
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


if __name__ == '__main__':
    main()
