"""Tests of ablations.py, the variants of Tables 3-6: every row trains and samples, the
semantic injections of Table 6, the scale lists of Table 4, Table 5's per-token and diffusion
heads (forward process, DDIM, CFG on the epsilons), shared weights, Table 3's image pyramid."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ablations
import data
import flowar
import train
import vae as vae_lib
from flowar import FlowAR

from conftest import _FakeMoments
from test_flowar import _EchoHead, _SemanticsHead, fm_inputs


_ROWS = [(6, r) for r in ablations.TABLES[6]] + [(5, 'per-token'), (4, '1,4,8'), (4, '1,8'),
                                                      (5, 'per-token-diffusion'), (5, 'per-scale-diffusion')]


@pytest.mark.parametrize('table,row', _ROWS)
def test_variant_trains_and_samples(table, row):
    # each row's model fits a handful of latents (loss goes down) and samples the right shape
    model = ablations.build_model(table, row, seed=0).train()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 4, 8, 8, generator=g) * 0.5 + torch.linspace(-1, 1, 8).view(8, 1, 1, 1)
    y = torch.arange(8)
    n = len(model.scales)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(40):
        noise = [torch.randn(8, 4, h, w, generator=g) for h, w in model.scales]
        loss, _ = model(z, y, noise, torch.rand(8, n, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8, (row, losses[:8], losses[-8:])
    out = model.sample(torch.tensor([1, 2]), num_steps=2, cfg=2.0, guidance=1.0,
                       generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def _head_outputs(row, sem, seed=0):
    model = ablations.build_model(6 if row != 'per-token' else 5, row, seed)
    head = model.flownet
    for p in head.parameters():                  # non-zero biases: every path carries signal
        p.data.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 4, generator=g), torch.rand(2, generator=g)
    pos = model.positions[model.slices[1]]       # the 2x2 scale: 4 tokens
    return head(x, t, sem, pos)


def test_injections_differ_and_use_the_semantics_as_the_paper_says():
    g = torch.Generator().manual_seed(2)
    sem = torch.randn(2, 4, 128, generator=g)
    rows = list(ablations.TABLES[6]) + ['per-token']
    outs = {r: _head_outputs(r, sem) for r in rows}
    for i, a in enumerate(rows):                 # no two switches build the same head
        for b in rows[:i]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)
    swapped = sem[:, [1, 0, 2, 3]]               # the semantics of positions 0 and 1 swapped
    for r in rows:
        d = (_head_outputs(r, swapped) - outs[r]).abs().amax(dim=(0, 2))   # (N,)
        if r == 'adaln':                         # pooled semantics: blind to where they are
            assert d.max() < 1e-5, r
        else:                                    # every other injection sees the swap
            assert d.max() > 1e-3, r
    # per-token head (Table 5): each token's velocity depends on its own semantics only
    moved = sem.clone()
    moved[:, 2] += 1.0
    d = (_head_outputs('per-token', moved) - outs['per-token']).abs().amax(dim=(0, 2))
    assert d[2] > 1e-3 and torch.all(d[[0, 1, 3]] < 1e-6)


@pytest.mark.parametrize('row', ['1,4,8', '1,8'])
def test_scale_lists_keep_causality_and_the_kv_cache(row):
    model = ablations.build_model(4, row, seed=0).eval()
    assert [h for h, _ in model.scales] == [int(s) for s in row.split(',')]
    labels = torch.tensor([3])
    _, info = model.sample(labels, num_steps=2, cfg=1.0, generator=torch.Generator().manual_seed(0),
                           return_details=True)
    full = model.semantics(info['maps'], labels)            # teacher-forced, block-causal mask
    for sl, s_hat in zip(model.slices, info['semantics']):
        assert (full[:, sl] - s_hat).abs().max() <= 1e-5
    maps2 = [m.clone() for m in info['maps']]
    maps2[-1] += 1.0                                         # the last scale never feeds back
    assert torch.equal(model.semantics(maps2, labels), full)


def test_cli_refuses_bad_rows_and_missing_base(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ablations.main(['--table', '6', '--rows', 'sum', '--base', str(tmp_path)])
    assert 'not in Table 6' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablations.main(['--table', '4', '--base', str(tmp_path)])
    assert 'run `python train.py' in capsys.readouterr().err


# ---- Table 5's diffusion rows -----------------------------------------------------------

def test_diffusion_forward_process_and_target():
    # x_t = sqrt(abar) x + sqrt(1 - abar) eps with the cosine abar (Nichol & Dhariwal Eq. 17),
    # target eps (Ho et al. L_simple): x_t = x at t = 0, almost pure noise at t = 1
    model = ablations.build_model(5, 'per-scale-diffusion', 0)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    t = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1)
    x_t, target = model.interpolate(x, eps, t)
    assert torch.equal(target, eps) and torch.equal(x_t[0], x[0])
    ab = math.cos(0.508 / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert torch.allclose(x_t[1], math.sqrt(ab) * x[1] + math.sqrt(1 - ab) * eps[1], atol=1e-6)
    amin = ablations.ABAR_MIN                    # t = 1: SNR below 1%
    assert amin < 0.01 and torch.allclose(x_t[2], math.sqrt(amin) * x[2] + math.sqrt(1 - amin) * eps[2], atol=1e-6)
    assert float(ablations.alpha_bar(torch.tensor(1.0, dtype=torch.float64))) == ablations.ABAR_MIN


@pytest.mark.parametrize('num_steps', [2, 8, 25])
def test_ddim_with_the_exact_epsilon_recovers_the_clean_tokens(num_steps):
    # one clean x: the exact epsilon at (x_t, t) is (x_t - sqrt(abar) x) / sqrt(1 - abar);
    # deterministic DDIM along the flow sampler's grid must land on x (an Euler step on eps
    # would not)
    model = ablations.build_model(5, 'per-scale-diffusion', 0)
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 16, 4, generator=g, dtype=torch.float64), torch.randn(2, 16, 4, generator=g)
    ts, seen = flowar.euler_time_grid(num_steps), []

    def predict(x_t, t):
        seen.append(t)
        ab = ablations.alpha_bar(torch.tensor(t, dtype=torch.float64))
        return (x_t - ab.sqrt() * x) / (1 - ab).sqrt()

    out = model.integrate(predict, noise, ts)
    assert out.dtype == torch.float64 and (out - x).abs().max() < 1e-9
    assert seen == ts[:-1].tolist()                      # one head evaluation per flow step


@pytest.mark.parametrize('cfg, guidance', [(3.0, 0.5), (1.0, 1.0)])
def test_diffusion_sampler_applies_cfg_to_the_epsilons(cfg, guidance, monkeypatch):
    # the head predicts constant epsilons e_c / e_u (the semantics' first channels); DDIM
    # with e_u + w (e_c - e_u) inside the guidance interval and e_c outside it. (abar >= 0.1
    # here: DDIM amplifies float32 rounding by 1 / sqrt(abar(1)) when eps is not the noise.)
    monkeypatch.setattr(ablations, 'ABAR_MIN', 0.1)
    torch.manual_seed(0)
    model = ablations.DiffusionFlowAR.from_preset('toy', ar_dim=64, enc_depth=1, dec_depth=1, ar_heads=2,
                                                  head_depth=1, head_width=64).eval()
    model.flownet = _SemanticsHead(4)
    labels = torch.tensor([1, 3])
    _, info = model.sample(labels, num_steps=8, cfg=cfg, guidance=guidance, cfg_ramp=True,
                           generator=torch.Generator().manual_seed(5), return_details=True)
    e_c = model.semantics(info['maps'], labels)[..., :4].double()
    e_u = model.semantics(info['maps'], torch.full_like(labels, 10))[..., :4].double()
    ts = flowar.euler_time_grid(8)
    ab = ablations.alpha_bar(ts)
    g = torch.Generator().manual_seed(5)
    for i, (sl, w) in enumerate(zip(model.slices, flowar.cfg_schedule(len(model.scales), cfg, True))):
        x = torch.randn(2, sl.stop - sl.start, 4, generator=g, dtype=torch.float64)
        for j in range(len(ts) - 1):
            e = e_u[:, sl] + w * (e_c[:, sl] - e_u[:, sl]) if ts[j] <= guidance and w != 1.0 else e_c[:, sl]
            x = ab[j + 1].sqrt() * (x - (1 - ab[j]).sqrt() * e) / ab[j].sqrt() + (1 - ab[j + 1]).sqrt() * e
        assert (flowar.tokens_from_map(info['maps'][i]).double() - x).abs().max() < 1e-4, i


def test_variants_share_the_flow_models_weights_and_the_default_path():
    # the variants start from their flow row's weights; the rows that name the paper's model
    # (Tables 3, 5, 6) all build the plain flowar.FlowAR, whose hooks are Eq. 5 / Euler
    sd = ablations.build_model(6, 'spatial-adaln', 0).state_dict()
    same = lambda m, sd: m.state_dict().keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    for table, row in [(5, 'per-scale'), (3, 'latent-pyramid'), (5, 'per-scale-diffusion'), (3, 'image-pyramid')]:
        m = ablations.build_model(table, row, 0)
        assert same(m, sd) and (type(m) is FlowAR) == (row in ('per-scale', 'latent-pyramid')), row
    assert same(ablations.build_model(5, 'per-token-diffusion', 0), ablations.build_model(5, 'per-token', 0).state_dict())
    model, z, ts = FlowAR.from_preset('toy'), torch.randn(2, 4, 8, 8), flowar.euler_time_grid(8)
    assert all(torch.equal(a, b) for a, b in zip(model.scale_maps(z), flowar.build_scale_pyramid(z, model.scales)))
    v = lambda x, t: x * t + 1
    x = z.double()
    for j in range(len(ts) - 1):                    # Euler, written out
        x = x + (ts[j + 1] - ts[j]).item() * v(x, ts[j].item())
    assert torch.equal(model.integrate(v, z, ts), x)


# ---- Table 3's image pyramid ------------------------------------------------------------

def test_image_pyramid_forward_uses_the_given_maps():
    # with v = x_t (EchoHead) the per-scale loss is a closed form of the maps: it must be
    # that of the given maps, not of a pyramid rebuilt from the finest one
    model = ablations.build_model(3, 'image-pyramid', 0)
    model.flownet = _EchoHead()
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 4, s, s, generator=g) * 3 + 1 for s in (1, 2, 4, 8)]
    noise, t = fm_inputs(maps[-1], g)
    _, per_scale = model(maps, torch.tensor([1, 2]), noise, t)
    expect = [(((1 - t[:, i].view(2, 1, 1, 1)) * s + t[:, i].view(2, 1, 1, 1) * e - (e - s)) ** 2).mean()
              for i, (s, e) in enumerate(zip(maps, noise))]
    assert torch.allclose(per_scale, torch.stack(expect), atol=1e-5)
    rebuilt = ablations.build_model(3, 'latent-pyramid', 0)
    rebuilt.flownet = _EchoHead()
    assert not torch.allclose(rebuilt(maps[-1], torch.tensor([1, 2]), noise, t)[1][:3], per_scale[:3])
    with pytest.raises(ValueError, match='one token map per scale'):
        model(maps[::-1], torch.tensor([1, 2]), noise, t)


def test_image_pyramid_maps_use_make_batchs_draws():
    # finest map = make_batch's posterior sample; a coarse map = (mean + std * r Down(eps, r))
    # * scale factor with make_batch's eps: with mean 0, std 1 everywhere z / sf = eps exactly
    N, sf, scales = 64, 0.5, [(1, 1), (2, 2), (4, 4), (8, 8)]
    base = torch.zeros(N, 1, 8, 8, 8)
    ds = _FakeMoments(base, torch.arange(N) % 10, scale_factor=sf)
    rcfg, mcfg = dict(seed=3, label_drop=0.1, t_sampling='uniform'), dict(scales=scales, latent_channels=4, num_classes=10)
    idx = list(range(5, 37))
    z, *_ = train.make_batch(ds, idx, 0, rcfg, 7, mcfg, 'cpu')
    unit = [torch.zeros(N, 1, 8, s, s) for s in (1, 2, 4)]              # mean 0, logvar 0
    maps = ablations.image_pyramid_maps(unit, ds, idx, z, rcfg, 7, scales)
    assert torch.equal(maps[-1], z) and [m.shape[-1] for m in maps] == [1, 2, 4, 8]
    for m in maps[:-1]:
        r = 8 // m.shape[-1]
        assert torch.allclose(m, F.avg_pool2d(z, r) * r, atol=1e-6)      # the same draw, N(0, 1) again
    assert 0.8 < (maps[0] / sf).std() < 1.2
    means = [torch.randn(N, 1, 8, s, s) for s in (1, 2, 4)]
    for m in means:
        m[:, :, 4:] = -60.0                                                # std ~ 0: the mean itself
    maps = ablations.image_pyramid_maps(means, ds, idx, z, rcfg, 7, scales)
    for m, mom in zip(maps, means):
        assert torch.allclose(m, mom[idx, 0, :4] * sf, atol=1e-6)
    # with flips (P = 2): mean +1 plain, -1 flipped, std ~ 0 at every scale: the coarse maps
    # take make_batch's flip, which z shows
    sign = lambda s: torch.cat([torch.ones(N, 1, 4, s, s), -torch.ones(N, 1, 4, s, s)], 1)
    ds.m = torch.cat([sign(8), torch.full((N, 2, 4, 8, 8), -60.0)], 2)
    z, *_ = train.make_batch(ds, idx, 0, rcfg, 7, mcfg, 'cpu')
    flips = [torch.cat([sign(s), torch.full((N, 2, 4, s, s), -60.0)], 2) for s in (1, 2, 4)]
    maps = ablations.image_pyramid_maps(flips, ds, idx, z, rcfg, 7, scales)
    assert 0 < int((z[:, 0, 0, 0] < 0).sum()) < len(idx)                 # both versions occur
    for m in maps[:-1]:
        assert torch.allclose(m[:, 0, 0, 0], z[:, 0, 0, 0], atol=1e-6)


def test_image_pyramid_moments_encode_the_downsampled_images_once(tmp_path, monkeypatch):
    torch.manual_seed(0)
    v = vae_lib.AutoencoderKL.from_preset('cifar').eval()
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(6)
    monkeypatch.setattr(data, 'load_cifar10', lambda root, train=True, download=False: (images, labels))
    ds = type('DS', (), dict(header=dict(flips=True), labels=labels, __len__=lambda self: 6))()
    path, scales = str(tmp_path / 'pyr.pt'), [(1, 1), (2, 2), (4, 4), (8, 8)]
    moments = ablations.image_pyramid_moments(v, ds, scales, 'unused', path)
    assert [tuple(m.shape) for m in moments] == [(6, 2, 8, s, s) for s in (1, 2, 4)]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    for m, s in zip(moments, (4, 8, 16)):
        for p, xp in enumerate([x, x.flip(3)]):
            post = v.encode(F.interpolate(xp, size=(s, s), mode='area'))
            assert torch.allclose(m[:, p], torch.cat([post.mean, post.logvar], 1), atol=1e-5)
    monkeypatch.setattr(data, 'load_cifar10', None)                       # the second call reads the file
    assert all(torch.equal(a, b) for a, b in zip(moments, ablations.image_pyramid_moments(v, ds, scales, 'unused', path)))


# ---- One recipe, one training loop ---------------------------------------------------------

class _FakeCache(_FakeMoments):
    """A LatentDataset stand-in with what train.train reads: len, header, latent_shape."""
    header, latent_shape = dict(vae_fingerprint='fake', flips=False), (4, 8, 8)

    def __len__(self):
        return len(self.y)


def test_rows_train_with_train_pys_loop_and_its_recipe(tmp_path, monkeypatch):
    # the recipe has one place, train.PRESETS['cifar-toy']: a value changed there reaches
    # `python train.py` (parse_args) and every row of `python ablations.py` (row_recipe) ...
    toy = train.PRESETS['cifar-toy']
    monkeypatch.setitem(toy, 'min_lr', 3e-4)
    monkeypatch.setitem(toy, 'grad_clip', 0.5)
    assert train.parse_args([])['min_lr'] == 3e-4 and train.parse_args([])['grad_clip'] == 0.5
    out = tmp_path / 'row'
    cfg = ablations.row_recipe(4, 0, str(out), num_latents=128)
    for k, v in toy.items():   # every value is the preset's but the overrides and the row's own
        if k not in ablations.RECIPE_OVERRIDES and k not in ('seed', 'out', 'device', 'max_steps', 'log_every', 'epochs'):
            assert cfg[k] == v, k
    assert cfg['optimizer'] == 'adamw' and cfg['epochs'] == 2.0   # 4 steps of 2 per epoch: the cosine ends there
    # ... and the row trains through train.train: its log.jsonl, checkpoint and lr schedule
    g = torch.Generator().manual_seed(0)
    ds = _FakeCache(torch.randn(128, 1, 8, 8, 8, generator=g), torch.arange(128) % 10)
    ema = ablations.train_row(ablations.build_model(4, '1,8', 0), ds, cfg)
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['step'] for r in log] == [4]
    assert math.isclose(log[-1]['lr'], train.lr_at(3 / 2, 2e-3, 3e-4, 0.1, 2.0))
    ck = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ck['step'] == 4 and all(torch.equal(ck['ema'][k], v) for k, v in ema.state_dict().items())
