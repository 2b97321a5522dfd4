"""
Data for FlowAR: image datasets and the latent cache.

  - CIFAR-10 (the "python version" pickles), with an optional md5-checked download;
  - ImageNet-style class folders read with Pillow: the ADM center crop used for caching and
    evaluation, and the released training augmentation (resize, random crop, flip);
  - make_shapes: a procedural 10-class dataset of coloured shapes (no download needed);
  - the latent cache: every image is encoded once (plain and horizontally flipped) into one
    memory-mapped array of posterior moments; LatentDataset draws a fresh posterior sample
    from it at every access, as MAR / FlowAR do with cached latents.

Only torch, numpy and pillow are used.
"""

import hashlib
import json
import os
import pickle
import sys
import tarfile
import time
import urllib.error
import urllib.request

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# -----------------------------------------------------------------------------
# CIFAR-10

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'
CIFAR10_FOLDER = 'cifar-10-batches-py'
CIFAR10_ARCHIVE = 'cifar-10-python.tar.gz'
CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer',
                   'dog', 'frog', 'horse', 'ship', 'truck']
_CIFAR10_TRAIN_FILES = [f'data_batch_{i}' for i in range(1, 6)]
_CIFAR10_TEST_FILES = ['test_batch']


def _cifar_where_to_put(root):
    return (f"Put CIFAR-10 into {os.path.abspath(root)!r} in one of two forms: the folder "
            f"{os.path.join(os.path.abspath(root), CIFAR10_FOLDER)!r} (data_batch_1..5, "
            f"test_batch, batches.meta) or the archive "
            f"{os.path.join(os.path.abspath(root), CIFAR10_ARCHIVE)!r}, downloaded from {CIFAR10_URL}")


def _md5(path, chunk=1 << 20):
    h = hashlib.md5()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def download_cifar10(root, url=CIFAR10_URL, md5=CIFAR10_MD5):
    """Download the CIFAR-10 archive to root/cifar-10-python.tar.gz and check its md5.
    The bytes go to a '.part' file that is renamed only once complete and verified.
    Returns the archive path."""
    os.makedirs(root, exist_ok=True)
    dest = os.path.join(root, CIFAR10_ARCHIVE)
    tmp = dest + '.part'
    print(f"[data] downloading {url} -> {dest}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, 'wb') as f:
            total = int(resp.headers.get('Content-Length') or 0)
            done, t0, t_print = 0, time.time(), 0.0
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                f.write(block)
                done += len(block)
                if time.time() - t_print > 1.0:     # one progress line per second at most
                    t_print = time.time()
                    rate = done / 1e6 / max(t_print - t0, 1e-9)
                    tot = f"{total / 1e6:.1f}" if total else '?'
                    print(f"\r[data] {done / 1e6:.1f} / {tot} MB  {rate:.1f} MB/s", end='', flush=True)
        print(f"\r[data] {done / 1e6:.1f} MB downloaded in {time.time() - t0:.0f}s", flush=True)
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(f"could not download CIFAR-10 from {url} ({e}). If this machine is "
                           f"offline: {_cifar_where_to_put(root)}") from e
    got = _md5(tmp)
    if md5 is not None and got != md5:
        os.remove(tmp)
        raise ValueError(f"md5 mismatch for the file downloaded from {url}: got {got}, "
                         f"expected {md5}; the file was deleted. Try again, or: {_cifar_where_to_put(root)}")
    os.replace(tmp, dest)
    return dest


def _cifar_unpickle(fileobj, name):
    d = pickle.load(fileobj, encoding='bytes')
    if b'data' not in d or b'labels' not in d:
        raise ValueError(f"CIFAR-10 file {name} lacks b'data' / b'labels'; is it the python version?")
    # b'data': (N, 3072) uint8, channel-major: 1024 red values (row-major 32x32), then green,
    # then blue. -> (N, 3, 32, 32) -> (N, 32, 32, 3)
    x = np.asarray(d[b'data'], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y = np.asarray(d[b'labels'], dtype=np.int64)
    return np.ascontiguousarray(x), y


def load_cifar10(root, train=True, download=False):
    """-> (images uint8 (N, 32, 32, 3), labels int64 (N,)); N = 50000 (train) or 10000 (test).

    root holds either the folder cifar-10-batches-py/ (read directly) or the archive
    cifar-10-python.tar.gz (read straight from the archive, nothing is extracted).
    If neither exists: download=True fetches the archive (download_cifar10), otherwise a
    FileNotFoundError says where to put the files.
    """
    names = _CIFAR10_TRAIN_FILES if train else _CIFAR10_TEST_FILES
    folder = os.path.join(root, CIFAR10_FOLDER)
    archive = os.path.join(root, CIFAR10_ARCHIVE)
    if not os.path.isdir(folder) and not os.path.isfile(archive):
        if not download:
            raise FileNotFoundError(f"CIFAR-10 not found. {_cifar_where_to_put(root)}; or pass "
                                    f"download=True to fetch it.")
        download_cifar10(root)
    xs, ys = [], []
    if os.path.isdir(folder):
        for n in names:
            path = os.path.join(folder, n)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing; the CIFAR-10 folder is incomplete. "
                                        f"{_cifar_where_to_put(root)}")
            with open(path, 'rb') as f:
                x, y = _cifar_unpickle(f, path)
            xs.append(x), ys.append(y)
    else:
        with tarfile.open(archive, 'r:gz') as tar:
            for n in names:
                member = f'{CIFAR10_FOLDER}/{n}'
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    f = None
                if f is None:
                    raise ValueError(f"{archive} has no member {member}; is it the CIFAR-10 "
                                     f"python archive? {_cifar_where_to_put(root)}")
                x, y = _cifar_unpickle(f, f'{archive}:{member}')
                xs.append(x), ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


# -----------------------------------------------------------------------------
# ImageNet-style folders: root/<class name>/<image files>

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def center_crop_arr(pil_image, image_size):
    """ADM / MAR center crop -> PIL image of image_size x image_size.

    1. while the short side is >= 2 * image_size: halve both sides with a BOX filter
       (cheap, alias-free shrinking of large photos);
    2. resize so the short side equals image_size, bicubic;
    3. cut the central image_size x image_size square.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.array(pil_image)                               # (H, W, C)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def random_resized_crop_flip(pil_image, image_size):
    """The released training augmentation: Resize(round(1.125 * size)) of the short side
    (bicubic; 288 for 256), a random image_size crop, a random horizontal flip.
    Random numbers come from torch's global RNG (so DataLoader worker seeding applies)."""
    resize = round(image_size * 1.125)
    w, h = pil_image.size
    # like torchvision's Resize(int): short side -> resize, long side scaled and truncated
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    pil_image = pil_image.resize((new_w, new_h), resample=Image.BICUBIC)
    top = int(torch.randint(0, new_h - image_size + 1, ()).item())
    left = int(torch.randint(0, new_w - image_size + 1, ()).item())
    pil_image = pil_image.crop((left, top, left + image_size, top + image_size))
    if torch.rand(()).item() < 0.5:
        pil_image = pil_image.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_image


def pil_to_tensor(pil_image):
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(pil_image, dtype=np.uint8)                     # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Class subfolders of images; classes sorted by name -> label indices 0..K-1.

    train_aug=False: ADM center crop (caching, evaluation); True: random resize-crop-flip.
    Items: (image float (3, image_size, image_size) in [-1, 1], label int).
    """

    def __init__(self, root, image_size=256, train_aug=False):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist; pass the folder "
                                    f"that holds one subfolder per class (e.g. imagenet/train)")
        self.root, self.image_size, self.train_aug = root, image_size, train_aug
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise ValueError(f"{root!r} has no class subfolders; expected root/<class>/<image> "
                             f"(ImageNet layout)")
        self.samples = []                                   # [(path, label)]
        for label, c in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
                for fn in sorted(files):
                    if fn.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, fn), label))
        if not self.samples:
            raise ValueError(f"no image files ({', '.join(IMG_EXTENSIONS)}) found under the "
                             f"class folders of {root!r}")
        self.labels = np.array([l for _, l in self.samples], dtype=np.int64)

    def __len__(self):
        return len(self.samples)

    def load_image(self, i):
        path = self.samples[i][0]
        try:
            with Image.open(path) as im:
                im.load()
                # grayscale (L), RGBA, CMYK, palette (P), ... -> RGB: the standard conversion,
                # done explicitly here (alpha is dropped, not blended)
                return im.convert('RGB') if im.mode != 'RGB' else im.copy()
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise RuntimeError(f"could not read image file {path!r}: {e}. Delete or replace "
                               f"the file.") from e

    def __getitem__(self, i):
        im = self.load_image(i)
        if self.train_aug:
            im = random_resized_crop_flip(im, self.image_size)
        else:
            im = center_crop_arr(im, self.image_size)
        return pil_to_tensor(im), int(self.samples[i][1])


# -----------------------------------------------------------------------------
# Procedural shapes: 10 classes, each one shape in one colour, on a dark background

SHAPES_CLASSES = ['red circle', 'green square', 'blue triangle', 'yellow cross',
                  'magenta ring', 'cyan horizontal bar', 'orange vertical bar',
                  'white diamond', 'pink x', 'lime frame']
_SHAPES_COLOURS = np.array([[230, 40, 40], [40, 200, 60], [50, 90, 240], [235, 225, 40],
                            [220, 50, 220], [40, 220, 230], [250, 140, 20],
                            [235, 235, 235], [250, 130, 180], [160, 250, 60]], dtype=np.float32)


def _shape_mask(cls, dx, dy, r):
    # dx, dy: pixel offsets from the shape centre (y points down); r: half size
    ax, ay = np.abs(dx), np.abs(dy)
    d = np.sqrt(dx ** 2 + dy ** 2)
    t = r / 3                                   # stroke half-width of bars and crosses
    if cls == 0:
        return d <= r                                                   # circle
    if cls == 1:
        return np.maximum(ax, ay) <= r * 0.8                            # square
    if cls == 2:
        return (dy <= r * 0.8) & (ax <= (dy + r) / 2)                   # triangle, apex up
    if cls == 3:
        return ((ax <= t) & (ay <= r)) | ((ay <= t) & (ax <= r))        # plus sign
    if cls == 4:
        return (d <= r) & (d >= r * 0.55)                               # ring
    if cls == 5:
        return (ax <= r) & (ay <= t)                                    # horizontal bar
    if cls == 6:
        return (ax <= t) & (ay <= r)                                    # vertical bar
    if cls == 7:
        return ax + ay <= r                                             # diamond
    if cls == 8:
        return (np.abs(ax - ay) <= t * 0.8) & (np.maximum(ax, ay) <= r)  # x
    return (np.maximum(ax, ay) <= r * 0.85) & (np.maximum(ax, ay) >= r * 0.5)  # square frame


def make_shapes(n, seed=0, size=32):
    """-> (images uint8 (n, size, size, 3), labels int64 (n,)), deterministic in seed.
    Labels are balanced (i % 10, shuffled); shape position, size and colour jitter and
    the background (dark colour, vertical gradient, noise) are random."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)            # (size, size)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        # background: dark base colour + a vertical gradient + a little noise
        base = rng.uniform(0, 60, 3).astype(np.float32)
        grad = rng.uniform(-20, 20, 3).astype(np.float32)
        bg = base + grad * (yy / size)[..., None]                    # (size, size, 3)
        bg = bg + rng.normal(0, 4, (size, size, 3)).astype(np.float32)
        # shape: half size 18%..38% of the image, centre keeps it mostly inside
        r = rng.uniform(0.18, 0.38) * size
        cx, cy = rng.uniform(r, size - r, 2)
        mask = _shape_mask(labels[i], xx - cx, yy - cy, r)           # (size, size) bool
        colour = np.clip(_SHAPES_COLOURS[labels[i]] + rng.uniform(-20, 20, 3), 0, 255)
        img = np.where(mask[..., None], colour, bg)
        images[i] = np.clip(img, 0, 255).round().astype(np.uint8)
    return images, labels
