"""Tests for vae.py and data.py (CPU, fast). Run: python -m pytest -q test_part_vae_data.py

Self-contained: own imports, helpers prefixed _vd_. Tests that need the shared reference
files or the real CIFAR-10 copy skip with a message when ../shared is absent.
"""

import hashlib
import io
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import vae

_VD_SHARED = Path(__file__).resolve().parent.parent / 'shared'
_VD_KL16_KEYS = _VD_SHARED / 'reference' / 'mar_kl16_vae_state_dict.txt'
_VD_CIFAR_ROOT = _VD_SHARED / 'data'


def _vd_tiny_config(**over):
    # a very small VAE (f = 4) so that tests take milliseconds
    cfg = dict(vae.PRESETS['cifar'])
    cfg.update(ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8)
    cfg.update(over)
    return cfg


def _vd_tiny_vae(seed=0, **over):
    torch.manual_seed(seed)
    return vae.AutoencoderKL(_vd_tiny_config(**over)).eval()


def _vd_reference_shapes():
    if not _VD_KL16_KEYS.is_file():
        pytest.skip(f"reference key list {_VD_KL16_KEYS} not present")
    shapes = {}
    for line in _VD_KL16_KEYS.read_text().splitlines():
        if not line.strip() or line.startswith('#'):
            continue
        key, shape = line.split(' ', 1)
        shapes[key] = tuple(int(s) for s in re.findall(r'\d+', shape))
    return shapes


def _vd_fake_cifar_batch(n, seed):
    # n images in the real pickle format: b'data' (n, 3072) uint8 channel-major
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    imgs[0, 3, 5] = (10, 20, 30)                        # R != G != B at row 3, column 5
    labels = [int(v) for v in rng.integers(0, 10, n)]
    flat = imgs.transpose(0, 3, 1, 2).reshape(n, 3072)   # channel-major, as CIFAR stores it
    blob = pickle.dumps({b'batch_label': b'fake', b'labels': labels, b'data': flat,
                         b'filenames': [b'x.png'] * n}, protocol=2)
    return blob, imgs, np.array(labels)


def _vd_write_fake_cifar(root, as_tar):
    # 5 training batches of 3 images and a test batch of 4; returns the expected arrays
    files, train_x, train_y = {}, [], []
    for i in range(1, 6):
        blob, x, y = _vd_fake_cifar_batch(3, seed=i)
        files[f'data_batch_{i}'] = blob
        train_x.append(x), train_y.append(y)
    blob, test_x, test_y = _vd_fake_cifar_batch(4, seed=99)
    files['test_batch'] = blob
    files['batches.meta'] = pickle.dumps({b'label_names': [c.encode() for c in data.CIFAR10_CLASSES]})
    os.makedirs(root, exist_ok=True)
    if as_tar:
        with tarfile.open(os.path.join(root, 'cifar-10-python.tar.gz'), 'w:gz') as tar:
            for name, blob in files.items():
                info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        os.makedirs(os.path.join(root, 'cifar-10-batches-py'))
        for name, blob in files.items():
            with open(os.path.join(root, 'cifar-10-batches-py', name), 'wb') as f:
                f.write(blob)
    return np.concatenate(train_x), np.concatenate(train_y), test_x, test_y


# ----------------------------------------------------------------------------- vae.py

def test_vd_kl16_parameter_count_and_keys():
    m = vae.AutoencoderKL.from_preset('kl16')
    assert sum(p.numel() for p in m.parameters()) == 66_456_019
    assert len(list(m.buffers())) == 0
    ref = _vd_reference_shapes()
    own = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert own == ref


def test_vd_kl16_reference_checkpoint_loads_strictly(tmp_path):
    ref = _vd_reference_shapes()
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in ref.items()}
    path = str(tmp_path / 'kl16.ckpt')
    torch.save({'model': sd}, path)                # MAR's format: weights only, no config
    model, scale = vae.load_vae(path)
    assert scale == 0.2325
    assert model.config == vae.PRESETS['kl16']
    for k in ('encoder.down.4.attn.1.q.weight', 'decoder.up.1.upsample.conv.bias', 'quant_conv.weight'):
        assert torch.equal(model.state_dict()[k], sd[k])
    # a missing key and a wrong shape are named in the error
    bad = dict(sd)
    del bad['encoder.mid.attn_1.k.bias']
    bad['decoder.conv_out.weight'] = torch.zeros(3, 128, 1, 1)
    with pytest.raises(ValueError) as e:
        vae.load_state_dict_strict(model, bad, what='kl16')
    assert 'encoder.mid.attn_1.k.bias' in str(e.value)
    assert 'decoder.conv_out.weight' in str(e.value)
    bad = {'extra.weight': torch.zeros(1), **sd}
    with pytest.raises(ValueError, match='extra.weight'):
        vae.load_state_dict_strict(model, bad)


def test_vd_load_vae_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='vae.pt'):
        vae.load_vae(str(tmp_path / 'nope.pt'))


def test_vd_encode_decode_shapes():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    m = vae.AutoencoderKL.from_preset('kl16').eval()
    with torch.no_grad():
        post = m.encode(x[:1])
        assert post.mean.shape == (1, 16, 2, 2)            # 16x downsampling
        assert m.decode(post.sample()).shape == (1, 3, 32, 32)
    m = vae.AutoencoderKL.from_preset('cifar').eval()
    with torch.no_grad():
        post = m.encode(x)
        assert post.mean.shape == (2, 4, 8, 8)             # the toy FlowAR's latent
        assert m.decode(post.mode()).shape == (2, 3, 32, 32)


def test_vd_posterior_formulas():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 2, 2, generator=g)
    moments[0, 4, 0, 0] = 50.0                                 # logvar gets clamped to 20
    moments[0, 5, 0, 0] = -80.0                                # ... and to -30
    post = vae.DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:].clamp(-30, 20)
    assert torch.equal(post.mean, mean)
    assert post.logvar[0, 0, 0, 0] == 20 and post.logvar[0, 1, 0, 0] == -30
    assert torch.allclose(post.std, torch.exp(0.5 * logvar))
    assert torch.equal(post.mode(), mean)
    eps = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(7))
    z = post.sample(generator=torch.Generator().manual_seed(7))
    assert torch.allclose(z, mean + torch.exp(0.5 * logvar) * eps)
    # KL(N(m, s^2) || N(0, 1)) per element = 0.5 (m^2 + s^2 - 1 - log s^2), summed over C,H,W
    kl = torch.zeros(3)
    for b in range(3):
        for m_, lv in zip(mean[b].flatten().tolist(), logvar[b].flatten().tolist()):
            kl[b] += 0.5 * (m_ ** 2 + np.exp(lv) - 1 - lv)
    assert torch.allclose(post.kl(), kl, rtol=1e-5)


def test_vd_checkpoint_round_trip_and_fingerprint(tmp_path):
    m = _vd_tiny_vae(seed=1)
    path = str(tmp_path / 'vae.pt')
    vae.save_vae(path, m, 0.5, extra={'step': 3})
    assert not os.path.exists(path + '.tmp')
    ck = torch.load(path, map_location='cpu', weights_only=True)
    assert ck['config'] == m.config and ck['scale_factor'] == 0.5 and ck['step'] == 3
    m2, scale = vae.load_vae(path)
    assert scale == 0.5
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    assert vae.vae_fingerprint(m) == vae.vae_fingerprint(m2)
    with torch.no_grad():
        m2.decoder.conv_out.bias[0] += 1e-3
    assert vae.vae_fingerprint(m) != vae.vae_fingerprint(m2)
    assert vae.vae_fingerprint(m) != vae.vae_fingerprint(_vd_tiny_vae(seed=2))


def test_vd_train_lowers_loss_and_resumes_exactly(tmp_path):
    images, _ = data.make_shapes(24, seed=0, size=16)
    cfg = _vd_tiny_config(ch_mult=[1, 2], resolution=16)
    kw = dict(steps=12, batch_size=8, lr=2e-3, device='cpu', log_every=100, seed=0,
              config=cfg, kl_weight=1e-4)
    torch.manual_seed(0)
    psnr_init = vae.evaluate_psnr(vae.AutoencoderKL(cfg), images)   # same init as seed 0
    a = vae.train_vae(images, str(tmp_path / 'a' / 'vae.pt'), **kw)
    model_a, scale_a = vae.load_vae(a)
    assert vae.evaluate_psnr(model_a, images) > psnr_init + 3.0
    assert np.isfinite(scale_a) and scale_a > 0
    # interrupted run: stop after step 5 (state saved), then resume to the end
    b = str(tmp_path / 'b' / 'vae.pt')
    vae.train_vae(images, b, stop_at_step=5, **kw)
    assert torch.load(vae.train_state_path(b), weights_only=True)['step'] == 5
    vae.train_vae(images, b, **kw)
    model_b, scale_b = vae.load_vae(b)
    for k, v in model_a.state_dict().items():
        assert torch.equal(v, model_b.state_dict()[k]), k
    assert scale_a == scale_b
    grid = str(tmp_path / 'recon.png')
    vae.save_recon_grid(model_b, images, grid, n=4)
    assert Image.open(grid).size == (4 * 16, 2 * 16)


def test_vd_psnr_of_known_error():
    # a VAE-shaped stub that returns its input + 10/127.5 gives an error of 10 grey levels
    class Stub(torch.nn.Module):
        def encode(self, x):
            return vae.DiagonalGaussian(torch.cat([x, torch.zeros_like(x)], 1))

        def decode(self, z):
            return z + 10 / 127.5
    images = np.full((2, 4, 4, 3), 100, dtype=np.uint8)
    assert abs(vae.evaluate_psnr(Stub(), images) - 10 * np.log10(255 ** 2 / 100)) < 1e-6


# ----------------------------------------------------------------------------- data.py

@pytest.mark.parametrize('as_tar', [False, True])
def test_vd_cifar_reader_round_trip(tmp_path, as_tar):
    train_x, train_y, test_x, test_y = _vd_write_fake_cifar(str(tmp_path), as_tar)
    x, y = data.load_cifar10(str(tmp_path), train=True)
    assert x.dtype == np.uint8 and x.shape == (15, 32, 32, 3) and y.dtype == np.int64
    assert np.array_equal(x, train_x) and np.array_equal(y, train_y)
    assert tuple(x[0, 3, 5]) == (10, 20, 30)               # channel-major order decoded
    x, y = data.load_cifar10(str(tmp_path), train=False)
    assert np.array_equal(x, test_x) and np.array_equal(y, test_y)
    assert tuple(x[0, 3, 5]) == (10, 20, 30)


def test_vd_cifar_missing_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match='cifar-10-python.tar.gz'):
        data.load_cifar10(str(tmp_path / 'empty'))


def test_vd_cifar_download_md5(tmp_path):
    src = tmp_path / 'src'
    train_x, _, _, _ = _vd_write_fake_cifar(str(src), as_tar=True)
    archive = src / 'cifar-10-python.tar.gz'
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    url = archive.as_uri()                                  # file:// URL, no network
    root = tmp_path / 'dl'
    path = data.download_cifar10(str(root), url=url, md5=md5)
    assert os.path.isfile(path)
    x, _ = data.load_cifar10(str(root), train=True)
    assert np.array_equal(x, train_x)
    bad_root = tmp_path / 'bad'
    with pytest.raises(ValueError, match='md5'):
        data.download_cifar10(str(bad_root), url=url, md5='0' * 32)
    assert os.listdir(bad_root) == []                      # nothing left behind
    with pytest.raises(RuntimeError, match='cifar-10-batches-py'):
        data.download_cifar10(str(tmp_path / 'off'), url=(tmp_path / 'missing.tar.gz').as_uri())


def test_vd_real_cifar10_counts():
    if not (_VD_CIFAR_ROOT / 'cifar-10-batches-py').is_dir():
        pytest.skip(f"real CIFAR-10 not found under {_VD_CIFAR_ROOT}")
    x, y = data.load_cifar10(str(_VD_CIFAR_ROOT), train=True)
    assert x.shape == (50000, 32, 32, 3) and x.dtype == np.uint8
    assert np.array_equal(np.bincount(y, minlength=10), np.full(10, 5000))
    x, y = data.load_cifar10(str(_VD_CIFAR_ROOT), train=False)
    assert x.shape == (10000, 32, 32, 3)
    assert np.array_equal(np.bincount(y, minlength=10), np.full(10, 1000))


def test_vd_center_crop_arr():
    # 600x400 (W x H), blue, with a red 200x200 square at its centre
    arr = np.zeros((400, 600, 3), dtype=np.uint8)
    arr[..., 2] = 255
    arr[100:300, 200:400] = (255, 0, 0)
    out = np.asarray(data.center_crop_arr(Image.fromarray(arr), 256))
    assert out.shape == (256, 256, 3)
    # 400 -> 256 (x0.64): the red square spans [64, 192) of the 384-wide resize, the crop
    # starts at (384 - 256) // 2 = 64, so red covers [64, 192) of the crop in both axes
    assert tuple(out[128, 128]) == (255, 0, 0)
    assert tuple(out[70, 70]) == (255, 0, 0) and tuple(out[185, 185]) == (255, 0, 0)
    assert tuple(out[10, 10]) == (0, 0, 255) and tuple(out[128, 250]) == (0, 0, 255)
    # a big image is first halved with BOX (1200x800 -> 600x400) and gives the same crop
    big = np.asarray(Image.fromarray(arr).resize((1200, 800), Image.NEAREST))
    out2 = np.asarray(data.center_crop_arr(Image.fromarray(big), 256))
    assert out2.shape == (256, 256, 3) and np.array_equal(out2, out)
    # a portrait image: short side = width
    assert data.center_crop_arr(Image.new('RGB', (300, 500)), 64).size == (64, 64)


def test_vd_image_folder(tmp_path):
    root = tmp_path / 'imgs'
    (root / 'b_dog').mkdir(parents=True)
    (root / 'a_cat').mkdir()
    Image.new('L', (50, 40), 128).save(root / 'a_cat' / '1.png')
    Image.new('RGBA', (40, 50), (255, 0, 0, 10)).save(root / 'a_cat' / '2.png')
    Image.new('P', (64, 64)).save(root / 'b_dog' / '3.png')
    Image.new('RGB', (80, 60), (0, 255, 0)).save(root / 'b_dog' / '4.jpg')
    ds = data.ImageFolderDataset(str(root), image_size=32)
    assert ds.classes == ['a_cat', 'b_dog'] and list(ds.labels) == [0, 0, 1, 1]
    for i in range(4):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert -1 <= x.min() and x.max() <= 1
    assert torch.allclose(ds[1][0][:, 5, 5], torch.tensor([1.0, -1.0, -1.0]))   # RGBA -> RGB
    aug = data.ImageFolderDataset(str(root), image_size=32, train_aug=True)
    assert aug[3][0].shape == (3, 32, 32)
    (root / 'b_dog' / 'broken.jpg').write_bytes(b'not a jpeg')
    ds = data.ImageFolderDataset(str(root), image_size=32)
    assert ds.samples[4][0].endswith('broken.jpg')
    with pytest.raises(RuntimeError, match='broken.jpg'):
        ds[4]
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='class subfolders'):
        data.ImageFolderDataset(str(tmp_path / 'empty'))


def test_vd_make_shapes():
    x, y = data.make_shapes(200, seed=3)
    x2, y2 = data.make_shapes(200, seed=3)
    assert x.shape == (200, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert np.array_equal(np.bincount(y, minlength=10), np.full(10, 20))
    assert len(data.SHAPES_CLASSES) == 10
    # classes differ: mean colour of the bright (shape) pixels differs between classes
    means = np.stack([x[y == c][x[y == c].max(-1) > 120].mean(0) for c in range(10)])
    assert np.min([np.abs(means[i] - means[j]).max() for i in range(10) for j in range(i)]) > 10


def test_vd_latent_cache(tmp_path, monkeypatch):
    images, labels = data.make_shapes(20, seed=0)
    m = _vd_tiny_vae(seed=0)
    calls = []                                     # count the VAE's encode calls
    encode = m.encode
    monkeypatch.setattr(m, 'encode', lambda x: calls.append(len(x)) or encode(x))
    counting = m
    path = str(tmp_path / 'cache')
    kw = dict(scale_factor=0.7, batch_size=8, device='cpu', dataset_name='shapes')
    # "interrupted": only the first of 3 batches
    assert data.build_latent_cache(counting, images, labels, path, max_batches=1, **kw) == 1
    assert len(calls) == 1
    assert list(np.load(os.path.join(path, 'done.npy'))) == [True, False, False]
    with pytest.raises(ValueError, match='incomplete'):
        data.LatentDataset(path)
    # resume: only the two missing batches are encoded
    assert data.build_latent_cache(counting, images, labels, path, **kw) == 2
    assert len(calls) == 2 + 1
    assert data.build_latent_cache(counting, images, labels, path, **kw) == 0
    # moments equal a direct encoding of the images and of their flips
    moments = np.load(os.path.join(path, 'moments.npy'))
    assert moments.shape == (20, 2, 8, 8, 8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        plain, flipped = m.encode(x), m.encode(x.flip(3))
    assert np.allclose(moments[:, 0, :4], plain.mean.numpy(), atol=1e-5)
    assert np.allclose(moments[:, 0, 4:], plain.logvar.numpy(), atol=1e-5)
    assert np.allclose(moments[:, 1, :4], flipped.mean.numpy(), atol=1e-5)
    assert not np.allclose(moments[:, 1, :4], plain.mean.numpy(), atol=1e-3)
    assert np.array_equal(np.load(os.path.join(path, 'labels.npy')), labels)
    # another VAE is refused, at build time and at read time
    other = _vd_tiny_vae(seed=5)
    with pytest.raises(ValueError, match='another VAE'):
        data.build_latent_cache(other, images, labels, path, **kw)
    with pytest.raises(ValueError, match='another VAE'):
        data.LatentDataset(path, vae_fingerprint=vae.vae_fingerprint(other))
    # LatentDataset: fresh samples, mean ~ scale * average of plain and flipped means
    ds = data.LatentDataset(path, vae_fingerprint=vae.vae_fingerprint(m))
    assert len(ds) == 20 and ds.scale_factor == 0.7 and ds.latent_shape == (4, 8, 8)
    mb, lb = ds.moments_batch([3, 1, 17])                          # raw moments, any order
    assert torch.equal(mb, torch.from_numpy(moments[[3, 1, 17]]))
    assert torch.equal(lb, torch.from_numpy(labels[[3, 1, 17]]))
    torch.manual_seed(0)
    n = 3000
    zs = torch.stack([ds[3][0] for _ in range(n)])                    # (n, 4, 8, 8)
    assert zs.dtype == torch.float32 and int(ds[3][1]) == labels[3]
    m0, m1 = torch.from_numpy(moments[3, 0, :4]), torch.from_numpy(moments[3, 1, :4])
    v0, v1 = (torch.from_numpy(moments[3, k, 4:]).exp() for k in (0, 1))
    expect = 0.7 * (m0 + m1) / 2
    var = 0.7 ** 2 * ((v0 + v1) / 2 + (m0 - m1) ** 2 / 4)             # variance of the mixture
    assert ((zs.mean(0) - expect).abs() <= 5 * (var / n).sqrt() + 1e-6).all()
    torch.manual_seed(0)
    z_again = torch.stack([ds[3][0] for _ in range(n)])
    assert torch.equal(zs, z_again)                                    # global RNG decides


def test_vd_latent_cache_from_image_folder(tmp_path):
    root = tmp_path / 'imgs'
    for c in ('x', 'y'):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
                            ).save(root / c / f'{i}.png')
    ds = data.ImageFolderDataset(str(root), image_size=32)
    m = _vd_tiny_vae(seed=0)
    path = str(tmp_path / 'cache')
    data.build_latent_cache(m, ds, None, path, scale_factor=1.0, batch_size=4)
    moments = np.load(os.path.join(path, 'moments.npy'))
    assert list(np.load(os.path.join(path, 'labels.npy'))) == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        direct = m.encode(ds[4][0][None]).mean[0].numpy()
    assert np.allclose(moments[4, 0, :4], direct, atol=1e-5)
