"""Tests of sample.py: grids (seeds, --show-scales), .npz sets (one rank = two gloo ranks,
resume from parts), the CLI's refusals, checkpoint loading (EMA by default) and make_grid.
They run on a fake train.py checkpoint of a tiny toy FlowAR (the module-scoped smp_files)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import vae as vae_lib
from flowar import FlowAR

from conftest import ROOT


_PAD = 2  # make_grid's default padding


def _tiny_vae(embed_dim=4):
    cfg = dict(vae_lib.PRESETS['cifar'], ch=16, ch_mult=[1, 1], num_res_blocks=1,
               norm_groups=8, z_channels=embed_dim, embed_dim=embed_dim, resolution=16)
    torch.manual_seed(0)
    return vae_lib.AutoencoderKL(cfg)


@pytest.fixture(scope='module')
def smp_files(tmp_path_factory):
    """A fake train.py checkpoint (toy FlowAR, 4 classes) and its VAE, plus a 3-channel VAE."""
    d = tmp_path_factory.mktemp('smp')
    torch.manual_seed(0)
    model = FlowAR.from_preset('toy', num_classes=4, ar_dim=64, enc_depth=1, dec_depth=1,
                               ar_heads=2, head_depth=1, head_width=64, scales=(1, 2, 4, 8))
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    vae_path = str(d / 'vae.pt')
    vae_lib.save_vae(vae_path, _tiny_vae(), scale_factor=0.5)
    vae3_path = str(d / 'vae3.pt')
    vae_lib.save_vae(vae3_path, _tiny_vae(embed_dim=3), scale_factor=0.5)
    ckpt = dict(model=model.state_dict(), ema=ema, optimizer={}, step=10, epoch=1, rng=None,
                config=dict(preset='shapes-toy', model_preset='toy', model=model.config,
                            dataset='shapes', vae=vae_path, vae_scale_factor=0.5))
    ckpt_path = str(d / 'ckpt.pt')
    torch.save(ckpt, ckpt_path)
    return dict(dir=d, ckpt=ckpt_path, vae=vae_path, vae3=vae3_path)


_FAST = ['--num-steps', '4', '--cfg', '2.0', '--guidance', '0.9', '--device', 'cpu']


def _png(path):
    return np.asarray(Image.open(path).convert('RGB'))


def _cell(grid, row, col, h=16, w=16, pad=_PAD):
    y, x = pad + row * (h + pad), pad + col * (w + pad)
    return grid[y:y + h, x:x + w]


def test_grid_same_seed_same_grid_other_seed_other_grid(smp_files):
    d = smp_files['dir']
    outs = {}
    for name, seed in (('a', 0), ('b', 0), ('c', 1)):
        outs[name] = _png(sample.main(['--ckpt', smp_files['ckpt'], '--per-class', '3', '--seed', str(seed),
                                           '--batch-size', '5', '--out', str(d / f'grid_{name}.png')] + _FAST))
    # 4 classes (one row each) x 3 per class of 16x16 images
    assert outs['a'].shape == (4 * 18 + 2, 3 * 18 + 2, 3)
    assert np.array_equal(outs['a'], outs['b'])
    assert not np.array_equal(outs['a'], outs['c'])


def test_show_scales_columns_and_last_equals_final(smp_files):
    d = smp_files['dir']
    common = ['--ckpt', smp_files['ckpt'], '--classes', '2,0,3', '--per-class', '2', '--seed', '7',
              '--batch-size', '4'] + _FAST
    plain = _png(sample.main(common + ['--out', str(d / 'plain.png')]))
    scales = _png(sample.main(common + ['--show-scales', '--out', str(d / 'scales.png')]))
    n_scales, n_samples = 4, 6  # toy scales 1, 2, 4, 8; 3 classes x 2
    assert scales.shape == (n_samples * 18 + 2, n_scales * 18 + 2, 3)
    for k in range(n_samples):  # plain grid: one row per class, 2 columns
        final = _cell(plain, k // 2, k % 2)
        assert np.array_equal(_cell(scales, k, n_scales - 1), final)
        # the coarse scales are different pictures (the 1x1 map decodes to something else)
        assert not np.array_equal(_cell(scales, k, 0), final)


def _npz_args(smp_files, out, extra=()):
    return ['--ckpt', smp_files['ckpt'], '--num-images', '8', '--npz', out, '--batch-size', '3',
            '--seed', '3'] + _FAST + list(extra)


def test_npz_one_rank_equals_two_ranks_and_resume(smp_files, capsys):
    d = smp_files['dir']
    one = str(d / 'one.npz')
    sample.main(_npz_args(smp_files, one))
    assert not os.path.exists(one + '.parts')  # cleaned up
    with np.load(one) as z:
        a0, a1, lab = z['arr_0'], z['arr_1'], z['labels']
    assert a0.dtype == np.uint8 and a0.shape == (8, 16, 16, 3)
    assert a1.dtype == np.int64 and np.array_equal(a1, [0, 0, 1, 1, 2, 2, 3, 3])
    assert np.array_equal(lab, a1)
    assert len({a0[i].tobytes() for i in range(8)}) == 8  # every image its own noise

    # The same set from two gloo ranks (chunks of 3, 3, 2 dealt round-robin).
    two = str(d / 'two.npz')
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'sample.py')] + _npz_args(smp_files, two)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with np.load(two) as z:
        assert np.array_equal(z['arr_0'], a0)
        assert np.array_equal(z['arr_1'], a1)

    # Resume: an interrupted run leaves some chunks in OUT.npz.parts (kept here with
    # --keep-parts, then one deleted); the next run samples only the missing one.
    res = str(d / 'res.npz')
    sample.main(_npz_args(smp_files, res, ['--keep-parts']))
    parts = res + '.parts'
    os.remove(res)
    os.remove(os.path.join(parts, 'chunk_000001.npy'))
    open(os.path.join(parts, 'chunk_000001.npy.tmp999'), 'wb').close()  # left by a killed rank
    capsys.readouterr()
    sample.main(_npz_args(smp_files, res))
    assert 'resuming: 2 chunk(s) already' in capsys.readouterr().out
    assert not os.path.exists(parts)
    with np.load(res) as z:
        assert np.array_equal(z['arr_0'], a0)

    # Chunks on disk are used as they are (a marker chunk shows it), missing ones sampled.
    sample.main(_npz_args(smp_files, res, ['--keep-parts']))
    np.save(os.path.join(parts, 'chunk_000000.npy'), np.zeros((3, 16, 16, 3), np.uint8))
    os.remove(os.path.join(parts, 'chunk_000002.npy'))
    sample.main(_npz_args(smp_files, res, ['--keep-parts']))
    with np.load(res) as z:
        assert (z['arr_0'][:3] == 0).all() and np.array_equal(z['arr_0'][3:], a0[3:])

    # A parts folder of other settings is refused, not mixed in.
    with pytest.raises(ValueError, match='other settings'):
        sample.main(['--ckpt', smp_files['ckpt'], '--num-images', '8', '--npz', res, '--batch-size', '3',
                     '--seed', '4'] + _FAST)


def test_npz_needs_divisible_count(smp_files):
    with pytest.raises(ValueError, match='not divisible by the 4 classes'):
        sample.main(['--ckpt', smp_files['ckpt'], '--num-images', '6', '--npz',
                     str(smp_files['dir'] / 'x.npz')] + _FAST)


def test_out_of_range_class_is_refused(smp_files, capsys):
    with pytest.raises(SystemExit):
        sample.main(['--ckpt', smp_files['ckpt'], '--classes', '12'] + _FAST)
    assert 'class id 12 is out of range' in capsys.readouterr().err
    with pytest.raises(ValueError, match=r'valid ids are 0\.\.3'):
        sample.parse_classes('1,4', 4)
    assert sample.parse_classes('3, 0', 4) == [3, 0]


def test_num_steps_one_or_one_per_scale(smp_files, capsys):
    assert sample.parse_steps('8') == 8 and sample.parse_steps('50, 8') == [50, 8]
    for bad, msg in (('1', 'must be >= 2'), ('8,x', 'comma-separated integers')):
        with pytest.raises(SystemExit):
            sample.main(['--ckpt', smp_files['ckpt'], '--num-steps', bad, '--cfg', '2.0', '--guidance', '0.9'])
        assert msg in capsys.readouterr().err
    with pytest.raises(ValueError, match='one per scale'):                # 3 grids, 4 scales
        sample.main(['--ckpt', smp_files['ckpt'], '--per-class', '1'] + _FAST + ['--num-steps', '50,4,4'])


def test_vae_with_other_latent_channels_is_refused(smp_files):
    with pytest.raises(ValueError, match='3 latent channels but the FlowAR model has latent_channels=4'):
        sample.main(['--ckpt', smp_files['ckpt'], '--vae', smp_files['vae3'], '--per-class', '1'] + _FAST)


def test_checkpoint_errors(smp_files, capsys):
    d = smp_files['dir']
    ck = torch.load(smp_files['ckpt'], weights_only=True)
    del ck['ema']
    torch.save(ck, d / 'noema.pt')
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['ema'\].*--no-ema"):
        sample.load_model_from_checkpoint(str(d / 'noema.pt'))
    sample.load_model_from_checkpoint(str(d / 'noema.pt'), use_ema=False)  # the raw weights work
    with pytest.raises(FileNotFoundError, match='not found'):
        sample.load_model_from_checkpoint(str(d / 'nope.pt'))
    with pytest.raises(SystemExit):
        sample.main(['--official', str(d / 'x.pth'), '--vae', smp_files['vae']])
    assert '--official needs --model' in capsys.readouterr().err
    for args in (['--ckpt', str(d / 'nope.pt')], ['--ckpt', smp_files['ckpt'], '--vae', str(d / 'nope.pt')]):
        with pytest.raises(SystemExit):  # a missing path is a parser error, not a traceback
            sample.main(args)
        assert 'nope.pt' in capsys.readouterr().err


def test_ema_is_the_default(smp_files):
    ema_model, _ = sample.load_model_from_checkpoint(smp_files['ckpt'])
    raw_model, _ = sample.load_model_from_checkpoint(smp_files['ckpt'], use_ema=False)
    ck = torch.load(smp_files['ckpt'], weights_only=True)
    k = 'z_proj.weight'
    assert torch.equal(ema_model.state_dict()[k], ck['ema'][k])
    assert torch.equal(raw_model.state_dict()[k], ck['model'][k])


def test_checkpoint_of_an_older_version_loads_with_todays_names(smp_files, tmp_path):
    # older checkpoints call the flow head's width `head_dim` and may record `class_dropout`:
    # flowar.upgrade_config maps them once, for sampling and for resuming alike
    ck = torch.load(smp_files['ckpt'], weights_only=True)
    old = dict(ck['config']['model'], class_dropout=0.1)
    old['head_dim'] = old.pop('head_width')
    path = str(tmp_path / 'old.pt')
    torch.save(dict(ck, config=dict(ck['config'], model=old)), path)
    model, config = sample.load_model_from_checkpoint(path)
    assert config['model'] == ck['config']['model'] and model.config == ck['config']['model']
    assert old['head_dim'] == 64 and 'head_dim' in old      # the file itself is not rewritten


def test_make_grid_layout():
    imgs = np.stack([np.full((2, 3, 3), i, np.uint8) for i in range(5)])  # (5, 2, 3, 3)
    g = sample.make_grid(imgs, nrow=2, pad=1, pad_value=255)
    assert g.shape == (3 * 3 + 1, 2 * 4 + 1, 3)
    assert (g[1:3, 1:4] == 0).all() and (g[1:3, 5:8] == 1).all() and (g[7:9, 1:4] == 4).all()
    assert (g[7:9, 5:8] == 255).all()  # the empty sixth cell stays padding


def test_scale_lists_other_than_the_training_one(smp_files, tmp_path, capsys):
    # a learned-embedding model refuses --scales (a parser error); the toy's default grid per
    # scale [50, 8] stretches to a longer list; an explicit --num-steps list must fit it
    with pytest.raises(SystemExit) as e:
        sample.main(['--ckpt', smp_files['ckpt'], '--scales', '1,8', '--out', str(tmp_path / 'g.png')] + _FAST)
    assert e.value.code == 2 and 'scale-free' in capsys.readouterr().err
    st = sample.sampling_settings('toy', scales=[1, 2, 4, 8])
    assert st['num_steps'] == [50, 8, 8, 8] and st['scales'] == [1, 2, 4, 8]
    assert sample.sampling_settings('toy')['scales'] is None
    with pytest.raises(ValueError, match='one per scale'):
        sample.sampling_settings('toy', num_steps=[50, 8], scales=[1, 4, 8])
    with pytest.raises(SystemExit):
        sample.build_parser().parse_args(['--scales', '1,4,2'])
    # a scale-free model samples any list, grid and .npz
    torch.manual_seed(0)
    model = FlowAR.from_preset('toy', num_classes=4, ar_dim=64, enc_depth=1, dec_depth=1, ar_heads=2,
                               head_depth=1, head_width=64, scales=(1, 2, 4, 8), pos_embed='scale-free')
    ck = torch.load(smp_files['ckpt'], weights_only=True)
    ck.update(model=model.state_dict(), ema=model.state_dict(), config=dict(ck['config'], model=model.config))
    path = str(tmp_path / 'flex.pt')
    torch.save(ck, path)
    out = sample.main(['--ckpt', path, '--scales', '1,3,8', '--classes', '0,1', '--per-class', '2',
                       '--out', str(tmp_path / 'g.png')] + _FAST)
    assert _png(out).shape == (2 * 18 + 2, 2 * 18 + 2, 3)
    npz = str(tmp_path / 's.npz')
    sample.main(['--ckpt', path, '--scales', '1,2,3,4,5,6,7,8', '--num-images', '4', '--npz', npz] + _FAST)
    with np.load(npz) as z:
        assert z['arr_0'].shape == (4, 16, 16, 3)
