"""Tests of vae.py (the KL-16 and toy VAEs, posterior, checkpoints, training and its lr
schedule, latent standardisation, its Muon/Adam split, PSNR) and data.py (atomic files, the
CIFAR-10 reader and download, crop, image folders, shapes, the latent cache, the allocator
setting). The real-CIFAR-10 test skips without ../shared/data."""

import hashlib
import io
import math
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
import vae

from conftest import CIFAR_ROOT, ROOT
from test_flowar import _reference_shapes


def _tiny_config(**over):
    # a very small VAE (f = 4) so that tests take milliseconds
    cfg = dict(vae.PRESETS['cifar'])
    cfg.update(ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8)
    cfg.update(over)
    return cfg


def _tiny_vae(seed=0, **over):
    torch.manual_seed(seed)
    return vae.AutoencoderKL(_tiny_config(**over)).eval()


def _fake_cifar_batch(n, seed):
    # n images in the real pickle format: b'data' (n, 3072) uint8 channel-major
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    imgs[0, 3, 5] = (10, 20, 30)                        # R != G != B at row 3, column 5
    labels = [int(v) for v in rng.integers(0, 10, n)]
    flat = imgs.transpose(0, 3, 1, 2).reshape(n, 3072)   # channel-major, as CIFAR stores it
    blob = pickle.dumps({b'batch_label': b'fake', b'labels': labels, b'data': flat,
                         b'filenames': [b'x.png'] * n}, protocol=2)
    return blob, imgs, np.array(labels)


def _write_fake_cifar(root, as_tar):
    # 5 training batches of 3 images and a test batch of 4; returns the expected arrays
    files, train_x, train_y = {}, [], []
    for i in range(1, 6):
        blob, x, y = _fake_cifar_batch(3, seed=i)
        files[f'data_batch_{i}'] = blob
        train_x.append(x), train_y.append(y)
    blob, test_x, test_y = _fake_cifar_batch(4, seed=99)
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


# ---------------------------------------------------------------------------------------
# vae.py
# ---------------------------------------------------------------------------------------

def test_kl16_parameter_count_and_keys():
    m = vae.AutoencoderKL.from_preset('kl16')
    assert sum(p.numel() for p in m.parameters()) == 66_456_019
    assert len(list(m.buffers())) == 0
    ref = _reference_shapes('mar_kl16_vae')
    own = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert own == ref


def test_kl16_reference_checkpoint_loads_strictly(tmp_path):
    ref = _reference_shapes('mar_kl16_vae')
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


def test_load_vae_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='vae.pt'):
        vae.load_vae(str(tmp_path / 'nope.pt'))


def test_encode_decode_shapes():
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


def test_posterior_formulas():
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


def test_checkpoint_round_trip_and_fingerprint(tmp_path):
    m = _tiny_vae(seed=1)
    path = str(tmp_path / 'vae.pt')
    vae.save_vae(path, m, 0.5, extra={'step': 3})
    assert not list(tmp_path.glob('*.tmp*'))
    ck = torch.load(path, map_location='cpu', weights_only=True)
    assert ck['config'] == m.config and ck['scale_factor'] == 0.5 and ck['step'] == 3
    m2, scale = vae.load_vae(path)
    assert scale == 0.5
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    assert data.vae_fingerprint(m) == data.vae_fingerprint(m2)
    with torch.no_grad():
        m2.decoder.conv_out.bias[0] += 1e-3
    assert data.vae_fingerprint(m) != data.vae_fingerprint(m2)
    assert data.vae_fingerprint(m) != data.vae_fingerprint(_tiny_vae(seed=2))


def test_train_lowers_loss_and_resumes_exactly(tmp_path):
    images, _ = data.make_shapes(24, seed=0, size=16)
    cfg = _tiny_config(ch_mult=[1, 2], resolution=16)
    recipe = vae.VAERecipe(steps=12, batch_size=8, lr=2e-3, seed=0, kl_weight=1e-4)
    kw = dict(device='cpu', log_every=100, config=cfg)
    torch.manual_seed(0)
    psnr_init = vae.evaluate_psnr(vae.AutoencoderKL(cfg), images)   # same init as seed 0
    a = vae.train_vae(images, str(tmp_path / 'a' / 'vae.pt'), recipe, **kw)
    model_a, scale_a = vae.load_vae(a)
    assert vae.evaluate_psnr(model_a, images) > psnr_init + 3.0
    assert np.isfinite(scale_a) and scale_a > 0
    with torch.no_grad():                # the latent channels were standardized at the end
        means = model_a.encode(data.to_float(torch.from_numpy(images))).mean       # (24, C, h, w)
    assert means.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (means.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4
    # interrupted run: stop after step 5 (state saved), then resume to the end
    b = str(tmp_path / 'b' / 'vae.pt')
    vae.train_vae(images, b, recipe, stop_at_step=5, **kw)
    assert torch.load(vae.train_state_path(b), weights_only=True)['step'] == 5
    vae.train_vae(images, b, recipe, **kw)
    model_b, scale_b = vae.load_vae(b)
    for k, v in model_a.state_dict().items():
        assert torch.equal(v, model_b.state_dict()[k]), k
    assert scale_a == scale_b
    grid = str(tmp_path / 'recon.png')
    vae.save_recon_grid(model_b, images, grid, n=4)
    assert Image.open(grid).size == (4 * 16, 2 * 16)


def test_vae_uses_the_same_schedule_with_a_one_based_warmup_and_a_time_budget(tmp_path, monkeypatch):
    # vae.train_vae: lr_at(x, lr, 0.1 * lr, warmup, steps) with x = step + 1 in the warm-up
    # (the first step is not spent at lr 0), x = step after it, and with a time budget the
    # cosine part moves with the elapsed fraction of the budget when that is further along
    calls, lr_at = [], train.lr_at                                   # one schedule: train.py's
    monkeypatch.setattr(train, 'lr_at', lambda *a: calls.append(a) or lr_at(*a))
    vae.train_vae(data.make_shapes(8, seed=0, size=16)[0], str(tmp_path / 'vae.pt'),
                  vae.VAERecipe(steps=2, batch_size=4, lr=1e-3), config=_tiny_config(ch_mult=[1, 2], resolution=16))
    # every param group at both steps (warm-up of 1 step: x = 1, then x = step = 1)
    assert len(calls) >= 2 and set(calls) == {(1, 1e-3, 0.1 * 1e-3, 1, 2)}
    monkeypatch.undo()
    lr = lambda step, elapsed=0.0, budget=None: train.lr_at(
        vae._schedule_position(step, 600, 30, elapsed, budget), 2e-3, 2e-4, 30, 600)
    assert math.isclose(lr(0), 2e-3 / 30) and math.isclose(lr(29), 2e-3)
    assert math.isclose(lr(30), 2e-3) and math.isclose(lr(315), 2e-4 + 1.8e-3 * 0.5)
    assert math.isclose(lr(599), 2e-4 + 1.8e-3 * 0.5 * (1 + math.cos(math.pi * 569 / 570)))
    assert math.isclose(lr(100, elapsed=50, budget=100), lr(315))     # half the budget used
    assert math.isclose(lr(100, elapsed=100, budget=100), 2e-4)      # budget over: the floor
    assert math.isclose(lr(10, elapsed=90, budget=100), 2e-3 * 11 / 30)  # warm-up by steps


def test_train_bf16_steps_run_under_autocast_and_learn(tmp_path, monkeypatch):
    images, _ = data.make_shapes(24, seed=0, size=16)
    cfg = _tiny_config(ch_mult=[1, 2], resolution=16)
    seen, batch_loss = [], vae._batch_loss
    def spy(model, x, *a):
        seen.append((torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16,
                     x.is_contiguous()))   # data.to_float: channels-last views are a slow CPU path
        return batch_loss(model, x, *a)
    monkeypatch.setattr(vae, '_batch_loss', spy)
    torch.manual_seed(0)
    psnr_init = vae.evaluate_psnr(vae.AutoencoderKL(cfg), images)
    out = vae.train_vae(images, str(tmp_path / 'vae.pt'),
                        vae.VAERecipe(steps=12, batch_size=8, kl_weight=1e-4, precision='bf16'), config=cfg)
    assert seen == [(True, True)] * 12
    assert vae.evaluate_psnr(vae.load_vae(out)[0], images) > psnr_init + 3.0


def test_standardize_latent_channels_keeps_reconstructions():
    images, _ = data.make_shapes(64, seed=0, size=16)
    model = _tiny_vae(seed=0, ch_mult=[1, 2], resolution=16)
    with torch.no_grad():
        model.quant_conv.bias[:4] += torch.tensor([3.0, -2.0, 0.5, 1.0])   # offsets, as training leaves
        x = data.to_float(torch.from_numpy(images))
        post0 = model.encode(x)
        rec0 = model.decode(post0.mean)
        m, s, scale = vae.standardize_latent_channels(model, images, max_images=64)
        post1 = model.encode(x)
        rec1 = model.decode(post1.mean)
        g = torch.Generator().manual_seed(0)
        z = torch.cat([post1.mean + post1.std * torch.randn(post1.mean.shape, generator=g) for _ in range(20)])
    assert torch.allclose(rec1, rec0, atol=1e-5)                           # same reconstructions
    assert post1.mean.mean(dim=(0, 2, 3)).abs().max() < 1e-4                # channel means 0 ...
    assert (post1.mean.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4           # ... and sds 1
    assert torch.allclose(post1.std, post0.std / s[None, :, None, None], rtol=1e-4)  # the posterior scaled alike
    assert torch.allclose(post1.mean, (post0.mean - m[None, :, None, None]) / s[None, :, None, None], atol=1e-5)
    assert post1.std.mean() > 0.3 and abs(scale * z.std() - 1) < 0.01   # MAR's 1 / std(z), closed form


def test_conv_muon_orthogonalises_with_momentum_at_adam_rms():
    torch.manual_seed(0)
    model = vae.AutoencoderKL(vae.PRESETS['cifar'])
    names = {id(p): n for n, p in model.named_parameters()}
    (adam,) = vae.make_vae_optimizers(model, 1e-3, 'adam')
    assert isinstance(adam, torch.optim.Adam) and len(adam.param_groups[0]['params']) == len(names)
    with pytest.raises(ValueError, match="'adam' or 'muon'"):
        vae.make_vae_optimizers(model, 1e-3, 'sgd')
    muon, adam = vae.make_vae_optimizers(model, 1e-3, 'muon')
    on_muon = {names[id(p)] for g in muon.param_groups for p in g['params']}
    on_adam = {names[id(p)] for g in adam.param_groups for p in g['params']}
    assert not on_muon & on_adam and on_muon | on_adam == set(names.values())   # each parameter once
    assert 'encoder.down.0.block.0.conv1.weight' in on_muon and 'decoder.mid.attn_1.q.weight' in on_muon
    for first_last_latent in ('encoder.conv_in.weight', 'encoder.conv_out.weight', 'quant_conv.weight',
                              'post_quant_conv.weight', 'decoder.conv_in.weight', 'decoder.conv_out.weight'):
        assert first_last_latent in on_adam
    assert isinstance(muon, train.Muon) and muon.param_groups[0]['weight_decay'] == 0.0
    # step 1 moves against the gradient with the RMS of an Adam step (0.2 lr); step 2 with a
    # zero gradient still moves, by the momentum alone
    w = model.encoder.down[0].block[0].conv1.weight
    g = torch.randn_like(w)
    w0 = w.detach().clone()
    w.grad = g
    muon.step()
    d1 = w.detach() - w0
    assert 0.13e-3 < d1.pow(2).mean().sqrt().item() < 0.23e-3
    assert torch.nn.functional.cosine_similarity(d1.flatten(), -g.flatten(), dim=0) > 0.3
    w.grad = torch.zeros_like(w)
    muon.step()
    d2 = w.detach() - w0 - d1
    assert torch.nn.functional.cosine_similarity(d2.flatten(), d1.flatten(), dim=0) > 0.99


def test_psnr_of_known_error():
    # a VAE-shaped stub that returns its input + 10/127.5 gives an error of 10 grey levels
    class Stub(torch.nn.Module):
        def encode(self, x):
            return vae.DiagonalGaussian(torch.cat([x, torch.zeros_like(x)], 1))

        def decode(self, z):
            return z + 10 / 127.5
    images = np.full((2, 4, 4, 3), 100, dtype=np.uint8)
    assert abs(vae.evaluate_psnr(Stub(), images) - 10 * np.log10(255 ** 2 / 100)) < 1e-6


# ---------------------------------------------------------------------------------------
# data.py
# ---------------------------------------------------------------------------------------

def test_atomic_file_never_leaves_a_half_written_file(tmp_path):
    path = str(tmp_path / 'sub' / 'x.pt')
    data.atomic_save({'a': torch.ones(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)['a'], torch.ones(2))
    with pytest.raises(RuntimeError, match='crash'):        # a crash while writing the new one
        with data.atomic_file(path) as tmp:
            with open(tmp, 'wb') as f:
                f.write(b'half')
            raise RuntimeError('crash')
    assert torch.equal(torch.load(path, weights_only=True)['a'], torch.ones(2))   # old file intact
    assert os.listdir(tmp_path / 'sub') == ['x.pt']


@pytest.mark.parametrize('as_tar', [False, True])
def test_cifar_reader_round_trip(tmp_path, as_tar):
    train_x, train_y, test_x, test_y = _write_fake_cifar(str(tmp_path), as_tar)
    x, y = data.load_cifar10(str(tmp_path), train=True)
    assert x.dtype == np.uint8 and x.shape == (15, 32, 32, 3) and y.dtype == np.int64
    assert np.array_equal(x, train_x) and np.array_equal(y, train_y)
    assert tuple(x[0, 3, 5]) == (10, 20, 30)               # channel-major order decoded
    x, y = data.load_cifar10(str(tmp_path), train=False)
    assert np.array_equal(x, test_x) and np.array_equal(y, test_y)
    assert tuple(x[0, 3, 5]) == (10, 20, 30)


def test_cifar_missing_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match='cifar-10-python.tar.gz'):
        data.load_cifar10(str(tmp_path / 'empty'))


def test_cifar_download_md5(tmp_path):
    src = tmp_path / 'src'
    train_x, _, _, _ = _write_fake_cifar(str(src), as_tar=True)
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


def test_real_cifar10_counts():
    if not (CIFAR_ROOT / 'cifar-10-batches-py').is_dir():
        pytest.skip(f"real CIFAR-10 not found under {CIFAR_ROOT}")
    x, y = data.load_cifar10(str(CIFAR_ROOT), train=True)
    assert x.shape == (50000, 32, 32, 3) and x.dtype == np.uint8
    assert np.array_equal(np.bincount(y, minlength=10), np.full(10, 5000))
    x, y = data.load_cifar10(str(CIFAR_ROOT), train=False)
    assert x.shape == (10000, 32, 32, 3)
    assert np.array_equal(np.bincount(y, minlength=10), np.full(10, 1000))


def test_center_crop_arr():
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


def test_image_folder(tmp_path):
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
    (root / 'b_dog' / 'broken.jpg').write_bytes(b'not a jpeg')
    ds = data.ImageFolderDataset(str(root), image_size=32)
    assert ds.samples[4][0].endswith('broken.jpg')
    with pytest.raises(RuntimeError, match='broken.jpg'):
        ds[4]
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='class subfolders'):
        data.ImageFolderDataset(str(tmp_path / 'empty'))


def test_make_shapes():
    x, y = data.make_shapes(200, seed=3)
    x2, y2 = data.make_shapes(200, seed=3)
    assert x.shape == (200, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert np.array_equal(np.bincount(y, minlength=10), np.full(10, 20))
    # classes differ: mean colour of the bright (shape) pixels differs between classes
    means = np.stack([x[y == c][x[y == c].max(-1) > 120].mean(0) for c in range(10)])
    assert np.min([np.abs(means[i] - means[j]).max() for i in range(10) for j in range(i)]) > 10


def test_latent_cache(tmp_path, monkeypatch):
    images, labels = data.make_shapes(20, seed=0)
    m = _tiny_vae(seed=0)
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
    other = _tiny_vae(seed=5)
    with pytest.raises(ValueError, match='another VAE'):
        data.build_latent_cache(other, images, labels, path, **kw)
    with pytest.raises(ValueError, match='another VAE'):
        data.LatentDataset(path, vae_fingerprint=data.vae_fingerprint(other))
    ds = data.LatentDataset(path, vae_fingerprint=data.vae_fingerprint(m))
    assert len(ds) == 20 and ds.scale_factor == 0.7 and ds.latent_shape == (4, 8, 8)
    mb, lb = ds.moments_batch([3, 1, 17])                          # raw moments, any order
    assert torch.equal(mb, torch.from_numpy(moments[[3, 1, 17]]))
    assert torch.equal(lb, torch.from_numpy(labels[[3, 1, 17]]))
    # train.make_batch: a fresh posterior sample of plain or flipped moments every step;
    # over many steps the mean is scale * the average of the plain and flipped means
    n = 1500
    mcfg = dict(scales=[[1, 1], [2, 2], [4, 4], [8, 8]], latent_channels=4, num_classes=10)
    zs = torch.cat([train.make_batch(ds, [3], 0, dict(seed=0, label_drop=0.0), step, mcfg, 'cpu')[0]
                    for step in range(n)])                              # (n, 4, 8, 8)
    assert zs.dtype == torch.float32
    m0, m1 = torch.from_numpy(moments[3, 0, :4]), torch.from_numpy(moments[3, 1, :4])
    v0, v1 = (torch.from_numpy(moments[3, k, 4:]).exp() for k in (0, 1))
    expect = 0.7 * (m0 + m1) / 2
    var = 0.7 ** 2 * ((v0 + v1) / 2 + (m0 - m1) ** 2 / 4)             # variance of the mixture
    assert ((zs.mean(0) - expect).abs() <= 5 * (var / n).sqrt() + 1e-6).all()


def test_latent_cache_in_bf16_is_close_to_fp32_and_stored_fp32(tmp_path):
    # precision='bf16' encodes under autocast (the toy's cache): the means differ from the
    # fp32 ones (autocast took effect) by a small fraction of their spread
    images, labels = data.make_shapes(8, seed=0)
    m = _tiny_vae(seed=0)
    kw = dict(scale_factor=1.0, batch_size=8, device='cpu', flips=False)
    data.build_latent_cache(m, images, labels, str(tmp_path / 'fp32'), **kw)
    data.build_latent_cache(m, images, labels, str(tmp_path / 'bf16'), precision='bf16', **kw)
    a, b = (np.load(str(tmp_path / p / 'moments.npy'))[:, 0, :4] for p in ('fp32', 'bf16'))
    assert b.dtype == np.float32 and not np.array_equal(a, b)
    assert np.abs(a - b).mean() < 0.02 * a.std() and np.abs(a - b).max() < 0.1 * a.std()


def test_latent_cache_without_flips(tmp_path):
    # flips=False: one version per image (half the encoding), refused when the existing
    # cache has flips; the dataset and train.make_batch read the plain moments.
    images, labels = data.make_shapes(12, seed=0)
    m = _tiny_vae(seed=0)
    path = str(tmp_path / 'cache')
    kw = dict(scale_factor=0.5, batch_size=8, device='cpu')
    data.build_latent_cache(m, images, labels, path, flips=False, **kw)
    moments = np.load(os.path.join(path, 'moments.npy'))
    assert moments.shape == (12, 1, 8, 8, 8)
    with torch.no_grad():
        plain = m.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert np.allclose(moments[:, 0, :4], plain.mean.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match='flips'):
        data.build_latent_cache(m, images, labels, path, flips=True, **kw)
    ds = data.LatentDataset(path)
    cfg = dict(seed=0, label_drop=0.0)
    model_cfg = dict(scales=[[1, 1], [2, 2], [4, 4], [8, 8]], latent_channels=4, num_classes=10)
    z, y, noise, t = train.make_batch(ds, list(range(12)), 0, cfg, 0, model_cfg, 'cpu')
    mean = torch.from_numpy(moments[:, 0, :4]) * 0.5
    std = torch.from_numpy(moments[:, 0, 4:]).mul(0.5).exp() * 0.5
    assert ((z - mean).abs() <= 6 * std + 1e-6).all() and torch.equal(y, torch.from_numpy(labels))


def test_latent_cache_from_image_folder(tmp_path):
    root = tmp_path / 'imgs'
    for c in ('x', 'y'):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
                            ).save(root / c / f'{i}.png')
    ds = data.ImageFolderDataset(str(root), image_size=32)
    m = _tiny_vae(seed=0)
    path = str(tmp_path / 'cache')
    data.build_latent_cache(m, ds, None, path, scale_factor=1.0, batch_size=4)
    moments = np.load(os.path.join(path, 'moments.npy'))
    assert list(np.load(os.path.join(path, 'labels.npy'))) == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        direct = m.encode(ds[4][0][None]).mean[0].numpy()
    assert np.allclose(moments[4, 0, :4], direct, atol=1e-5)


_ALLOC_SCRIPT = r'''
import resource, sys, torch
import data, flowar
applied = data.keep_freed_memory() if sys.argv[1] == 'tuned' else None
torch.set_num_threads(1)
model = flowar.FlowAR.from_preset('toy').eval()
labels = torch.arange(20) % 10
model.sample(labels, num_steps=4, cfg=3.0)                 # warm up the allocator
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    model.sample(labels, num_steps=4, cfg=3.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
'''


def test_keep_freed_memory_stops_the_page_faults_of_sampling():
    # Two fresh processes run the same toy sampling; the one that called
    # data.keep_freed_memory must reuse freed memory (few page faults), the other one
    # page-faults its big tensors back in on every call.
    if sys.platform != 'linux':
        pytest.skip("glibc's mallopt: Linux only")
    out = {}
    for mode in ('plain', 'tuned'):
        r = subprocess.run([sys.executable, '-c', _ALLOC_SCRIPT, mode], capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
        applied, faults = r.stdout.split()
        out[mode] = int(faults)
    if applied != 'True':
        pytest.skip("not glibc: keep_freed_memory is a no-op here")
    assert out['tuned'] * 5 < out['plain'], out
