"""Tests that pin each component of flowar. Run: python -m pytest -q

Each test names the part of the paper / code it pins, so a student can rewrite one
function and check it. All run on a CPU in float32.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flowar
from flowar import FlowAR

SHARED = Path(__file__).resolve().parent.parent / 'shared'
REFERENCE = SHARED / 'reference'


def tiny_model(**overrides):
    """A very small FlowAR for fast tests (toy latents: 4 x 8 x 8, scales 1-2-4-8)."""
    cfg = dict(ar_dim=64, enc_depth=1, dec_depth=1, ar_heads=2, head_depth=2, head_dim=64,
               attn_dropout=0.0, proj_dropout=0.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    return FlowAR.from_preset('toy', **cfg).eval()


# ---------------------------------------------------------------------------------------
# Eq. 5: scale pyramid, Eq. 6 inputs
# ---------------------------------------------------------------------------------------

def test_scale_pyramid_is_area_downsampling_of_the_full_latent():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    maps = flowar.build_scale_pyramid(z, [1, 2, 4, 8])
    assert [tuple(m.shape) for m in maps] == [(2, 4, s, s) for s in (1, 2, 4, 8)]
    assert torch.equal(maps[-1], z)                                   # Down(F, 1) = F
    assert torch.allclose(maps[0][:, :, 0, 0], z.mean(dim=(2, 3)), atol=1e-6)  # 1x1 = mean
    # 4x4 = mean of each 2x2 block of the full latent (not of the 8x8 -> residual etc.)
    assert torch.allclose(maps[2], z.reshape(2, 4, 4, 2, 4, 2).mean(dim=(3, 5)), atol=1e-6)


def test_scale_pyramid_flexible_and_non_square_scales():
    z = torch.randn(1, 3, 8, 8)
    maps = flowar.build_scale_pyramid(z, (1, 2, 3, 4, 6, 8))  # FlexVAR-style list
    assert [m.shape[-1] for m in maps] == [1, 2, 3, 4, 6, 8]
    assert torch.allclose(maps[0].flatten(), z.mean(dim=(2, 3)).flatten(), atol=1e-6)
    zr = torch.randn(2, 4, 6, 8)
    maps = flowar.build_scale_pyramid(zr, [(1, 1), (3, 4), (6, 8)])
    assert tuple(maps[1].shape) == (2, 4, 3, 4)
    with pytest.raises(ValueError, match='last scale'):
        flowar.build_scale_pyramid(z, [1, 2, 4])
    with pytest.raises(ValueError, match='grow'):
        flowar.normalize_scales([1, 4, 2, 8])


def test_upsample_to_next_is_bicubic_to_full_then_area_down():
    s = torch.randn(1, 2, 2, 2)
    up = flowar.upsample_to_next(s, (8, 8), (4, 4))
    full = F.interpolate(s, size=(8, 8), mode='bicubic', align_corners=False)
    assert torch.allclose(up, full.reshape(1, 2, 4, 2, 4, 2).mean(dim=(3, 5)), atol=1e-6)
    const = torch.full((1, 2, 1, 1), 0.7)   # a constant map stays constant
    assert torch.allclose(flowar.upsample_to_next(const, (16, 16), (2, 2)), torch.full((1, 2, 2, 2), 0.7))


def test_sequence_layout_mask_and_rope_positions():
    scales = [1, 2, 4, 8, 16]
    sl = flowar.scale_slices(scales)
    assert sl[-1].stop == 341 and [s.start for s in sl] == [0, 1, 5, 21, 85]
    mask = flowar.block_causal_mask(scales)
    assert mask.shape == (341, 341) and mask.dtype == torch.bool
    assert mask[1:5, 1:5].all()          # bidirectional inside a scale
    assert not mask[1:5, 5:].any()       # no look-ahead to later scales
    assert mask[5:21, 0:5].all()         # sees all earlier scales
    pos = flowar.token_positions(scales)
    assert pos.shape == (341, 2)
    assert torch.equal(pos[0], torch.tensor([0.0, 0.0]))
    assert torch.equal(pos[1:5], torch.tensor([[0, 0], [0, 8], [8, 0], [8, 8]], dtype=torch.float))  # arange(2) / 2 * 16


def test_rope_rotates_pairs_and_preserves_relative_positions():
    rope = flowar.RoPE2D(16)
    assert rope.freqs.shape == (4,)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    p = lambda r, c: torch.tensor([[float(r), float(c)]])
    assert torch.allclose(rope(q, p(0, 0)), q)                               # position 0: identity
    assert torch.allclose(rope(q, p(3, 5)).norm(), q.norm(), atol=1e-5)       # a rotation
    dot = lambda a, b: (rope(q, p(*a)) * rope(k, p(*b))).sum()
    assert torch.allclose(dot((1, 2), (4, 7)), dot((3, 1), (6, 6)), atol=1e-4)  # only the offset matters
    # the first half of the channels only depends on the row, the second on the column
    a, b = rope(q, p(2, 0)), rope(q, p(2, 9))
    assert torch.allclose(a[..., :8], b[..., :8]) and not torch.allclose(a[..., 8:], b[..., 8:])


# ---------------------------------------------------------------------------------------
# Eq. 6: the causal scale Transformer and its KV cache
# ---------------------------------------------------------------------------------------

def test_block_causal_mask_changing_scale_k_plus_1_leaves_scales_up_to_k_unchanged():
    model = tiny_model()
    torch.manual_seed(1)
    labels = torch.tensor([3, 7])
    maps = flowar.build_scale_pyramid(torch.randn(2, 4, 8, 8), model.scales)
    x_in = model.ar_input_tokens(maps[:-1], labels)          # (B, L, D)
    out = model.transformer(x_in, labels)
    for k in range(len(model.scales) - 1):
        nxt = model.slices[k + 1]
        x2 = x_in.clone()
        x2[:, nxt] += torch.randn_like(x2[:, nxt])            # change the inputs of scale k+1
        out2 = model.transformer(x2, labels)
        done = slice(0, model.slices[k].stop)
        assert torch.equal(out[:, done], out2[:, done]), f"scales <= {k} saw scale {k + 1}"
        assert not torch.allclose(out[:, nxt], out2[:, nxt])  # ...but scale k+1 itself did


@pytest.mark.parametrize('cfg', [1.0, 3.0])
def test_kv_cached_sampling_equals_teacher_forced_forward(cfg):
    model = tiny_model()
    labels = torch.tensor([0, 5, 9])
    g = torch.Generator().manual_seed(0)
    z, info = model.sample(labels, num_steps=6, cfg=cfg, guidance=0.9, generator=g, return_details=True)
    assert z.shape == (3, 4, 8, 8) and torch.equal(z, info['maps'][-1])
    full = model.semantics(info['maps'], labels)               # one forward, block-causal mask
    for sl, s_hat in zip(model.slices, info['semantics']):
        assert (full[:, sl] - s_hat).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------
# Eq. 10: Spatial-adaLN
# ---------------------------------------------------------------------------------------

def test_spatial_adaln_reduces_to_adaln_for_constant_semantics_and_is_local():
    torch.manual_seed(0)
    W, N = 64, 9
    block = flowar.SpatialAdaLNBlock(W, heads=1)
    t_emb = torch.randn(2, 1, W)
    c_vec = torch.randn(2, 1, W)
    mods = block.modulation(t_emb, c_vec.expand(2, N, W))      # six (B, N, W)
    plain = block.ada_lin(F.silu(t_emb + c_vec)).chunk(6, -1)   # ordinary adaLN: one vector per sample
    for m, p in zip(mods, plain):
        assert m.shape == (2, N, W) and torch.allclose(m, p.expand_as(m), atol=1e-6)
    c = c_vec.expand(2, N, W).clone()
    c[:, 4] += 1.0                                              # semantics differ at one position
    mods2 = block.modulation(t_emb, c)
    for m, m2 in zip(mods, mods2):
        diff = (m - m2).abs().amax(dim=(0, 2))                  # (N,)
        assert diff[4] > 1e-4 and torch.all(diff[torch.arange(N) != 4] == 0)


def test_flow_head_uses_semantics_position_by_position():
    torch.manual_seed(0)
    head = flowar.FlowHead(4, 64, 1, cond_dim=32)
    sem = torch.randn(1, 4, 32)
    c = head.cond_embed(sem)
    sem2 = sem.clone()
    sem2[:, 2] += 1
    d = (head.cond_embed(sem2) - c).abs().amax(-1)[0]
    assert d[2] > 0 and torch.all(d[[0, 1, 3]] == 0)
    assert head.res_blocks[0].ada_lin.out_features == 6 * 64


# ---------------------------------------------------------------------------------------
# Eq. 7-9: the loss
# ---------------------------------------------------------------------------------------

class _EchoHead(torch.nn.Module):
    """A stand-in for the flow head that predicts v = x_t (to pin the loss formula)."""

    def forward(self, x, t, semantics, pos):
        return x


def test_loss_uses_released_interpolation_target_and_scale_weights():
    model = tiny_model()
    model.flownet = _EchoHead()
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    noise = [torch.randn(2, 4, s, s) for s in (1, 2, 4, 8)]
    t = torch.rand(2, 4)
    loss, per_scale = model(z, torch.tensor([1, 2]), noise=noise, t=t)
    maps = flowar.build_scale_pyramid(z, model.scales)
    expect, weighted = [], 0.0
    for i, (s, eps) in enumerate(zip(maps, noise)):
        ti = t[:, i].view(2, 1, 1, 1)
        x_t = (1 - ti) * s + ti * eps           # released Eq. 7 (t = 1 is noise)
        target = eps - s                        # released Eq. 8
        li = ((x_t - target) ** 2).mean(dim=(1, 2, 3)).mean()
        expect.append(li)
        weighted = weighted + li * s.shape[-1] ** 2 / 64  # weight s^2 / S^2
    assert torch.allclose(per_scale, torch.stack(expect), atol=1e-5)
    assert torch.allclose(loss, weighted, atol=1e-5)


def test_loss_is_deterministic_given_noise_and_t_and_label_dropout_uses_null_class():
    model = tiny_model()
    z = torch.randn(3, 4, 8, 8)
    noise = [torch.randn(3, 4, s, s) for s in (1, 2, 4, 8)]
    t = torch.rand(3, 4)
    y = torch.tensor([1, 2, 3])
    a, _ = model(z, y, noise=noise, t=t)
    b, _ = model(z, y, noise=noise, t=t)
    assert torch.equal(a, b)
    model.class_dropout = 1.0                  # every label dropped -> same as the null class
    c, _ = model(z, y, noise=noise, t=t, drop_labels=True)
    d, _ = model(z, torch.full_like(y, 10), noise=noise, t=t)
    assert torch.allclose(c, d) and not torch.allclose(a, c)


def test_tiny_model_overfits_a_handful_of_latents():
    model = tiny_model().train()
    model.class_dropout = 0.0
    torch.manual_seed(0)
    z = torch.randn(8, 4, 8, 8) * 0.5 + torch.linspace(-1, 1, 8).view(8, 1, 1, 1)
    y = torch.arange(8) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(250):
        loss, _ = model(z, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)


# ---------------------------------------------------------------------------------------
# Sampling: Euler, time grid, CFG
# ---------------------------------------------------------------------------------------

def test_time_grids_are_the_released_ones():
    g = flowar.euler_time_grid(25)
    assert len(g) == 25 and g[0] == 1 and g[-1] == 0 and torch.all(g[1:] < g[:-1])
    assert torch.allclose(g[:12], torch.linspace(1, 0.3, 12, dtype=torch.float64))
    assert torch.allclose(g[12:], torch.linspace(0.25, 0, 13, dtype=torch.float64))
    u = flowar.euler_time_grid(50)
    assert len(u) == 51 and torch.allclose(u[1:] - u[:-1], torch.full((50,), -0.02, dtype=torch.float64))


def test_euler_moves_noise_to_a_gaussian_target_with_the_exact_velocity_field():
    # Target x ~ N(mu, sig^2); released path x_t = (1 - t) x + t eps. The exact velocity
    # E[eps - x | x_t] is affine in x_t; integrating it from t = 1 to 0 must give N(mu, sig^2).
    mu, sig = 1.5, 0.5

    def v(x, t):
        var = (1 - t) ** 2 * sig ** 2 + t ** 2
        return -mu + (t - (1 - t) * sig ** 2) / var * (x - (1 - t) * mu)

    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(200000, generator=g, dtype=torch.float64)
    x0 = flowar.euler_integrate(v, x1, torch.linspace(1, 0, 401, dtype=torch.float64))
    assert abs(x0.mean().item() - mu) < 0.01 and abs(x0.std().item() - sig) < 0.01
    # the coarse released grid is still close
    x0 = flowar.euler_integrate(v, x1, flowar.euler_time_grid(25))
    assert abs(x0.mean().item() - mu) < 0.05 and abs(x0.std().item() - sig) < 0.05


def test_cfg_schedule_rises_linearly():
    assert flowar.cfg_schedule(4, 4.0) == [1.0, 2.0, 3.0, 4.0]
    assert flowar.cfg_schedule(5, 1.0) == [1.0] * 5


def test_cfg_one_is_the_conditional_sample_and_guidance_outside_interval_is_off():
    model = tiny_model()
    y = torch.tensor([1, 4])
    run = lambda **kw: model.sample(y, num_steps=6, generator=torch.Generator().manual_seed(3), **kw)
    plain = run(cfg=1.0)
    assert torch.equal(plain, run(cfg=1.0))                  # reproducible with a generator
    # guidance = 0: t <= 0 never holds on the grid, so no step is guided. (Equal up to
    # float32 batch-size effects: the guided run evaluates a batch twice as large.)
    assert (plain - run(cfg=4.0, guidance=0.0)).abs().max() < 1e-3
    guided = run(cfg=4.0, guidance=1.0)
    assert (plain - guided).abs().max() > 5e-2
    other_seed = model.sample(y, num_steps=6, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(plain, other_seed)


def test_unconditional_sampling_and_bad_labels():
    model = tiny_model()
    z = model.sample(None, batch_size=2, num_steps=4, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()
    with pytest.raises(ValueError, match='class ids'):
        model.sample(torch.tensor([11]), num_steps=4)
    with pytest.raises(ValueError, match='labels'):
        model.sample(None, batch_size=2, cfg=2.0)


def test_cross_attention_head_block_runs_and_is_causal_too():
    model = tiny_model(head_block='cross')
    labels = torch.tensor([2])
    z, info = model.sample(labels, num_steps=4, cfg=2.0, generator=torch.Generator().manual_seed(0),
                           return_details=True)
    full = model.semantics(info['maps'], labels)
    for sl, s_hat in zip(model.slices, info['semantics']):
        assert (full[:, sl] - s_hat).abs().max() <= 1e-5
    loss, per = model(torch.randn(2, 4, 8, 8), torch.tensor([0, 1]))
    assert torch.isfinite(loss) and per.shape == (4,)


# ---------------------------------------------------------------------------------------
# Presets and the released checkpoints
# ---------------------------------------------------------------------------------------

def _reference_shapes(name):
    path = REFERENCE / f'flowar_{name}_state_dict.txt'
    if not path.exists():
        pytest.skip(f'{path} not found (the ../shared reference files are needed for this test)')
    shapes = {}
    for line in path.read_text().splitlines():
        if line.startswith('#') or not line.strip():
            continue
        key, shape = line.split(' ', 1)
        shapes[key] = tuple(int(s) for s in re.findall(r'\d+', shape))
    return shapes


@pytest.mark.parametrize('preset,ref,count', [('S', 'small', 171_718_072), ('L', 'large', 586_862_912),
                                              ('H', 'huge', 1_913_316_880)])
def test_presets_match_the_released_models(preset, ref, count):
    with torch.device('meta'):
        model = FlowAR.from_preset(preset)
    assert sum(p.numel() for p in model.parameters()) == count
    shapes = _reference_shapes(ref)
    buffers = {k for k in shapes if k == 'mask' or k.endswith('.rope.freqs')}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == {k: v for k, v in shapes.items() if k not in buffers}
    for k in buffers - {'mask'}:
        assert tuple(model.get_submodule(k[:-6]).freqs.shape) == shapes[k]
    assert shapes['mask'] == (1, 1, model.seq_len, model.seq_len)


def test_b_preset_is_the_papers_300m_size():
    with torch.device('meta'):
        model = FlowAR.from_preset('B')
    assert 290e6 < sum(p.numel() for p in model.parameters()) < 320e6


def test_released_small_state_dict_loads_strictly_and_wrong_shapes_are_named():
    shapes = _reference_shapes('small')
    model = FlowAR.from_preset('S')
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in shapes.items():
        if k == 'mask':   # the released mask is additive: 0 = attend, -inf = blocked
            sd[k] = torch.where(model.attn_mask, 0.0, float('-inf'))[None, None]
        elif k.endswith('.rope.freqs'):
            sd[k] = model.get_submodule(k[:-6]).freqs.clone()
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.01
    flowar.load_official_state_dict(model, {'model_ema': sd, 'model': {}})
    assert torch.equal(model.flownet.res_blocks[1].ada_lin.weight, sd['flownet.res_blocks.1.ada_lin.weight'])
    assert torch.equal(model.encoder_pos_embed_learned, sd['encoder_pos_embed_learned'])
    bad = dict(sd)
    bad['decoder_embed.weight'] = torch.zeros(768, 700)
    with pytest.raises(ValueError, match=r'decoder_embed\.weight.*\(768, 700\)'):
        flowar.load_official_state_dict(model, bad)
    missing = {k: v for k, v in sd.items() if k != 'z_proj.bias'}
    with pytest.raises(ValueError, match=r'missing key z_proj\.bias'):
        flowar.load_official_state_dict(model, missing)
    extra = dict(sd, **{'something.else': torch.zeros(3)})
    with pytest.raises(ValueError, match=r'unexpected key something\.else'):
        flowar.load_official_state_dict(model, extra)
    with pytest.raises(ValueError, match='right preset'):
        flowar.load_official_state_dict(FlowAR.from_preset('toy'), sd)


def test_unknown_preset_and_override_are_refused():
    with pytest.raises(ValueError, match='unknown FlowAR preset'):
        FlowAR.from_preset('XL')
    with pytest.raises(ValueError, match='unknown FlowAR config field'):
        FlowAR.from_preset('toy', depth=3)


# ---------------------------------------------------------------------------------------
# train.py: schedule, DDP equivalence, gradient accumulation, resume, checkpoints
# ---------------------------------------------------------------------------------------

import os
import subprocess
import sys

import train

ROOT = Path(__file__).resolve().parent


def test_lr_schedule_warmup_and_cosine_values():
    # paper recipe: 4e-4 peak, 100 warm-up epochs, cosine to 1e-5 at epoch 400
    lr = lambda e: train.lr_at(e, 4e-4, 1e-5, 100, 400)
    assert lr(0) == 0 and math.isclose(lr(50), 2e-4) and math.isclose(lr(100), 4e-4)
    assert math.isclose(lr(250), 1e-5 + (4e-4 - 1e-5) * 0.5)          # half-way down the cosine
    assert math.isclose(lr(400), 1e-5) and math.isclose(lr(500), 1e-5)
    assert lr(150) > lr(200) > lr(300) > lr(399)


def test_param_groups_exclude_biases_and_1d_params_from_weight_decay():
    model = tiny_model()
    decay, no_decay = train.param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay['params'])
    assert all(p.ndim < 2 or names[id(p)].endswith('.bias') for p in no_decay['params'])
    assert any(names[id(p)] == 'z_proj_ln.weight' for p in no_decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.clone()
    train.update_ema(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)


@pytest.fixture(scope='module')
def toy_setup(tmp_path_factory):
    """A tiny shapes run folder with a random-init cifar VAE (so no VAE training)."""
    import vae as vae_lib
    root = tmp_path_factory.mktemp('train')
    torch.manual_seed(0)
    v = vae_lib.AutoencoderKL.from_preset('cifar')
    vae_path = root / 'vae.pt'
    vae_lib.save_vae(str(vae_path), v, 1.0)
    return root, vae_path


def _train_args(out, vae_path, *extra):
    return ['--dataset', 'shapes', '--subset', '64', '--out', str(out), '--vae', str(vae_path),
            '--batch-size', '16', '--log-every', '1', '--ckpt-every', '1000', '--num-sample-classes', '2',
            '--cache-batch-size', '32', '--device', 'cpu', *extra]


def _run_train(out, vae_path, *extra):
    """train.main in this process; returns the checkpoint."""
    train.main(_train_args(out, vae_path, *extra))
    return torch.load(out / 'ckpt.pt', map_location='cpu', weights_only=True)


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_smoke_run_writes_checkpoint_grid_and_log(toy_setup, tmp_path):
    _, vae_path = toy_setup
    ck = _run_train(tmp_path / 'run', vae_path, '--max-steps', '3')
    assert ck['step'] == 3 and set(ck) >= {'model', 'ema', 'optimizer', 'step', 'epoch', 'config', 'rng'}
    assert ck['config']['model']['latent_channels'] == 4 and ck['config']['model_preset'] == 'toy'
    from PIL import Image
    grid = Image.open(tmp_path / 'run' / 'samples.png')
    assert grid.size[1] > grid.size[0] / 8 * 1.5      # two rows (classes) of 8 samples
    lines = (tmp_path / 'run' / 'log.jsonl').read_text().splitlines()
    assert len(lines) == 3 and {'loss', 'scale_losses', 'lr', 'grad_norm', 'img_per_s', 'eta_s'} <= set(json.loads(lines[-1]))
    assert not (tmp_path / 'run' / 'ckpt.pt.tmp').exists()


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(toy_setup, tmp_path):
    _, vae_path = toy_setup
    straight = _run_train(tmp_path / 'a', vae_path, '--max-steps', '4')
    _run_train(tmp_path / 'b', vae_path, '--max-steps', '2')
    resumed = _run_train(tmp_path / 'b', vae_path, '--max-steps', '4')
    assert resumed['step'] == 4
    assert _max_diff(straight['model'], resumed['model']) == 0
    assert _max_diff(straight['ema'], resumed['ema']) == 0


def test_gradient_accumulation_equals_one_big_batch(toy_setup, tmp_path):
    _, vae_path = toy_setup
    big = _run_train(tmp_path / 'big', vae_path, '--max-steps', '1')
    acc = _run_train(tmp_path / 'acc', vae_path, '--max-steps', '1', '--micro-batch', '8')
    assert _max_diff(big['model'], acc['model']) <= 1e-5


def test_checkpoint_from_another_config_is_refused_naming_the_fields(toy_setup, tmp_path):
    _, vae_path = toy_setup
    _run_train(tmp_path / 'c', vae_path, '--max-steps', '1')
    with pytest.raises(SystemExit, match=r'(?s)different configuration.*seed'):
        _run_train(tmp_path / 'c', vae_path, '--max-steps', '2', '--seed', '5')


def test_bad_cli_values_are_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(['--batch-size', '0'])
    assert '--batch-size must be > 0' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(['--preset', 'imagenet-XL'])
    assert 'unknown --preset' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(['--preset', 'imagenet-S'])
    assert '--data-dir' in capsys.readouterr().err
    cfg = train.parse_args(['--preset', 'imagenet-L', '--data-dir', 'x', '--vae', 'y'])
    assert cfg['grad_ckpt'] and cfg['batch_size'] == 2048 and cfg['blr'] * 2048 / 256 == 4e-4


def test_two_gloo_ranks_match_one_process_on_the_same_global_batch(toy_setup, tmp_path):
    _, vae_path = toy_setup
    one = _run_train(tmp_path / 'one', vae_path, '--max-steps', '1')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    import socket
    with socket.socket() as sock:          # a free local port for the rendezvous
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
           str(ROOT / 'train.py'), *_train_args(tmp_path / 'two', vae_path, '--max-steps', '1')]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    two = torch.load(tmp_path / 'two' / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert len(two['rng']) == 2
    assert _max_diff(one['model'], two['model']) <= 1e-5
    first = lambda p: json.loads((p / 'log.jsonl').read_text().splitlines()[0])['loss']
    assert abs(first(tmp_path / 'one') - first(tmp_path / 'two')) <= 1e-5
