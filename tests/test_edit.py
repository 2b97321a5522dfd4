"""Tests of edit.py: the masks and known maps of each task, the known-region error, the
command line (a picture, a measured .npz, class-guided labels) and its refusals. They run on
a tiny scale-free toy FlowAR, a random-init cifar VAE and a fake CIFAR-10 test batch."""

import numpy as np
import pytest
import torch
from PIL import Image

import edit
import flowar
import vae as vae_lib
from flowar import FlowAR
from test_vae_data import _write_fake_cifar


@pytest.fixture(scope='module')
def edit_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('edit')
    torch.manual_seed(0)
    paths = {}
    for pe in ('scale-free', 'learned'):
        model = FlowAR.from_preset('toy', ar_dim=64, enc_depth=1, dec_depth=1, ar_heads=2, head_depth=1,
                                   head_width=64, scales=(1, 2, 4, 8), pos_embed=pe)
        sd = model.state_dict()
        paths[pe] = str(d / f'{pe}.pt')
        torch.save(dict(model=sd, ema=sd, step=1, config=dict(model_preset='toy', model=model.config,
                                                              dataset='cifar10', vae=str(d / 'vae.pt'))), paths[pe])
    vae_lib.save_vae(str(d / 'vae.pt'), vae_lib.AutoencoderKL.from_preset('cifar'), scale_factor=1.0)
    _, _, test_x, test_y = _write_fake_cifar(str(d / 'data'), as_tar=False)
    return dict(dir=d, ckpt=paths['scale-free'], learned=paths['learned'], data=str(d / 'data'),
                test_x=test_x, test_y=test_y)


FAST = ['--num-steps', '4', '--cfg', '2.0']


def test_masks_and_known_maps_of_each_task():
    m = edit.pixel_mask('inpaint')
    assert m.shape == (1, 1, 32, 32) and m.sum() == 1024 - 256 and m[0, 0, 8:24, 8:24].sum() == 0
    assert torch.equal(edit.pixel_mask('outpaint'), 1 - m)
    z = torch.randn(2, 4, 8, 8)
    hws = flowar.normalize_scales([1, 2, 4, 8])
    maps, masks = edit.known_for('inpaint', z, hws, m)
    assert torch.equal(maps[-1], z) and masks[0].item() == 0.75              # soft: 3/4 of the area known
    assert masks[-1][0, 0, 2:6, 2:6].sum() == 0 and masks[-1].sum() == 64 - 16
    assert torch.allclose(masks[1], torch.full((1, 1, 2, 2), 0.75))
    maps, masks = edit.known_for('refine', z, hws, k=2)
    assert [mk is None for mk in masks] == [False, False, True, True] and masks[1].sum() == 4
    maps, masks = edit.known_for('expand', z, flowar.normalize_scales([1, 4, 8, 16]))
    assert [mk is None for mk in masks] == [False, False, False, True] and maps[-1].shape == (2, 4, 16, 16)
    for task, scales, kw in (('refine', [1, 2, 4, 8], dict(k=4)), ('expand', [1, 2, 4, 8], {}),
                             ('inpaint', [1, 4, 8, 16], dict(mask=m))):
        with pytest.raises(ValueError):
            edit.known_for(task, z, flowar.normalize_scales(scales), **kw)


def test_known_region_error_is_measured_inside_the_known_region_only():
    orig = np.zeros((2, 32, 32, 3), np.uint8)
    comp, rec = orig.copy(), orig.copy()
    comp[:, 8:24, 8:24] = 200                       # the generated centre: not counted
    comp[:, 0, :] = 10                              # one known row off by 10
    rec[:] = 2
    c, r = edit.known_region_error(orig, comp, rec, edit.pixel_mask('inpaint'))
    assert r == pytest.approx(4.0) and c == pytest.approx(100 * 32 / (1024 - 256))
    comp[:, 7, 8:24] = 50                           # a known pixel next to the centre
    c4, _ = edit.known_region_error(orig, comp, rec, edit.pixel_mask('inpaint'), margin=4)
    assert c4 == pytest.approx(100 * 32 / (1024 - 24 * 24))    # rows 4-27 x cols 4-27 left out


def test_picture_and_measured_set(edit_files, capsys):
    d = edit_files['dir']
    out = edit.main(['--ckpt', edit_files['ckpt'], '--task', 'inpaint', '--images', '0,2', '--data-dir',
                     edit_files['data'], '--per-image', '2', '--out', str(d / 'p.png')] + FAST)
    img = np.asarray(Image.open(out))
    assert img.shape == (2 * 34 + 2, 4 * 34 + 2, 3)                          # 2 rows, original + input + 2
    assert np.array_equal(img[2:34, 2:34], edit_files['test_x'][0])          # the original first
    assert (img[2 + 12, 36 + 12] == 128).all()                               # the input: grey centre
    npz = str(d / 'm.npz')
    edit.main(['--ckpt', edit_files['ckpt'], '--task', 'outpaint', '--npz', npz, '--num-images', '4',
               '--batch-size', '3', '--data-dir', edit_files['data'], '--mechanism', 'between'] + FAST)
    assert 'known region' in capsys.readouterr().out
    with np.load(npz) as f:
        assert f['arr_0'].shape == (4, 32, 32, 3) and np.array_equal(f['labels'], edit_files['test_y'])
    edit.main(['--ckpt', edit_files['ckpt'], '--task', 'inpaint', '--npz', npz, '--num-images', '4',
               '--target-class', '8', '--data-dir', edit_files['data']] + FAST)
    with np.load(npz) as f:
        assert (f['labels'] == 8).all()                                      # class-guided: the target
    for task, extra in (('refine', ['--k', '2']), ('expand', ['--scales', '1,4,8,16'])):
        out = edit.main(['--ckpt', edit_files['ckpt'], '--task', task, '--images', '1', '--per-image', '1',
                         '--data-dir', edit_files['data'], '--out', str(d / f'{task}.png')] + extra + FAST)
        side = 64 if task == 'expand' else 32
        assert np.asarray(Image.open(out)).shape == (side + 4, 3 * (side + 2) + 2, 3)


def test_bad_arguments_are_parser_errors(edit_files, capsys):
    base = ['--ckpt', edit_files['ckpt'], '--data-dir', edit_files['data']] + FAST
    for argv, msg in ((['--task', 'inpaint', '--png', 'x.png'], '--target-class'),
                      (['--task', 'refine', '--k', '4'], '--k must be'),
                      (['--task', 'expand'], 'beyond the latent size'),
                      (['--task', 'inpaint', '--images', '7'], 'within the 4 test images'),
                      (['--task', 'inpaint', '--scales', '1,2,4'], 'latent size')):
        with pytest.raises(SystemExit) as e:
            edit.main(base + argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        edit.main(['--ckpt', edit_files['learned'], '--task', 'inpaint', '--scales', '1,8', '--data-dir',
                   edit_files['data']])
    assert 'scale-free' in capsys.readouterr().err
