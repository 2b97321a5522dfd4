"""
Data for FlowAR: image datasets and the latent cache. In file order:

  - atomic_file / atomic_save (every file of the project is written through them) and
    vae_fingerprint (the cache's record of its VAE);
  - keep_freed_memory: the malloc setting every entry point applies first;
  - CIFAR-10 (the "python version" pickles), with an optional md5-checked download
    (download_file, which metrics.py also uses for the Inception weights);
  - ImageNet-style class folders read with Pillow, ADM center crop (RELEASED: training
    augments every step, Resize 288 -> RandomCrop 256 -> flip; here, as in MAR, the center
    crop and its flipped copy are encoded once into the latent cache), and to_float /
    to_uint8, the conversions between pixels and the VAE's range;
  - make_shapes: a procedural 10-class dataset of coloured shapes (no download needed);
  - the latent cache: every image is encoded once (plain and horizontally flipped) into one
    memory-mapped array of posterior moments; LatentDataset reads it, and training draws a
    fresh posterior sample from it at every step (train.make_batch), as MAR does.

Only torch, numpy and pillow are used.
"""

import contextlib
import ctypes
import hashlib
import json
import os
import pickle
import tarfile
import time
import urllib.error
import urllib.request
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# -----------------------------------------------------------------------------
# Files that a crash never leaves half-written (every checkpoint, cache header, chunk and
# .npz of the project is written through these two helpers)

@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path next to `path`; write the file there. When the block ends
    without an error the temporary file is renamed to `path` (atomic on one file system),
    otherwise it is deleted and `path` is untouched."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    """torch.save(obj, path) through atomic_file."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


class Ranks(NamedTuple):
    """Which process this is of a torchrun job, for the functions that split work over ranks
    (build_latent_cache, sample.sample_npz). The default is a single process."""
    rank: int = 0
    world_size: int = 1
    barrier: Optional[Callable[[], None]] = None   # waits for every rank (torch.distributed.barrier)


def vae_fingerprint(model):
    """A short hex string identifying the config and ALL weights of a VAE (sha1, 16 chars).
    The latent cache stores it and refuses to be read with another VAE."""
    h = hashlib.sha1()
    h.update(json.dumps(model.config, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to('cpu', torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# The process's memory allocator (called first by every entry point: train, sample, bench...)

def keep_freed_memory():
    """A CPU speed-up that changes no number: ask glibc's malloc to keep freed memory for
    reuse instead of handing it back to the OS. By default big freed blocks are unmapped
    (or trimmed off the heap), and the next tensor of that size page-faults fresh, zeroed
    pages back in; keeping the blocks saves that system time in toy sampling and VAE
    training (measurements: docs/speed.md). The same as
    the environment variables MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, or what
    jemalloc / tcmalloc give with LD_PRELOAD. Peak memory grows a little (freed blocks are
    kept). Returns True when applied; False off glibc (macOS, Windows, musl): nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt        # the C library of this process
    except (OSError, AttributeError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3    # <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


# -----------------------------------------------------------------------------
# CIFAR-10

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'
CIFAR10_FOLDER = 'cifar-10-batches-py'
CIFAR10_ARCHIVE = 'cifar-10-python.tar.gz'
CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer',
                   'dog', 'frog', 'horse', 'ship', 'truck']


def _cifar_where_to_put(root):
    return (f"Put CIFAR-10 into {os.path.abspath(root)!r} in one of two forms: the folder "
            f"{os.path.join(os.path.abspath(root), CIFAR10_FOLDER)!r} (data_batch_1..5, "
            f"test_batch, batches.meta) or the archive "
            f"{os.path.join(os.path.abspath(root), CIFAR10_ARCHIVE)!r}, downloaded from {CIFAR10_URL}")


def download_file(url, dest, *, hash_name, expected, offline_hint, tag='[data]'):
    """Download url to dest with a progress line (at most one a second). The bytes go to a
    temporary file (atomic_file) that becomes dest only once complete and once its
    `hash_name` digest starts with `expected` (a full digest or a prefix; None skips the
    check); otherwise nothing is left behind. Returns dest."""
    print(f"{tag} downloading {url} -> {dest}", flush=True)
    h = hashlib.new(hash_name)                              # digest of the bytes as they arrive
    with atomic_file(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, 'wb') as f:
                total = int(resp.headers.get('Content-Length') or 0)
                done, t0, t_print = 0, time.time(), 0.0
                for block in iter(lambda: resp.read(1 << 20), b''):
                    f.write(block)
                    h.update(block)
                    done += len(block)
                    if time.time() - t_print > 1.0:
                        t_print = time.time()
                        rate = done / 1e6 / max(t_print - t0, 1e-9)
                        tot = f"{total / 1e6:.1f}" if total else '?'
                        print(f"\r{tag} {done / 1e6:.1f} / {tot} MB  {rate:.1f} MB/s", end='', flush=True)
            print(f"\r{tag} {done / 1e6:.1f} MB downloaded in {time.time() - t0:.0f}s", flush=True)
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(f"could not download {url} ({e}). {offline_hint}") from e
        got = h.hexdigest()
        if expected is not None and not got.startswith(expected):
            raise ValueError(f"{hash_name} mismatch for the file downloaded from {url}: got {got}, "
                             f"expected {expected}; the file was deleted. Try again, or: {offline_hint}")
    return dest


def download_cifar10(root, url=CIFAR10_URL, md5=CIFAR10_MD5):
    """Download the CIFAR-10 archive to root/cifar-10-python.tar.gz and check its md5.
    Returns the archive path."""
    return download_file(url, os.path.join(root, CIFAR10_ARCHIVE), hash_name='md5', expected=md5,
                         offline_hint=f"If this machine is offline: {_cifar_where_to_put(root)}")


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
    names = [f'data_batch_{i}' for i in range(1, 6)] if train else ['test_batch']
    folder = os.path.join(root, CIFAR10_FOLDER)
    archive = os.path.join(root, CIFAR10_ARCHIVE)
    if not os.path.isdir(folder) and not os.path.isfile(archive):
        if not download:
            raise FileNotFoundError(f"CIFAR-10 not found. {_cifar_where_to_put(root)}; or pass "
                                    f"download=True to fetch it.")
        download_cifar10(root)
    parts = []                                              # [(images, labels)], one per file
    if os.path.isdir(folder):
        for n in names:
            path = os.path.join(folder, n)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing; the CIFAR-10 folder is incomplete. "
                                        f"{_cifar_where_to_put(root)}")
            with open(path, 'rb') as f:
                parts.append(_cifar_unpickle(f, path))
    else:
        with tarfile.open(archive, 'r:gz') as tar:
            for n in names:
                member = f'{CIFAR10_FOLDER}/{n}'
                f = tar.extractfile(member) if member in tar.getnames() else None
                if f is None:
                    raise ValueError(f"{archive} has no member {member}; is it the CIFAR-10 "
                                     f"python archive? {_cifar_where_to_put(root)}")
                parts.append(_cifar_unpickle(f, f'{archive}:{member}'))
    xs, ys = zip(*parts)
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


def to_float(x_uint8):
    """uint8 images (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]: the one conversion
    of pixels into the VAE's input range (the inverse is to_uint8). Made contiguous: the
    moved view has channels-last strides, a slower path for CPU convolutions (docs/speed.md)."""
    return x_uint8.movedim(-1, -3).contiguous().float().div(127.5).sub(1.0)


def to_uint8(x):
    """float images (..., 3, H, W) in about [-1, 1] -> uint8 (..., H, W, 3), clamped and rounded."""
    return x.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).movedim(-3, -1)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Class subfolders of images; classes sorted by name -> label indices 0..K-1.
    Items: (ADM center crop, float (3, image_size, image_size) in [-1, 1], label int)."""

    def __init__(self, root, image_size=256):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist; pass the folder "
                                    f"that holds one subfolder per class (e.g. imagenet/train)")
        self.root, self.image_size = root, image_size
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
        x = np.array(center_crop_arr(self.load_image(i), self.image_size), dtype=np.uint8)  # (H, W, 3)
        return to_float(torch.from_numpy(x)), int(self.samples[i][1])


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


# -----------------------------------------------------------------------------
# Latent cache
#
# Layout of a cache folder (one per split):
#   header.json   vae fingerprint + config, scale_factor, N, latent shape, batch size, name, flips
#   moments.npy   float32 (N, P, 2C, h, w), memory-mapped. dim 1: [plain image, image
#                 flipped left-right] (P = 2), or [plain image] (P = 1, built with flips=False);
#                 dim 2: [posterior mean (C), posterior logvar (C)]
#   labels.npy    int64 (N,)
#   done.npy      bool (number of batches,): batch b (images b*bs .. (b+1)*bs - 1) is written
#
# The moments of a batch are flushed to disk before its done flag is set, so an interrupted
# run resumes with the first unfinished batch. Under DDP each rank encodes the batches
# b with b % world_size == rank into the same memory-mapped files (one machine, or a
# shared file system with coherent mmap). header.json is written last by rank 0, after
# the arrays exist.

def _read_header(path):
    hp = os.path.join(path, 'header.json')
    if not os.path.isfile(hp):
        raise FileNotFoundError(f"no latent cache at {path!r} (header.json missing); build it "
                                f"with data.build_latent_cache (see train.py)")
    with open(hp) as f:
        return json.load(f)


def _refuse_other_vae(path, header, fingerprint):
    if header['vae_fingerprint'] != fingerprint:
        raise ValueError(
            f"the latent cache {path!r} was made with another VAE (fingerprint "
            f"{header['vae_fingerprint']}, yours is {fingerprint}). Delete the folder "
            f"{path!r} to rebuild it, or pass the VAE it was built with.")


def build_latent_cache(vae, images_or_dataset, labels, path, *, scale_factor, batch_size=256,
                       flips=True, precision='fp32', device='cpu', ranks=Ranks(), dataset_name='',
                       num_workers=0, log_every=20, max_batches=None):
    """Encode every image once (plain and, with flips=True, flipped) into the cache folder
    `path`; resumable. flips=False halves the encoding work (the CPU toy trains too few
    epochs for the flip augmentation to matter much: docs/toy.md, "Training length").

    images_or_dataset: uint8 numpy (N, H, W, 3) or an ImageFolderDataset; labels: int array
      (N,), or None to take the dataset's own .labels.
    ranks: DDP: every rank calls this with the same arguments and its Ranks (rank,
      world_size, barrier); the steps below say who does what.
    max_batches: encode at most this many batches in this call (for tests / chunked runs).
    precision: 'bf16' encodes under bf16 autocast (faster on a CPU with native bf16, latents
      close to fp32's: docs/speed.md); the moments are stored in fp32.
    Returns the number of batches this call encoded.
    """
    rank, world_size, barrier = ranks
    if world_size > 1 and barrier is None:
        raise ValueError("build_latent_cache with world_size > 1 needs Ranks(..., barrier=) (e.g. "
                         "torch.distributed.barrier) so that rank 0 creates the files first")
    N, img_size, labels = _check_inputs(images_or_dataset, labels)
    f, C = vae.downsample_factor, vae.config['embed_dim']
    header = dict(vae_fingerprint=vae_fingerprint(vae), vae_config=vae.config,
                  scale_factor=float(scale_factor), N=N, latent_shape=[C, img_size // f, img_size // f],
                  batch_size=batch_size, dataset=dataset_name, flips=bool(flips))
    n_batches = (N + batch_size - 1) // batch_size

    # 1. rank 0 creates the files, or checks that the cache already there fits this call;
    #    the other ranks wait for it, then check the VAE themselves
    if rank == 0:
        _create_or_check_cache(path, header, labels, n_batches)
    if world_size > 1:
        barrier()
    if rank != 0:
        _refuse_other_vae(path, _read_header(path), header['vae_fingerprint'])

    # 2. this rank's share: the batches b with b % world_size == rank that are not done yet
    done = np.load(os.path.join(path, 'done.npy'))          # (n_batches,) bool
    pending = [b for b in range(n_batches) if b % world_size == rank and not done[b]][:max_batches]
    if rank == 0:
        print(f"[latent cache] {path}: {int(done.sum())}/{n_batches} batches done, this rank "
              f"encodes {len(pending)}", flush=True)

    # 3. encode them, each batch's moments on disk before its done flag
    _encode_batches(vae, _pending_images(images_or_dataset, pending, batch_size, num_workers),
                    path, len(pending), batch_size=batch_size, flips=flips, device=device,
                    rank=rank, world_size=world_size, log_every=log_every, precision=precision)
    if world_size > 1:
        barrier()
    return len(pending)


def _check_inputs(images_or_dataset, labels):
    """Check the images and labels given to build_latent_cache -> (N, image size, labels
    int64 (N,)); labels=None takes a dataset's own .labels."""
    if isinstance(images_or_dataset, np.ndarray):
        images = images_or_dataset
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        img_size = images.shape[1]
    else:
        img_size = images_or_dataset.image_size
        if labels is None:
            labels = getattr(images_or_dataset, 'labels', None)
    if labels is None:
        raise ValueError("build_latent_cache needs labels (an int array of length N)")
    labels = np.asarray(labels, dtype=np.int64)
    N = len(images_or_dataset)
    if len(labels) != N:
        raise ValueError(f"{N} images but {len(labels)} labels")
    return N, img_size, labels


def _create_or_check_cache(path, header, labels, n_batches):
    """Rank 0's part: refuse a cache at `path` made with another VAE or other settings, or,
    if there is none, create its files (the arrays empty, header.json last)."""
    if os.path.isfile(os.path.join(path, 'header.json')):
        old = _read_header(path)
        _refuse_other_vae(path, old, header['vae_fingerprint'])
        for k in ('N', 'latent_shape', 'batch_size', 'scale_factor', 'flips'):
            if old.get(k, True) != header[k]:       # caches from before 'flips' had flips
                raise ValueError(f"the latent cache {path!r} has {k}={old.get(k, True)}, this call "
                                 f"{header[k]}; pass the same value or delete the folder")
        return
    os.makedirs(path, exist_ok=True)
    C, h, w = header['latent_shape']
    np.lib.format.open_memmap(os.path.join(path, 'moments.npy'), mode='w+', dtype=np.float32,
                              shape=(header['N'], 1 + header['flips'], 2 * C, h, w))
    np.save(os.path.join(path, 'labels.npy'), labels)
    np.save(os.path.join(path, 'done.npy'), np.zeros(n_batches, dtype=bool))
    with atomic_file(os.path.join(path, 'header.json')) as tmp, open(tmp, 'w') as f:
        json.dump(header, f, indent=1)


def _pending_images(images_or_dataset, pending, batch_size, num_workers):
    """Yield (batch index b, float images (B, 3, H, W) in [-1, 1]) for each b in pending:
    sliced from an array, or loaded from a dataset by a DataLoader."""
    if isinstance(images_or_dataset, np.ndarray):
        for b in pending:
            yield b, to_float(torch.from_numpy(images_or_dataset[b * batch_size:(b + 1) * batch_size]))
        return
    N = len(images_or_dataset)
    sampler = [list(range(b * batch_size, min(N, (b + 1) * batch_size))) for b in pending]
    loader = torch.utils.data.DataLoader(images_or_dataset, batch_sampler=sampler,
                                         num_workers=num_workers)
    for b, (x, _) in zip(pending, loader):
        yield b, x


def _encode_batches(vae, batches, path, n_pending, *, batch_size, flips, device, rank,
                    world_size, log_every, precision):
    """Encode the (b, images) of `batches` into the cache's memory-mapped moments, setting
    done[b] only once batch b is flushed to disk. Rank 0 prints the rate and ETA every
    log_every batches and after the last one."""
    moments = np.load(os.path.join(path, 'moments.npy'), mmap_mode='r+')   # (N, P, 2C, h, w)
    done = np.load(os.path.join(path, 'done.npy'), mmap_mode='r+')         # (n_batches,)
    P = 1 + bool(flips)                                       # versions per image
    vae.eval()
    t0, n_img = time.time(), 0
    bf16 = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=precision == 'bf16')
    with torch.no_grad(), bf16:
        for k, (b, x) in enumerate(batches):
            x = x.to(device)
            B = x.shape[0]
            post = vae.encode(torch.cat([x, x.flip(3)]) if flips else x)  # plain (and flipped): (P*B, ...)
            m = torch.cat([post.mean, post.logvar], dim=1)    # (P*B, 2C, h, w), logvar clamped
            m = m.reshape(P, B, *m.shape[1:]).transpose(0, 1)  # (B, P, 2C, h, w)
            moments[b * batch_size:b * batch_size + B] = m.float().cpu().numpy()
            moments.flush()                                   # data on disk before the flag
            done[b] = True
            done.flush()
            n_img += B
            if rank == 0 and ((k + 1) % log_every == 0 or k + 1 == n_pending):
                ips = n_img / max(time.time() - t0, 1e-9)
                left = (n_pending - k - 1) * batch_size
                print(f"[latent cache] batch {k + 1}/{n_pending}  {ips * world_size:.0f} img/s "
                      f"(all ranks)  ETA {left / max(ips, 1e-9) / 60:.1f} min", flush=True)


class LatentDataset:
    """The latent cache, read: posterior moments and labels of any items (moments_batch).
    It draws nothing: the posterior sample, the flip and all other training randomness
    are drawn in one place, train.sample_randomness."""

    def __init__(self, path, vae_fingerprint=None):
        self.path = path
        self.header = _read_header(path)
        if vae_fingerprint is not None:
            _refuse_other_vae(path, self.header, vae_fingerprint)
        done = np.load(os.path.join(path, 'done.npy'))
        if not done.all():
            raise ValueError(f"the latent cache {path!r} is incomplete ({int(done.sum())}/"
                             f"{len(done)} batches); run build_latent_cache again to finish it")
        self.labels = np.load(os.path.join(path, 'labels.npy'))
        self._moments = None        # opened lazily (memory-mapped)

    @property
    def scale_factor(self):
        return float(self.header['scale_factor'])

    @property
    def latent_shape(self):
        return tuple(self.header['latent_shape'])

    def __len__(self):
        return len(self.labels)

    def moments_batch(self, indices):
        """Cached moments of several items: (float32 (B, P, 2C, h, w) [plain, flipped]
        (P = 2) or [plain] (P = 1, a cache built with flips=False), labels int64 (B,))."""
        if self._moments is None:
            self._moments = np.load(os.path.join(self.path, 'moments.npy'), mmap_mode='r')
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx)                   # sorted reads are kinder to the memmap
        m = np.empty((len(idx),) + self._moments.shape[1:], dtype=np.float32)
        m[order] = self._moments[idx[order]]
        return torch.from_numpy(m), torch.from_numpy(self.labels[idx].astype(np.int64))
