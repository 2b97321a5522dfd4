"""Tests that pin each component of flowar. Run: python -m pytest -q

Each test names the part of the paper / code it pins, so a student can rewrite one function
and run its tests (python -m pytest -q -k NAME; the README has the table). All run on a CPU
in float32. The key lists of the released checkpoints are in reference/; the few tests that
read the real CIFAR-10 copy in ../shared (or a trained classifier in out/) skip with a
message when it is absent.

Sections: flowar.py (Eq. 5-10, sampler, presets, released checkpoints), train.py,
vae.py + data.py (helpers prefixed _vd_), sample.py (helpers prefixed _smp_).
"""

import hashlib
import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import flowar
import metrics
import sample
import train
import vae
import vae as vae_lib
from flowar import FlowAR

# One thread per test process: deterministic, and no oversubscription when the tests
# launch 2-process torchrun jobs on a 2-core machine.
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parent.parent / 'shared'
REFERENCE = Path(__file__).resolve().parent / 'reference'   # key lists of the released checkpoints (in the repo)


def tiny_model(**overrides):
    """A very small FlowAR for fast tests (toy latents: 4 x 8 x 8, scales 1-2-4-8: the full
    pyramid, so every test sees coarse, middle and final scales; the toy recipe uses 1-8)."""
    cfg = dict(ar_dim=64, enc_depth=1, dec_depth=1, ar_heads=2, head_depth=2, head_dim=64,
               attn_dropout=0.0, proj_dropout=0.0, scales=(1, 2, 4, 8))
    cfg.update(overrides)
    torch.manual_seed(0)
    return FlowAR.from_preset('toy', **cfg).eval()


def fm_inputs(z, g=None):
    """Flow-matching noise (one map per toy scale 1-2-4-8) and t (B, 4) for FlowAR.forward."""
    B, C = z.shape[:2]
    return [torch.randn(B, C, s, s, generator=g) for s in (1, 2, 4, 8)], torch.rand(B, 4, generator=g)


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

def test_attention_equals_torch_sdpa_with_and_without_a_mask():
    # flowar.attention's CPU path (plain products) against torch's fused kernel, fp32
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 21, 16, generator=g).unbind(0)
    mask = flowar.block_causal_mask([(1, 1), (2, 2), (4, 4)])      # (21, 21) bool
    for m in (None, mask):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        assert torch.allclose(flowar.attention(q, k, v, m), want, atol=1e-6)
    assert not torch.allclose(flowar.attention(q, k, v, mask), flowar.attention(q, k, v), atol=1e-3)


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


def test_spatial_adaln_block_is_eq10_written_out():
    # Eq. 10 with the paper's symbols, from the modulation MLP's six outputs in the released
    # order (alpha1, alpha2 = gates; gamma1, gamma2 = scales; beta1, beta2 = shifts), every
    # tensor (B, N, W): one set per position. RELEASED: gamma enters as (1 + gamma), LN is
    # an RMSNorm without weight.
    torch.manual_seed(0)
    B, N, W = 2, 5, 64
    block = flowar.SpatialAdaLNBlock(W, heads=1)
    for p in block.parameters():                       # non-trivial values, biases included
        p.data.normal_(0, 0.3)
    x, t_emb, c, pos = torch.randn(B, N, W), torch.randn(B, 1, W), torch.randn(B, N, W), torch.rand(N, 2) * 8
    alpha1, alpha2, gamma1, gamma2, beta1, beta2 = block.ada_lin(F.silu(c + t_emb)).chunk(6, dim=-1)
    LN = lambda z: z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)
    F1 = x + block.attn(LN(x) * (1 + gamma1) + beta1, pos) * alpha1
    F2 = F1 + block.mlp(LN(F1) * (1 + gamma2) + beta2) * alpha2
    assert (block(x, t_emb, c, None, pos) - F2).abs().max() < 1e-6 * F2.abs().max()  # |F2| ~ 1e3


def test_flow_head_uses_semantics_position_by_position():
    # FlowHead.forward: the semantics of position i steer the velocity at position i (Eq. 10
    # is spatial). With the attention output projections zeroed no information moves between
    # positions, so a change of s-hat at position 2 must change the output at 2 and nowhere
    # else; plain adaLN on pooled semantics, or a head that ignores them, fails this.
    torch.manual_seed(0)
    B, N, C, D = 2, 4, 4, 32
    head = flowar.FlowHead(C, 64, 2, cond_dim=D)
    for p in head.parameters():                         # the released init has zero biases
        p.data.normal_(0, 0.2)
    for blk in head.res_blocks:
        blk.attn.proj.weight.data.zero_()
    x, t, sem, pos = torch.randn(B, N, C), torch.rand(B), torch.randn(B, N, D), torch.rand(N, 2) * 4
    sem2 = sem.clone()
    sem2[:, 2] += 1.0
    d = (head(x, t, sem2, pos) - head(x, t, sem, pos)).abs().amax(dim=(0, 2))   # (N,)
    assert d[2] > 1e-3 and torch.all(d[[0, 1, 3]] < 1e-6)
    # and with attention on (the real head), swapping the semantics of two positions
    # changes the output: the pooled mean would not see the swap
    head2 = flowar.FlowHead(C, 64, 2, cond_dim=D)
    for p in head2.parameters():
        p.data.normal_(0, 0.2)
    swapped = sem[:, [1, 0, 2, 3]]
    assert (head2(x, t, swapped, pos) - head2(x, t, sem, pos)).abs().max() > 1e-3


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
    loss, per_scale = model(z, torch.tensor([1, 2]), noise, t)
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


def test_uniform_scale_weighting_is_the_plain_sum_of_eq9():
    model = tiny_model(scale_weighting='uniform')
    z = torch.randn(2, 4, 8, 8)
    noise = [torch.randn(2, 4, s, s) for s in (1, 2, 4, 8)]
    loss, per_scale = model(z, torch.tensor([1, 2]), noise, torch.rand(2, 4))
    assert torch.allclose(loss, per_scale.sum(), atol=1e-6)
    with pytest.raises(ValueError, match='scale_weighting'):
        tiny_model(scale_weighting='area')


def test_label_dropout_uses_the_null_class():
    # CFG training (Sec. 4): train.make_batch replaces a label by the null class
    # (index num_classes) with probability label_drop, and the model sees the difference.
    model = tiny_model()
    ds = _FakeMoments(torch.randn(64, 1, 8, 8, 8), torch.arange(64) % 10)
    mcfg = dict(scales=[[1, 1], [2, 2], [4, 4], [8, 8]], latent_channels=4, num_classes=10)
    ys = [train.make_batch(ds, list(range(64)), 0, dict(seed=0, label_drop=p), 3, mcfg, 'cpu')[1]
          for p in (0.0, 0.5, 1.0)]
    assert torch.equal(ys[0], torch.arange(64) % 10) and torch.all(ys[2] == 10)
    dropped = ys[1] == 10
    assert 16 < int(dropped.sum()) < 48 and torch.equal(ys[1][~dropped], ys[0][~dropped])
    z = torch.randn(3, 4, 8, 8)
    noise, t = fm_inputs(z)
    a, _ = model(z, torch.tensor([1, 2, 3]), noise, t)
    c, _ = model(z, torch.full((3,), 10), noise, t)
    assert not torch.allclose(a, c)


class _FakeMoments:
    """Stands in for data.LatentDataset in make_batch: moments (N, P, 2C, h, w), labels."""

    def __init__(self, moments, labels, scale_factor=1.0):
        self.m, self.y, self.scale_factor = moments, labels, scale_factor

    def moments_batch(self, idx):
        return self.m[idx], self.y[idx]


def test_tiny_model_overfits_a_handful_of_latents():
    model = tiny_model().train()
    torch.manual_seed(0)
    z = torch.randn(8, 4, 8, 8) * 0.5 + torch.linspace(-1, 1, 8).view(8, 1, 1, 1)
    y = torch.arange(8) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(250):
        loss, _ = model(z, y, *fm_inputs(z))
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
    x0 = FlowAR.integrate(v, x1, torch.linspace(1, 0, 401, dtype=torch.float64))
    assert abs(x0.mean().item() - mu) < 0.01 and abs(x0.std().item() - sig) < 0.01
    # the coarse released grid is still close
    x0 = FlowAR.integrate(v, x1, flowar.euler_time_grid(25))
    assert abs(x0.mean().item() - mu) < 0.05 and abs(x0.std().item() - sig) < 0.05


def test_cfg_schedule_rises_linearly():
    assert flowar.cfg_schedule(4, 4.0) == [1.0, 2.0, 3.0, 4.0]
    assert flowar.cfg_schedule(5, 1.0) == [1.0] * 5
    assert flowar.cfg_schedule(4, 4.0, ramp=False) == [4.0] * 4


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


class _RecordingHead(torch.nn.Module):
    """Wraps the flow head and records the time and state of every call."""

    def __init__(self, head):
        super().__init__()
        self.head, self.calls = head, []

    def forward(self, x, t, semantics, pos):
        self.calls.append((float(t[0]), x.detach().clone()))
        return self.head(x, t, semantics, pos)


def test_guided_steps_evaluate_both_halves_at_the_conditional_state():
    # Released sampler: inside the guidance interval both CFG halves are evaluated at the
    # conditional state. Outside it (and at the first scale, whose CFG weight is 1) only the
    # conditional half is evaluated: the unconditional one would never reach the output.
    model = tiny_model()
    model.flownet = _RecordingHead(model.flownet)
    model.sample(torch.tensor([1, 2]), num_steps=10, cfg=3.0, guidance=0.5,
                 generator=torch.Generator().manual_seed(0))
    calls = model.flownet.calls
    per_scale = len(calls) // len(model.scales)
    rest = calls[per_scale:]                                    # scales 2.. (weight > 1)
    guided = [x for t, x in rest if t <= 0.5]
    free = [x for t, x in calls[:per_scale]] + [x for t, x in rest if t > 0.5]
    assert guided and all(x.shape[0] == 4 and torch.equal(x[:2], x[2:]) for x in guided)
    assert free and all(x.shape[0] == 2 for x in free)


class _SemanticsHead(torch.nn.Module):
    """A flow head with a known output: the velocity is the first C channels of the
    semantics, whatever x and t are (so the conditional and unconditional velocities are
    known from the AR Transformer alone)."""

    def __init__(self, C):
        super().__init__()
        self.C = C

    def forward(self, x, t, semantics, pos):
        return semantics[..., :self.C].to(x.dtype)


@pytest.mark.parametrize('cfg, guidance, ramp, num_steps', [
    (3.0, 0.5, True, 8), (2.0, 1.0, True, 8), (1.0, 1.0, True, 8), (3.0, 0.5, False, 8),
    (3.0, 0.5, True, [50, 3, 8, 4])])  # a grid per scale (the toy's [50, 8])
def test_cfg_combination_guidance_interval_and_euler_direction(cfg, guidance, ramp, num_steps):
    # With v_c, v_u constant in t, Euler from t = 1 to 0 gives exactly
    #   x_0 = noise - (sum of guided |dt|) * (v_u + w_i (v_c - v_u)) - (sum of other |dt|) * v_c
    # at scale i, w_i = cfg_schedule(...)[i]. This pins the sign of the CFG combination,
    # the guidance interval (t <= guidance), the per-scale weight and time grid, and the
    # time direction.
    model = tiny_model()
    model.flownet = _SemanticsHead(model.latent_channels)
    labels = torch.tensor([1, 3])
    z, info = model.sample(labels, num_steps=num_steps, cfg=cfg, guidance=guidance, cfg_ramp=ramp,
                           generator=torch.Generator().manual_seed(5), return_details=True)
    v_c = model.semantics(info['maps'], labels)[..., :4].double()                # (B, L, C)
    v_u = model.semantics(info['maps'], torch.full_like(labels, 10))[..., :4].double()
    steps = num_steps if isinstance(num_steps, list) else [num_steps] * 4
    g = torch.Generator().manual_seed(5)
    for i, (sl, w) in enumerate(zip(model.slices, flowar.cfg_schedule(len(model.scales), cfg, ramp))):
        ts = flowar.euler_time_grid(steps[i]).tolist()
        noise = torch.randn(2, sl.stop - sl.start, 4, generator=g, dtype=torch.float64)
        guided_dt = sum(a - b for a, b in zip(ts, ts[1:]) if a <= guidance and w != 1.0)
        v_g = v_u[:, sl] + w * (v_c[:, sl] - v_u[:, sl])
        expect = noise - guided_dt * v_g - (1.0 - guided_dt) * v_c[:, sl]
        got = flowar.tokens_from_map(info['maps'][i]).double()
        assert (got - expect).abs().max() < 1e-5, (i, (got - expect).abs().max())


def test_unconditional_sampling_and_bad_labels():
    model = tiny_model()
    z = model.sample(None, batch_size=2, num_steps=4, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()
    with pytest.raises(ValueError, match='one per scale'):
        model.sample(torch.tensor([1]), num_steps=[50, 8])          # 2 grids for 4 scales
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
    z = torch.randn(2, 4, 8, 8)
    loss, per = model(z, torch.tensor([0, 1]), *fm_inputs(z))
    assert torch.isfinite(loss) and per.shape == (4,)


# ---------------------------------------------------------------------------------------
# Presets and the released checkpoints
# ---------------------------------------------------------------------------------------

def _reference_shapes(name):
    # reference/<file>_state_dict.txt: one 'key (shape)' line per tensor of a released checkpoint
    path = REFERENCE / f'{name}_state_dict.txt'
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
    shapes = _reference_shapes(f'flowar_{ref}')
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
    shapes = _reference_shapes('flowar_small')
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
    load = lambda m, obj: vae.load_state_dict_strict(m, sample.official_state_dict(m, obj), what='released S')
    load(model, {'model_ema': sd, 'model': {}})
    assert torch.equal(model.flownet.res_blocks[1].ada_lin.weight, sd['flownet.res_blocks.1.ada_lin.weight'])
    assert torch.equal(model.encoder_pos_embed_learned, sd['encoder_pos_embed_learned'])
    bad = dict(sd)
    bad['decoder_embed.weight'] = torch.zeros(768, 700)
    with pytest.raises(ValueError, match=r'decoder_embed\.weight.*\[768, 700\]'):
        load(model, bad)
    missing = {k: v for k, v in sd.items() if k != 'z_proj.bias'}
    with pytest.raises(ValueError, match=r'Missing key.*z_proj\.bias'):
        load(model, missing)
    extra = dict(sd, **{'something.else': torch.zeros(3)})
    with pytest.raises(ValueError, match=r'Unexpected key.*something\.else'):
        load(model, extra)
    with pytest.raises(ValueError, match='right preset'):    # the toy's mask is 65 x 65
        load(FlowAR.from_preset('toy'), sd)
    wrong_freqs = dict(sd, **{'encoder_blocks.0.attn.rope.freqs': sd['encoder_blocks.0.attn.rope.freqs'] * 2})
    with pytest.raises(ValueError, match='RoPE frequencies'):
        load(model, wrong_freqs)
    with pytest.raises(ValueError, match='block-causal'):
        load(model, dict(sd, mask=torch.zeros(1, 1, 341, 341)))


def test_unknown_preset_and_override_are_refused():
    with pytest.raises(ValueError, match='unknown FlowAR preset'):
        FlowAR.from_preset('XL')
    with pytest.raises(ValueError, match='unknown FlowAR config field'):
        FlowAR.from_preset('toy', depth=3)


# ---------------------------------------------------------------------------------------
# train.py: schedule, DDP equivalence, gradient accumulation, resume, checkpoints
# ---------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent


def test_lr_schedule_warmup_and_cosine_values():
    # paper recipe: 4e-4 peak, 100 warm-up epochs, cosine to 1e-5 at epoch 400
    lr = lambda e: train.lr_at(e, 4e-4, 1e-5, 100, 400)
    assert lr(0) == 0 and math.isclose(lr(50), 2e-4) and math.isclose(lr(100), 4e-4)
    assert math.isclose(lr(250), 1e-5 + (4e-4 - 1e-5) * 0.5)          # half-way down the cosine
    assert math.isclose(lr(400), 1e-5) and math.isclose(lr(500), 1e-5)
    assert lr(150) > lr(200) > lr(300) > lr(399)


def test_vae_uses_the_same_schedule_with_a_one_based_warmup_and_a_time_budget():
    # vae.train_vae: lr_at(x, lr, 0.1 * lr, warmup, steps) with x = step + 1 in the warm-up
    # (the first step is not spent at lr 0), x = step after it, and with a time budget the
    # cosine part moves with the elapsed fraction of the budget when that is further along
    assert train.lr_at is vae.lr_at                                   # one schedule
    lr = lambda step, elapsed=0.0, budget=None: vae.lr_at(
        vae._schedule_position(step, 600, 30, elapsed, budget), 2e-3, 2e-4, 30, 600)
    assert math.isclose(lr(0), 2e-3 / 30) and math.isclose(lr(29), 2e-3)
    assert math.isclose(lr(30), 2e-3) and math.isclose(lr(315), 2e-4 + 1.8e-3 * 0.5)
    assert math.isclose(lr(599), 2e-4 + 1.8e-3 * 0.5 * (1 + math.cos(math.pi * 569 / 570)))
    assert math.isclose(lr(100, elapsed=50, budget=100), lr(315))     # half the budget used
    assert math.isclose(lr(100, elapsed=100, budget=100), 2e-4)      # budget over: the floor
    assert math.isclose(lr(10, elapsed=90, budget=100), 2e-3 * 11 / 30)  # warm-up by steps


def test_param_groups_exclude_biases_and_1d_params_from_weight_decay():
    model = tiny_model()
    decay, no_decay = train.param_groups(model.named_parameters(), 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay['params'])
    assert all(p.ndim < 2 or names[id(p)].endswith('.bias') for p in no_decay['params'])
    assert any(names[id(p)] == 'z_proj_ln.weight' for p in no_decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))


def test_make_optimizers_splits_the_parameters_once():
    model = tiny_model()
    cfg = dict(train.PRESETS['cifar-toy'])
    names = {id(p): n for n, p in model.named_parameters()}
    (adamw,) = train.make_optimizers(model, dict(cfg, optimizer='adamw'), 1e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    muon, adamw = train.make_optimizers(model, dict(cfg, optimizer='muon'), 1e-3)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    on_muon = {names[id(p)] for g in muon.param_groups for p in g['params']}
    on_adamw = {names[id(p)] for g in adamw.param_groups for p in g['params']}
    assert not on_muon & on_adamw and on_muon | on_adamw == set(names.values())  # every parameter exactly once
    assert 'encoder_blocks.0.attn.qkv.weight' in on_muon and 'flownet.res_blocks.0.mlp.fc2.weight' in on_muon
    for kept_on_adamw in ('class_emb.weight', 'z_proj.weight', 'flownet.final_layer.linear.weight',
                          'encoder_blocks.0.attn.qkv.bias'):
        assert kept_on_adamw in on_adamw
    # one step moves a Muon matrix by lr * 0.2 * sqrt(max(A, B)) * (an orthogonalised update, RMS ~ 1/sqrt(max(A, B)))
    w = model.encoder_blocks[0].attn.qkv.weight
    before = w.detach().clone()
    w.grad = torch.randn_like(w)
    muon.step()
    rms = (w.detach() - before * (1 - 1e-3 * cfg['weight_decay'])).pow(2).mean().sqrt().item()
    assert 0.15e-3 < rms < 0.3e-3, rms


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.clone()
    train.update_ema(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)


def test_ema_decay_warms_up_and_forgets_the_initial_weights():
    # The weights jump from w0 (the random init the EMA starts from) to w1 and stay there.
    # After 60 steps the EMA must be within 2% of w1: a constant decay of 0.999 would still
    # hold 0.999^60 = 94% of w0 (the toy-run bug: 0.999^1405 = 25% of the init was sampled).
    torch.manual_seed(0)
    ema, model = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    w0, w1 = ema.weight.detach().clone(), model.weight.detach().clone()
    for step in range(60):
        train.update_ema(ema, model, train.ema_decay(0.999, step))
    assert (ema.weight - w1).norm() <= 0.02 * (w1 - w0).norm()
    # The schedule: (1 + t) / (10 + t), capped at the configured decay.
    assert train.ema_decay(0.999, 0) == pytest.approx(0.1)
    assert train.ema_decay(0.999, 90) == pytest.approx(0.91)
    assert train.ema_decay(0.9999, 250_000) == 0.9999 and train.ema_decay(0.999, 9_000) == 0.999


def test_ema_of_a_short_training_run_is_close_to_the_trained_weights(toy_setup, tmp_path):
    # Through train.main: after 30 steps with --ema 0.999 the EMA is near the trained
    # weights, not near the initialisation (with a constant 0.999 it would be 97% init).
    _, vae_path = toy_setup
    ck = _run_train(tmp_path / 'ema', vae_path, '--max-steps', '30', '--ema', '0.999')
    torch.manual_seed(0)  # train.main's initialisation
    init = FlowAR(**ck['config']['model']).state_dict()
    num = sum((ck['ema'][k] - ck['model'][k]).float().norm() ** 2 for k in init) ** 0.5
    den = sum((ck['model'][k] - init[k]).float().norm() ** 2 for k in init) ** 0.5
    assert den > 0 and num / den < 0.5, (num / den).item()


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
            '--cache-batch-size', '32', '--device', 'cpu', '--precision', 'fp32', *extra]


def _run_train(out, vae_path, *extra):
    """train.main in this process; returns the checkpoint."""
    train.main(_train_args(out, vae_path, *extra))
    return torch.load(out / 'ckpt.pt', map_location='cpu', weights_only=True)


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_smoke_run_writes_checkpoint_grid_and_log(toy_setup, tmp_path):
    _, vae_path = toy_setup
    ck = _run_train(tmp_path / 'run', vae_path, '--max-steps', '3')
    assert ck['step'] == 3 and set(ck) >= {'model', 'ema', 'optimizers', 'step', 'epoch', 'config', 'rng'}
    assert ck['config']['model']['latent_channels'] == 4 and ck['config']['model_preset'] == 'toy'
    from PIL import Image
    grid = Image.open(tmp_path / 'run' / 'samples.png')
    assert grid.size[1] > grid.size[0] / 8 * 1.5      # two rows (classes) of 8 samples
    lines = (tmp_path / 'run' / 'log.jsonl').read_text().splitlines()
    assert len(lines) == 3 and {'loss', 'scale_losses', 'lr', 'grad_norm', 'img_per_s', 'eta_s'} <= set(json.loads(lines[-1]))
    assert not list((tmp_path / 'run').glob('*.tmp*'))        # no temporary file left behind


def test_precision_bf16_trains_flowar_under_autocast(toy_setup, tmp_path, monkeypatch):
    # --precision bf16: every training forward runs in bf16 autocast; fp32: none does
    _, vae_path = toy_setup
    seen, forward = [], flowar.FlowAR.forward
    def spy(self, *a, **k):
        seen.append(torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16)
        return forward(self, *a, **k)
    monkeypatch.setattr(flowar.FlowAR, 'forward', spy)
    ck = _run_train(tmp_path / 'bf16', vae_path, '--max-steps', '2', '--precision', 'bf16')
    assert seen == [True, True] and all(v.dtype == torch.float32 for v in ck['model'].values())
    seen.clear()
    _run_train(tmp_path / 'fp32', vae_path, '--max-steps', '2')
    assert seen == [False, False]


def test_resolve_precision_auto_follows_the_hardware(monkeypatch):
    assert [vae.resolve_precision(p, 'cpu') for p in ('fp32', 'bf16')] == ['fp32', 'bf16']
    for avx, amx, want in ((True, False, 'bf16'), (False, True, 'bf16'), (False, False, 'fp32')):
        monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx)
        monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
        assert vae.resolve_precision('auto', 'cpu') == want
    monkeypatch.delattr(torch.cpu, '_is_avx512_bf16_supported')   # a torch without the probes
    monkeypatch.delattr(torch.cpu, '_is_amx_tile_supported')
    assert vae.resolve_precision('auto', 'cpu') == 'fp32'
    with pytest.raises(ValueError, match='fp32, bf16 or auto'):
        vae.resolve_precision('fp16', 'cpu')


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(toy_setup, tmp_path):
    _, vae_path = toy_setup
    straight = _run_train(tmp_path / 'a', vae_path, '--max-steps', '4')
    _run_train(tmp_path / 'b', vae_path, '--max-steps', '2')
    resumed = _run_train(tmp_path / 'b', vae_path, '--max-steps', '4')
    assert resumed['step'] == 4
    assert _max_diff(straight['model'], resumed['model']) == 0
    assert _max_diff(straight['ema'], resumed['ema']) == 0


def _first_log(run_dir):
    return json.loads((run_dir / 'log.jsonl').read_text().splitlines()[0])


def test_gradient_accumulation_equals_one_big_batch(toy_setup, tmp_path):
    _, vae_path = toy_setup
    big = _run_train(tmp_path / 'big', vae_path, '--max-steps', '1')
    acc = _run_train(tmp_path / 'acc', vae_path, '--max-steps', '1', '--micro-batch', '8')
    assert _max_diff(big['model'], acc['model']) <= 1e-5
    # AdamW and clipping hide a gradient that is off by a constant factor; the logged loss
    # and the (pre-clipping) gradient norm do not.
    a, b = _first_log(tmp_path / 'big'), _first_log(tmp_path / 'acc')
    assert abs(a['loss'] - b['loss']) <= 1e-5
    assert abs(a['grad_norm'] - b['grad_norm']) <= 1e-4 * a['grad_norm']


def test_checkpoint_from_another_config_is_refused_naming_the_fields(toy_setup, tmp_path):
    _, vae_path = toy_setup
    _run_train(tmp_path / 'c', vae_path, '--max-steps', '1')
    with pytest.raises(SystemExit, match=r'(?s)different configuration.*seed'):
        _run_train(tmp_path / 'c', vae_path, '--max-steps', '2', '--seed', '5')
    # a checkpoint of an older version that recorded class_dropout in the model config
    # still resumes (the value is --label-drop now), any other model field is refused
    m = dict(flowar.FlowAR.from_preset('toy').config)
    saved = dict(model=dict(m, class_dropout=0.1), dataset='cifar10', batch_size=64, seed=0, vae_fingerprint='f')
    train.check_resume_config(saved, dict(saved), m, 'ck.pt')
    with pytest.raises(SystemExit, match='model.head_depth'):
        train.check_resume_config(saved, dict(saved), dict(m, head_depth=3), 'ck.pt')
    with pytest.raises(SystemExit, match="optimizer: checkpoint 'adamw', now 'muon'"):  # its state would not fit
        train.check_resume_config(dict(saved, optimizer='adamw'), dict(saved, optimizer='muon'), m, 'ck.pt')


def test_bad_cli_values_are_refused(capsys):
    for argv, msg in ((['--batch-size', '0'], '--batch-size must be > 0'),
                      (['--preset', 'imagenet-XL'], 'unknown --preset'),
                      (['--preset', 'imagenet-S'], '--data-dir'),
                      (['--vae-optimizer', 'sgd'], '--vae-optimizer must be adam or muon'),
                      (['--vae', 'nope.pt'], "--vae 'nope.pt': no such file")):
        with pytest.raises(SystemExit):  # a parser error, not a traceback
            train.parse_args(argv)
        assert msg in capsys.readouterr().err, argv
    cfg = train.parse_args(['--preset', 'imagenet-L', '--data-dir', 'x', '--vae', __file__])
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
    a, b = _first_log(tmp_path / 'one'), _first_log(tmp_path / 'two')
    assert abs(a['loss'] - b['loss']) <= 1e-5                       # losses averaged over ranks
    assert abs(a['grad_norm'] - b['grad_norm']) <= 1e-4 * a['grad_norm']  # gradients averaged, not summed


# =======================================================================================
# vae.py and data.py
# =======================================================================================

_VD_CIFAR_ROOT = SHARED / 'data'


def _vd_tiny_config(**over):
    # a very small VAE (f = 4) so that tests take milliseconds
    cfg = dict(vae.PRESETS['cifar'])
    cfg.update(ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8)
    cfg.update(over)
    return cfg


def _vd_tiny_vae(seed=0, **over):
    torch.manual_seed(seed)
    return vae.AutoencoderKL(_vd_tiny_config(**over)).eval()


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
    ref = _reference_shapes('mar_kl16_vae')
    own = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert own == ref


def test_vd_kl16_reference_checkpoint_loads_strictly(tmp_path):
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


def test_vd_atomic_file_never_leaves_a_half_written_file(tmp_path):
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


def test_vd_checkpoint_round_trip_and_fingerprint(tmp_path):
    m = _vd_tiny_vae(seed=1)
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
    assert data.vae_fingerprint(m) != data.vae_fingerprint(_vd_tiny_vae(seed=2))


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
    with torch.no_grad():                # the latent channels were standardized at the end
        means = model_a.encode(data.to_float(torch.from_numpy(images))).mean       # (24, C, h, w)
    assert means.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (means.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4
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


def test_vd_standardize_latent_channels_keeps_reconstructions():
    images, _ = data.make_shapes(64, seed=0, size=16)
    model = _vd_tiny_vae(seed=0, ch_mult=[1, 2], resolution=16)
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


def test_vd_conv_muon_orthogonalises_with_momentum_at_adam_rms():
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
    # Newton-Schulz maps a random matrix (tall or wide) to singular values near 1
    for shape in ((64, 288), (288, 64)):
        sv = torch.linalg.svdvals(vae.ConvMuon.orthogonalize(torch.randn(shape)).float())
        assert sv.min() > 0.5 and sv.max() < 1.5, (shape, sv.min(), sv.max())
    # a stack (how step() batches weights of one shape) is orthogonalised matrix by matrix
    gs = torch.randn(3, 64, 288) * torch.tensor([1.0, 100.0, 0.01])[:, None, None]
    for i in range(3):
        assert torch.allclose(vae.ConvMuon.orthogonalize(gs)[i], vae.ConvMuon.orthogonalize(gs[i]), atol=2e-3)
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


def test_vd_train_bf16_steps_run_under_autocast_and_learn(tmp_path, monkeypatch):
    images, _ = data.make_shapes(24, seed=0, size=16)
    cfg = _vd_tiny_config(ch_mult=[1, 2], resolution=16)
    seen, batch_loss = [], vae._batch_loss
    def spy(model, x, *a):
        seen.append((torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16,
                     x.is_contiguous()))   # data.to_float: channels-last views are a slow CPU path
        return batch_loss(model, x, *a)
    monkeypatch.setattr(vae, '_batch_loss', spy)
    torch.manual_seed(0)
    psnr_init = vae.evaluate_psnr(vae.AutoencoderKL(cfg), images)
    out = vae.train_vae(images, str(tmp_path / 'vae.pt'), steps=12, batch_size=8, config=cfg,
                        kl_weight=1e-4, precision='bf16')
    assert seen == [(True, True)] * 12
    assert vae.evaluate_psnr(vae.load_vae(out)[0], images) > psnr_init + 3.0


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


def test_vd_latent_cache_in_bf16_is_close_to_fp32_and_stored_fp32(tmp_path):
    # precision='bf16' encodes under autocast (the toy's cache): the means differ from the
    # fp32 ones (autocast took effect) by a small fraction of their spread
    images, labels = data.make_shapes(8, seed=0)
    m = _vd_tiny_vae(seed=0)
    kw = dict(scale_factor=1.0, batch_size=8, device='cpu', flips=False)
    data.build_latent_cache(m, images, labels, str(tmp_path / 'fp32'), **kw)
    data.build_latent_cache(m, images, labels, str(tmp_path / 'bf16'), precision='bf16', **kw)
    a, b = (np.load(str(tmp_path / p / 'moments.npy'))[:, 0, :4] for p in ('fp32', 'bf16'))
    assert b.dtype == np.float32 and not np.array_equal(a, b)
    assert np.abs(a - b).mean() < 0.02 * a.std() and np.abs(a - b).max() < 0.1 * a.std()


def test_vd_latent_cache_without_flips(tmp_path):
    # flips=False: one version per image (half the encoding), refused when the existing
    # cache has flips; the dataset and train.make_batch read the plain moments.
    images, labels = data.make_shapes(12, seed=0)
    m = _vd_tiny_vae(seed=0)
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


# =======================================================================================
# sample.py
# =======================================================================================

_SMP_HERE = os.path.dirname(os.path.abspath(__file__))
_SMP_PAD = 2  # make_grid's default padding


def _smp_tiny_vae(embed_dim=4):
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
                               ar_heads=2, head_depth=1, head_dim=64, scales=(1, 2, 4, 8))
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    vae_path = str(d / 'vae.pt')
    vae_lib.save_vae(vae_path, _smp_tiny_vae(), scale_factor=0.5)
    vae3_path = str(d / 'vae3.pt')
    vae_lib.save_vae(vae3_path, _smp_tiny_vae(embed_dim=3), scale_factor=0.5)
    ckpt = dict(model=model.state_dict(), ema=ema, optimizer={}, step=10, epoch=1, rng=None,
                config=dict(preset='shapes-toy', model_preset='toy', model=model.config,
                            dataset='shapes', vae=vae_path, vae_scale_factor=0.5))
    ckpt_path = str(d / 'ckpt.pt')
    torch.save(ckpt, ckpt_path)
    return dict(dir=d, ckpt=ckpt_path, vae=vae_path, vae3=vae3_path)


_SMP_FAST = ['--num-steps', '4', '--cfg', '2.0', '--guidance', '0.9', '--device', 'cpu']


def _smp_png(path):
    return np.asarray(Image.open(path).convert('RGB'))


def _smp_cell(grid, row, col, h=16, w=16, pad=_SMP_PAD):
    y, x = pad + row * (h + pad), pad + col * (w + pad)
    return grid[y:y + h, x:x + w]


def test_smp_grid_same_seed_same_grid_other_seed_other_grid(smp_files):
    d = smp_files['dir']
    outs = {}
    for name, seed in (('a', 0), ('b', 0), ('c', 1)):
        outs[name] = _smp_png(sample.main(['--ckpt', smp_files['ckpt'], '--per-class', '3', '--seed', str(seed),
                                           '--batch-size', '5', '--out', str(d / f'grid_{name}.png')] + _SMP_FAST))
    # 4 classes (one row each) x 3 per class of 16x16 images
    assert outs['a'].shape == (4 * 18 + 2, 3 * 18 + 2, 3)
    assert np.array_equal(outs['a'], outs['b'])
    assert not np.array_equal(outs['a'], outs['c'])


def test_smp_show_scales_columns_and_last_equals_final(smp_files):
    d = smp_files['dir']
    common = ['--ckpt', smp_files['ckpt'], '--classes', '2,0,3', '--per-class', '2', '--seed', '7',
              '--batch-size', '4'] + _SMP_FAST
    plain = _smp_png(sample.main(common + ['--out', str(d / 'plain.png')]))
    scales = _smp_png(sample.main(common + ['--show-scales', '--out', str(d / 'scales.png')]))
    n_scales, n_samples = 4, 6  # toy scales 1, 2, 4, 8; 3 classes x 2
    assert scales.shape == (n_samples * 18 + 2, n_scales * 18 + 2, 3)
    for k in range(n_samples):  # plain grid: one row per class, 2 columns
        final = _smp_cell(plain, k // 2, k % 2)
        assert np.array_equal(_smp_cell(scales, k, n_scales - 1), final)
        # the coarse scales are different pictures (the 1x1 map decodes to something else)
        assert not np.array_equal(_smp_cell(scales, k, 0), final)


def _smp_npz_args(smp_files, out, extra=()):
    return ['--ckpt', smp_files['ckpt'], '--num-images', '8', '--npz', out, '--batch-size', '3',
            '--seed', '3'] + _SMP_FAST + list(extra)


def test_smp_npz_one_rank_equals_two_ranks_and_resume(smp_files, capsys):
    d = smp_files['dir']
    one = str(d / 'one.npz')
    sample.main(_smp_npz_args(smp_files, one))
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
           os.path.join(_SMP_HERE, 'sample.py')] + _smp_npz_args(smp_files, two)
    r = subprocess.run(cmd, cwd=_SMP_HERE, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with np.load(two) as z:
        assert np.array_equal(z['arr_0'], a0)
        assert np.array_equal(z['arr_1'], a1)

    # Resume: an interrupted run leaves some chunks in OUT.npz.parts (kept here with
    # --keep-parts, then one deleted); the next run samples only the missing one.
    res = str(d / 'res.npz')
    sample.main(_smp_npz_args(smp_files, res, ['--keep-parts']))
    parts = res + '.parts'
    os.remove(res)
    os.remove(os.path.join(parts, 'chunk_000001.npy'))
    open(os.path.join(parts, 'chunk_000001.npy.tmp999'), 'wb').close()  # left by a killed rank
    capsys.readouterr()
    sample.main(_smp_npz_args(smp_files, res))
    assert 'resuming: 2 chunk(s) already' in capsys.readouterr().out
    assert not os.path.exists(parts)
    with np.load(res) as z:
        assert np.array_equal(z['arr_0'], a0)

    # Chunks on disk are used as they are (a marker chunk shows it), missing ones sampled.
    sample.main(_smp_npz_args(smp_files, res, ['--keep-parts']))
    np.save(os.path.join(parts, 'chunk_000000.npy'), np.zeros((3, 16, 16, 3), np.uint8))
    os.remove(os.path.join(parts, 'chunk_000002.npy'))
    sample.main(_smp_npz_args(smp_files, res, ['--keep-parts']))
    with np.load(res) as z:
        assert (z['arr_0'][:3] == 0).all() and np.array_equal(z['arr_0'][3:], a0[3:])

    # A parts folder of other settings is refused, not mixed in.
    with pytest.raises(ValueError, match='other settings'):
        sample.main(['--ckpt', smp_files['ckpt'], '--num-images', '8', '--npz', res, '--batch-size', '3',
                     '--seed', '4'] + _SMP_FAST)


def test_smp_npz_needs_divisible_count(smp_files):
    with pytest.raises(ValueError, match='not divisible by the 4 classes'):
        sample.main(['--ckpt', smp_files['ckpt'], '--num-images', '6', '--npz',
                     str(smp_files['dir'] / 'x.npz')] + _SMP_FAST)


def test_smp_out_of_range_class_is_refused(smp_files, capsys):
    with pytest.raises(SystemExit):
        sample.main(['--ckpt', smp_files['ckpt'], '--classes', '12'] + _SMP_FAST)
    assert 'class id 12 is out of range' in capsys.readouterr().err
    with pytest.raises(ValueError, match=r'valid ids are 0\.\.3'):
        sample.parse_classes('1,4', 4)
    assert sample.parse_classes('3, 0', 4) == [3, 0]


def test_smp_num_steps_one_or_one_per_scale(smp_files, capsys):
    assert sample.parse_steps('8') == 8 and sample.parse_steps('50, 8') == [50, 8]
    for bad, msg in (('1', 'must be >= 2'), ('8,x', 'comma-separated integers')):
        with pytest.raises(SystemExit):
            sample.main(['--ckpt', smp_files['ckpt'], '--num-steps', bad, '--cfg', '2.0', '--guidance', '0.9'])
        assert msg in capsys.readouterr().err
    with pytest.raises(ValueError, match='one per scale'):                # 3 grids, 4 scales
        sample.main(['--ckpt', smp_files['ckpt'], '--per-class', '1'] + _SMP_FAST + ['--num-steps', '50,4,4'])


def test_smp_vae_with_other_latent_channels_is_refused(smp_files):
    with pytest.raises(ValueError, match='3 latent channels but the FlowAR model has latent_channels=4'):
        sample.main(['--ckpt', smp_files['ckpt'], '--vae', smp_files['vae3'], '--per-class', '1'] + _SMP_FAST)


def test_smp_checkpoint_errors(smp_files, capsys):
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


def test_smp_ema_is_the_default(smp_files):
    ema_model, _ = sample.load_model_from_checkpoint(smp_files['ckpt'])
    raw_model, _ = sample.load_model_from_checkpoint(smp_files['ckpt'], use_ema=False)
    ck = torch.load(smp_files['ckpt'], weights_only=True)
    k = 'z_proj.weight'
    assert torch.equal(ema_model.state_dict()[k], ck['ema'][k])
    assert torch.equal(raw_model.state_dict()[k], ck['model'][k])


def test_smp_make_grid_layout():
    imgs = np.stack([np.full((2, 3, 3), i, np.uint8) for i in range(5)])  # (5, 2, 3, 3)
    g = sample.make_grid(imgs, nrow=2, pad=1, pad_value=255)
    assert g.shape == (3 * 3 + 1, 2 * 4 + 1, 3)
    assert (g[1:3, 1:4] == 0).all() and (g[1:3, 5:8] == 1).all() and (g[7:9, 1:4] == 4).all()
    assert (g[7:9, 5:8] == 255).all()  # the empty sixth cell stays padding


# ---------------------------------------------------------------------------------------
# metrics.py: the toy metric (CIFAR-10 classifier + Frechet distance) and FID / IS
# ---------------------------------------------------------------------------------------



def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 6))
    mu, sigma = metrics.feature_statistics(f)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9          # FD(a, a) = 0
    # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    m1, m2, s1, s2 = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expect = ((m1 - m2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    got = metrics.frechet_distance(m1, np.diag(s1), m2, np.diag(s2))
    assert got == pytest.approx(expect, rel=1e-9)
    # Non-commuting full covariances: symmetric, and equal to the formula with
    # Tr((S1 S2)^(1/2)) from the eigenvalues of S1 S2 (real and >= 0, since it is similar
    # to a PSD matrix).
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    S1, S2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    tr = np.sqrt(np.linalg.eigvals(S1 @ S2).real.clip(0)).sum()
    expect = ((m1 - m2) ** 2).sum() + np.trace(S1) + np.trace(S2) - 2 * tr
    assert metrics.frechet_distance(m1, S1, m2, S2) == pytest.approx(expect, rel=1e-8)
    assert metrics.frechet_distance(m2, S2, m1, S1) == pytest.approx(expect, rel=1e-8)
    with pytest.raises(ValueError, match='shapes'):
        metrics.frechet_distance(m1, S1, m2[:5], S2[:5, :5])


def test_blur_through_is_area_down_bicubic_up():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(metrics.blur_through(x, 32), x)               # no bottleneck: identity
    flat = np.full((1, 32, 32, 3), 77, np.uint8)
    assert np.array_equal(metrics.blur_through(flat, 4), flat)          # a constant survives
    b8 = metrics.blur_through(x, 8).astype(float)
    # The 8x8 block means survive (area down of the blurred image ~ area down of the image).
    down = lambda im: im.reshape(-1, 8, 4, 8, 4, 3).mean(axis=(2, 4))
    assert np.abs(down(b8) - down(x.astype(float))).mean() < 12
    assert np.abs(b8 - x).mean() > 40                                   # and the detail is gone


class _FixedClassifier(torch.nn.Module):
    """Logits = the mean colour of the image (3 classes: red, green, blue dominant)."""

    def forward(self, x):
        f = x.float().mean(dim=(2, 3))                                   # (B, 3)
        return f, f


def test_score_counts_the_conditioning_labels_and_measures_fd():
    imgs = np.zeros((6, 32, 32, 3), np.uint8)
    for i in range(6):
        imgs[i, ..., i % 3] = 200 + i                                    # image i is colour i % 3
    labels = np.array([0, 1, 2, 0, 1, 0])                                # the last one is wrong
    mu, sigma = metrics.feature_statistics(np.random.default_rng(0).normal(size=(50, 3)))
    r = metrics.score(_FixedClassifier(), imgs, labels, (mu, sigma))
    assert r['acc'] == pytest.approx(5 / 6) and r['n'] == 6
    _, feats = metrics.classify(_FixedClassifier(), imgs)
    assert r['fd'] == pytest.approx(metrics.frechet_distance(*metrics.feature_statistics(feats), mu, sigma))


def test_classifier_learns_shapes_in_one_epoch():
    x, y = data.make_shapes(1200, seed=0)
    xt, yt = data.make_shapes(300, seed=1)
    model, acc = metrics.train_classifier(x, y, xt, yt, epochs=2, batch_size=64, lr=0.1, log=lambda *a: None)
    logits, feats = metrics.classify(model, xt)
    assert logits.shape == (300, 10) and feats.shape == (300, 128)
    assert acc == float((logits.argmax(1) == yt).mean()) and acc > 0.5  # chance is 0.1


def test_cached_cifar_classifier_reaches_85_percent_on_the_test_set():
    path = Path(metrics.DEFAULT_CLASSIFIER)
    if not path.is_file():
        pytest.skip(f"{path} not found: `python metrics.py train-classifier` makes it (minutes)")
    if not (_VD_CIFAR_ROOT / 'cifar-10-batches-py').is_dir():
        pytest.skip(f"real CIFAR-10 not found under {_VD_CIFAR_ROOT}")
    model, ck = metrics.load_classifier(str(path))
    xte, yte = data.load_cifar10(str(_VD_CIFAR_ROOT), train=False)
    acc = metrics.accuracy(model, xte, yte)
    assert acc >= 0.85 and acc == pytest.approx(ck['test_acc'], abs=1e-6)
    calib = ck['calibration']   # the calibration rows are ordered as the metric promises
    assert calib['real train images']['acc'] > calib['real, blurred 8x8']['acc'] > calib['uniform noise']['acc']
    assert calib['real train images']['fd'] < calib['real, blurred 8x8']['fd'] < calib['real, blurred 4x4']['fd']


# ---- FID / IS: pytorch-fid's Inception-v3 with random weights (no download) ----

def _calibrate(model, seed):
    """Set every BatchNorm's running statistics to those of one batch of random images, as
    trained BatchNorm layers would be: the random network's activations are then O(1). (With
    PyTorch's default init and unit statistics they shrink to ~1e-7 by Mixed_7c, which
    would make every absolute tolerance below vacuous.)"""
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None                 # cumulative average: = the one batch's statistics
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.train()(torch.rand(4, 3, 64, 64, generator=g))
    return model.eval()


@pytest.fixture(scope='module')
def net():
    torch.manual_seed(0)
    return _calibrate(metrics.FIDInceptionV3(), seed=100)


# ---------------------------------------------------------------------------------------
# The network: pytorch-fid's state-dict layout


def test_inception_state_dict_matches_pytorch_fid(net):
    sd = net.state_dict()
    # 94 conv+BN units x (conv.weight, bn.{weight, bias, running_mean, running_var,
    # num_batches_tracked}) + fc.{weight, bias}
    assert len(sd) == 94 * 6 + 2 == 566
    assert sum(k.endswith('num_batches_tracked') for k in sd) == 94
    expected = {
        'Conv2d_1a_3x3.conv.weight': (32, 3, 3, 3),
        'Conv2d_1a_3x3.bn.running_mean': (32,),
        'Conv2d_2b_3x3.conv.weight': (64, 32, 3, 3),
        'Conv2d_4a_3x3.conv.weight': (192, 80, 3, 3),
        'Mixed_5b.branch1x1.conv.weight': (64, 192, 1, 1),
        'Mixed_5b.branch5x5_2.conv.weight': (64, 48, 5, 5),
        'Mixed_5b.branch_pool.conv.weight': (32, 192, 1, 1),
        'Mixed_5d.branch_pool.conv.weight': (64, 288, 1, 1),
        'Mixed_6a.branch3x3.conv.weight': (384, 288, 3, 3),
        'Mixed_6b.branch7x7_2.conv.weight': (128, 128, 1, 7),
        'Mixed_6b.branch7x7dbl_2.conv.weight': (128, 128, 7, 1),
        'Mixed_6e.branch7x7dbl_5.conv.weight': (192, 192, 1, 7),
        'Mixed_7a.branch3x3_2.conv.weight': (320, 192, 3, 3),
        'Mixed_7a.branch7x7x3_4.conv.weight': (192, 192, 3, 3),
        'Mixed_7b.branch3x3dbl_1.conv.weight': (448, 1280, 1, 1),
        'Mixed_7b.branch3x3_2b.conv.weight': (384, 384, 3, 1),
        'Mixed_7c.branch3x3dbl_3a.conv.weight': (384, 384, 1, 3),
        'Mixed_7c.branch_pool.conv.weight': (192, 2048, 1, 1),
        'Mixed_7c.branch_pool.bn.running_var': (192,),
        'fc.weight': (1008, 2048),
        'fc.bias': (1008,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any('AuxLogits' in k for k in sd)
    assert all(m.bias is None for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # torchvision's inception_v3(aux_logits=False) has 23,834,568 parameters with a 1000-way
    # fc; pytorch-fid's 1008-way fc adds 8 * 2048 + 8 = 16,392
    assert sum(p.numel() for p in net.parameters()) == 23_834_568 + 16_392 == 23_850_960


def test_inception_forward_shapes_and_logits(net):
    torch.manual_seed(1)
    seen = {}
    handle = net.Mixed_7c.register_forward_hook(lambda mod, args, out: seen.update(x=out))
    for h, w in [(32, 32), (64, 80)]:
        x = torch.rand(2, 3, h, w)
        with torch.no_grad():
            f, l = net(x)
        assert f.shape == (2, 2048) and l.shape == (2, 1008)
        # features: the mean over the final 8x8 grid (pytorch-fid's adaptive avg pool)
        assert seen['x'].shape == (2, 2048, 8, 8)
        torch.testing.assert_close(f, seen['x'].mean((2, 3)), rtol=1e-5, atol=0)
        assert torch.isfinite(f).all() and (f >= 0).all() and 0.05 < f.std() < 20   # after relu
        # logits without fc.bias, as the original IS code (and torch-fidelity's 'logits_unbiased')
        torch.testing.assert_close(l, f @ net.fc.weight.T)
    handle.remove()


class _Stop(Exception):
    pass


def test_inception_input_contract(net):
    """The first conv sees the image resized to 299x299 (bilinear, align_corners=False) and
    mapped from [0, 1] to [-1, 1], as pytorch-fid's InceptionV3(resize_input, normalize_input)."""
    seen = {}

    def hook(mod, args):
        seen['x'] = args[0]
        raise _Stop                             # no need to run the rest of the network

    handle = net.Conv2d_1a_3x3.register_forward_pre_hook(hook)
    try:
        torch.manual_seed(2)
        x = torch.rand(2, 3, 64, 80)
        for inp, want in [(x, 2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1),
                          (torch.zeros(1, 3, 40, 40), -torch.ones(1, 3, 299, 299)),
                          (torch.ones(1, 3, 299, 299), torch.ones(1, 3, 299, 299))]:
            with pytest.raises(_Stop):
                net(inp)
            torch.testing.assert_close(seen['x'], want)
    finally:
        handle.remove()


def _pool_branch(block, x):
    """The pool branch of an Inception block (the last channels of its output) with its 1x1
    conv + BN set to the identity on the first n channels: relu(pool(x))[:, :n]."""
    conv, bn = block.branch_pool.conv, block.branch_pool.bn
    n, cin = conv.weight.shape[:2]
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 0, 0] = torch.eye(n, cin)
        bn.weight.fill_(1), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1 - bn.eps)
        return block(x)[:, -n:], n


def test_inception_fid_pools():
    """pytorch-fid's patches: avg pools that ignore padded zeros (TF) in Mixed_5b-d, 6b-e,
    7b; a max pool in Mixed_7c. References written with explicit 3x3 windows."""
    torch.manual_seed(3)
    net = metrics.FIDInceptionV3().eval()
    for name, kind in [('Mixed_5b', 'avg'), ('Mixed_5d', 'avg'), ('Mixed_6b', 'avg'),
                       ('Mixed_6e', 'avg'), ('Mixed_7b', 'avg'), ('Mixed_7c', 'max')]:
        block = getattr(net, name)
        cin = block.branch_pool.conv.weight.shape[1]
        x = torch.rand(1, cin, 5, 6) + 0.5                  # positive: relu is the identity
        got, n = _pool_branch(block, x)
        xs = x[:, :n]
        if kind == 'avg':                                   # window sum / number of real pixels
            ones = torch.ones(n, 1, 3, 3)
            s = F.conv2d(F.pad(xs, (1, 1, 1, 1)), ones, groups=n)
            c = F.conv2d(F.pad(torch.ones_like(xs), (1, 1, 1, 1)), ones, groups=n)
            want = s / c
            assert c[0, 0, 0, 0] == 4 and c[0, 0, 2, 2] == 9
        else:
            want = F.pad(xs, (1, 1, 1, 1), value=-math.inf).unfold(2, 3, 1).unfold(3, 3, 1).amax((-1, -2))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


# Each block's branches in concatenation order: (the conv units of the chain, its width);
# 'pool' = the parameter-free max-pool passthrough of the grid reductions (torchvision's order)
_A = [(['branch1x1'], 64), (['branch5x5_1', 'branch5x5_2'], 64),
      (['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'], 96), (['branch_pool'], None)]
_B = [(['branch3x3'], 384), (['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'], 96), ('pool', None)]
_C = [(['branch1x1'], 192), ([f'branch7x7_{i}' for i in (1, 2, 3)], 192),
      ([f'branch7x7dbl_{i}' for i in (1, 2, 3, 4, 5)], 192), (['branch_pool'], 192)]
_D = [(['branch3x3_1', 'branch3x3_2'], 320), ([f'branch7x7x3_{i}' for i in (1, 2, 3, 4)], 192), ('pool', None)]
_E = [(['branch1x1'], 320), (['branch3x3_1', 'branch3x3_2a'], 384), (['branch3x3_1', 'branch3x3_2b'], 384),
      (['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3a'], 384),
      (['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3b'], 384), (['branch_pool'], 192)]


def _set_unit(unit, identity):
    """A conv+BN+relu unit as the identity on the first channels (centre tap; stride-2 convs
    subsample) or as zero."""
    conv, bn = unit.conv, unit.bn
    kh, kw = conv.weight.shape[2:]
    conv.weight.zero_()
    if identity:
        conv.weight[:, :, kh // 2, kw // 2] = torch.eye(*conv.weight.shape[:2])
    bn.weight.fill_(1), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1 - bn.eps)


@torch.no_grad()
def test_inception_block_layout():
    """Channel counts, branch wiring and concatenation order of every kind of block, against
    the layout above (torchvision's): with random weights each conv branch's channel slice
    is its chain of units applied in order; with one chain set to the identity and every
    other conv to zero, only that branch's slice (and the max-pool passthrough of B / D) is
    non-zero."""
    torch.manual_seed(11)
    net = metrics.FIDInceptionV3().eval()
    for name, cin, cout, layout in [('Mixed_5b', 192, 256, _A), ('Mixed_5d', 288, 288, _A),
                                    ('Mixed_6a', 288, 768, _B), ('Mixed_6b', 768, 768, _C),
                                    ('Mixed_6d', 768, 768, _C), ('Mixed_7a', 768, 1280, _D),
                                    ('Mixed_7b', 1280, 2048, _E), ('Mixed_7c', 2048, 2048, _E)]:
        block = getattr(net, name)
        x = torch.rand(1, cin, 7, 7) + 0.5
        widths = [cin if units == 'pool' else w or block.branch_pool.conv.weight.shape[0]
                  for units, w in layout]
        assert sum(widths) == cout, name
        edges = np.cumsum([0] + widths)
        # random weights: each conv branch's slice is its chain applied in order
        y = block(x)
        for i, (units, _) in enumerate(layout):
            if units not in ('pool', ['branch_pool']):
                h = x
                for u in units:
                    h = getattr(block, u)(h)
                assert h.abs().max() > 0
                torch.testing.assert_close(y[:, edges[i]:edges[i + 1]], h, rtol=1e-4,
                                           atol=1e-5 * h.abs().max().item(), msg=f'{name} {units}')
        # one chain at the identity, the other convs at zero: only its slice is non-zero
        for i, (units, _) in enumerate(layout):
            if units == 'pool':
                continue
            for unit in block.children():
                _set_unit(unit, identity=False)
            for u in units:
                _set_unit(getattr(block, u), identity=True)
            y = block(x)
            hw = 3 if layout[-1][0] == 'pool' else 7          # grid reductions: 7x7 -> 3x3
            assert y.shape == (1, cout, hw, hw), name
            inside = torch.zeros(cout, dtype=torch.bool)
            inside[edges[i]:edges[i + 1]] = True
            if layout[-1][0] == 'pool':                       # the passthrough: max pool of x
                assert torch.equal(y[:, -cin:], F.max_pool2d(x, 3, stride=2)), name
                inside[-cin:] = True
            assert (y[:, edges[i]:edges[i + 1]].abs().sum((2, 3)) > 0).any(), (name, units)
            assert (y[:, ~inside] == 0).all(), (name, units)


# ---------------------------------------------------------------------------------------
# Loading and downloading the weights


def test_load_inception_round_trip(tmp_path, net):
    torch.manual_seed(4)
    src = _calibrate(metrics.FIDInceptionV3(), seed=5)
    path = str(tmp_path / 'w.pth')
    torch.save(src.state_dict(), path)
    x = torch.rand(1, 3, 48, 48)
    loaded = metrics.load_inception(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        want, got, other = src(x), loaded(x), net(x)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert not torch.equal(want[0], other[0])          # the weights did change the output

    # a file without the num_batches_tracked counters, in torch's pre-1.6 (non-zip) format,
    # as a 2018 file may be, loads too
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith('num_batches_tracked')}
    assert len(sd) == 472
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    with torch.no_grad():
        assert torch.equal(metrics.load_inception(path)(x)[0], want[0])


def test_load_inception_errors(tmp_path):
    sd = metrics.FIDInceptionV3().state_dict()
    path = str(tmp_path / 'w.pth')
    # one key renamed: both names in the message
    bad = dict(sd)
    bad['Mixed_6c.branch7x7_2.conv.weights'] = bad.pop('Mixed_6c.branch7x7_2.conv.weight')
    torch.save(bad, path)
    with pytest.raises(RuntimeError, match=r'Mixed_6c\.branch7x7_2\.conv\.weight') as e:
        metrics.load_inception(path)
    assert 'Mixed_6c.branch7x7_2.conv.weights' in str(e.value) and metrics.INCEPTION_FILE in str(e.value)
    # one key missing / one extra key: named
    bad = {k: v for k, v in sd.items() if k != 'Mixed_7c.branch_pool.bn.running_var'}
    torch.save(bad, path)
    with pytest.raises(RuntimeError, match=r"missing keys \['Mixed_7c\.branch_pool\.bn\.running_var'\]"):
        metrics.load_inception(path)
    torch.save(dict(sd, **{'AuxLogits.fc.weight': torch.zeros(1008, 768)}), path)
    with pytest.raises(RuntimeError, match=r"unexpected keys \['AuxLogits\.fc\.weight'\]"):
        metrics.load_inception(path)
    # a wrong shape (1000-way fc, torchvision's ImageNet head)
    bad = dict(sd)
    bad['fc.weight'], bad['fc.bias'] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(bad, path)
    with pytest.raises(RuntimeError, match='fc.weight'):
        metrics.load_inception(path)
    # a missing file: where to get it
    with pytest.raises(FileNotFoundError, match='download_inception') as e:
        metrics.load_inception(str(tmp_path / 'nope.pth'))
    assert metrics.INCEPTION_URL in str(e.value)


def test_download_inception_checks_sha256(tmp_path):
    src = tmp_path / 'src.bin'
    payload = np.random.default_rng(0).bytes(3 << 20)          # 3 MB: several read blocks
    src.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    url = src.as_uri()                                          # file:///...
    dest = tmp_path / 'sub' / 'w.pth'

    assert metrics.download_inception(str(dest), url=url, sha256_prefix=digest[:8]) == str(dest)
    assert dest.read_bytes() == payload and os.listdir(tmp_path / 'sub') == ['w.pth']

    dest.unlink()
    bad_prefix = ('0' if digest[0] != '0' else '1') + digest[1:8]
    with pytest.raises(ValueError, match='sha256'):
        metrics.download_inception(str(dest), url=url, sha256_prefix=bad_prefix)
    assert os.listdir(tmp_path / 'sub') == []                 # nothing left behind

    with pytest.raises(RuntimeError, match='could not download'):
        metrics.download_inception(str(dest), url=(tmp_path / 'missing.bin').as_uri())
    assert os.listdir(tmp_path / 'sub') == []                 # nothing left behind


def test_inception_activations_batches(net, capsys):
    rng = np.random.default_rng(6)
    imgs = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    f, l = metrics.inception_activations(net, imgs, batch_size=2, log_every=1)
    assert f.shape == (3, 2048) and l.shape == (3, 1008) and f.dtype == l.dtype == np.float64
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want_f, want_l = net(x)
    # batches of 2 vs one batch of 3: float32 rounding differs, hence the scale-relative atol
    for got, want in [(f, want_f), (l, want_l)]:
        want = want.double().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    out = capsys.readouterr().out
    assert '2/3 images' in out and '3/3 images' in out and 'ETA' in out
    with pytest.raises(ValueError, match='uint8'):
        metrics.inception_activations(net, imgs.astype(np.float32))


# ---------------------------------------------------------------------------------------
# FID


def test_fid_same_features_is_zero_and_symmetric(tmp_path):
    rng = np.random.default_rng(7)
    a = rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64))
    b = 0.5 + rng.normal(size=(250, 64)) @ rng.normal(size=(64, 64))
    path = str(tmp_path / 'ref.npz')
    mu, sigma = metrics.save_reference_stats(a, path)
    with np.load(path) as z:
        assert sorted(z.files) == ['mu', 'sigma'] and z['sigma'].shape == (64, 64)
        np.testing.assert_array_equal(z['mu'], mu)
    assert abs(metrics.fid_from_features(a, path)) < 1e-6
    assert abs(metrics.fid_from_features(a, {'mu': mu, 'sigma': sigma})) < 1e-6
    ab = metrics.fid_from_features(a, {'mu': b.mean(0), 'sigma': np.cov(b, rowvar=False)})
    ba = metrics.fid_from_features(b, path)
    assert ab > 1 and abs(ab - ba) < 1e-8 * ab


def _tr_sqrt_newton_schulz(s1, s2, iters=60):
    """Tr((S1 S2)^(1/2)) by the coupled Newton-Schulz iteration on A = S1 S2 (whose
    eigenvalues are real and >= 0): Y -> A^(1/2), Z -> A^(-1/2)."""
    a = s1 @ s2
    norm = np.linalg.norm(a)
    y, z, eye = a / norm, np.eye(len(a)), np.eye(len(a))
    for _ in range(iters):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return np.trace(y) * np.sqrt(norm)


def test_fid_closed_forms():
    rng = np.random.default_rng(8)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    d = 10
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert abs(metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) - want) < 1e-9

    # 2x2, non-commuting: a 2x2 matrix with eigenvalues l1, l2 >= 0 has
    # Tr(A^(1/2)) = sqrt(l1) + sqrt(l2) = sqrt(Tr A + 2 sqrt(det A))
    S1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    S2 = np.array([[1.0, -0.3], [-0.3, 0.5]])
    assert not np.allclose(S1 @ S2, S2 @ S1)
    A = S1 @ S2
    tr_sqrt = math.sqrt(np.trace(A) + 2 * math.sqrt(np.linalg.det(A)))
    m1, m2 = np.array([1.0, -2.0]), np.array([0.5, 0.0])
    want = ((m1 - m2) ** 2).sum() + np.trace(S1) + np.trace(S2) - 2 * tr_sqrt
    assert abs(metrics.frechet_distance(m1, S1, m2, S2) - want) < 1e-10

    # d = 16, random full-rank covariances, against a Newton-Schulz square root
    d = 16
    X, Y = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    S1, S2 = X @ X.T / d + 0.1 * np.eye(d), Y @ Y.T / d + 0.1 * np.eye(d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    want = ((m1 - m2) ** 2).sum() + np.trace(S1) + np.trace(S2) - 2 * _tr_sqrt_newton_schulz(S1, S2)
    assert abs(metrics.frechet_distance(m1, S1, m2, S2) - want) < 1e-8 * max(1, abs(want))


# ---------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_bounds():
    # the same (here uniform) prediction for every image: p(y|x) = p(y), KL = 0, IS = 1
    mean, std = metrics.inception_score(np.zeros((50, 1008)), splits=5)
    assert abs(mean - 1) < 1e-12 and std < 1e-12
    mean, _ = metrics.inception_score(np.tile(np.random.default_rng(9).normal(size=1008), (20, 1)), splits=2)
    assert abs(mean - 1) < 1e-9

    # confident and diverse: N images per split, one-hot on N distinct classes -> IS = N
    n, splits = 12, 4
    logits = np.zeros((n * splits, 1008))
    for s in range(splits):
        logits[s * n + np.arange(n), 100 * s + np.arange(n)] = 60.0   # other classes at 0
    mean, std = metrics.inception_score(logits, splits=splits)
    assert abs(mean - n) < 1e-6 and std < 1e-6

    # splits of different diversity: N = 3 and 6 distinct classes -> scores 3 and 6
    logits = np.zeros((12, 1008))
    logits[np.arange(6), [0, 1, 2, 0, 1, 2]] = 60.0
    logits[6 + np.arange(6), np.arange(6)] = 60.0
    mean, std = metrics.inception_score(logits, splits=2)
    assert abs(mean - 4.5) < 1e-6 and abs(std - 1.5) < 1e-6

    with pytest.raises(ValueError):
        metrics.inception_score(np.zeros((3, 1008)), splits=10)


def test_inception_score_matches_direct_formula():
    """Soft predictions: against exp(mean_x sum_y p(y|x) log(p(y|x) / p(y))) written out."""
    rng = np.random.default_rng(10)
    logits = 3 * rng.normal(size=(40, 1008))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = []
    for part in np.split(p, 4):
        py = part.mean(0)
        want.append(np.exp(np.mean(np.sum(part * np.log(part / py), 1))))
    mean, std = metrics.inception_score(logits, splits=4)
    assert abs(mean - np.mean(want)) < 1e-9 * mean and abs(std - np.std(want)) < 1e-9 * mean
    assert mean > 1


# =======================================================================================
# ablations.py: the variants of Tables 4-6
# =======================================================================================

import ablations

_ABL_ROWS = [(6, r) for r in ablations.TABLES[6]] + [(5, 'per-token'), (4, '1,4,8'), (4, '1,8'),
                                                      (5, 'per-token-diffusion'), (5, 'per-scale-diffusion')]


@pytest.mark.parametrize('table,row', _ABL_ROWS)
def test_abl_variant_trains_and_samples(table, row):
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


def _abl_head_outputs(row, sem, seed=0):
    model = ablations.build_model(6 if row != 'per-token' else 5, row, seed)
    head = model.flownet
    for p in head.parameters():                  # non-zero biases: every path carries signal
        p.data.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 4, generator=g), torch.rand(2, generator=g)
    pos = model.positions[model.slices[1]]       # the 2x2 scale: 4 tokens
    return head(x, t, sem, pos)


def test_abl_injections_differ_and_use_the_semantics_as_the_paper_says():
    g = torch.Generator().manual_seed(2)
    sem = torch.randn(2, 4, 128, generator=g)
    rows = list(ablations.TABLES[6]) + ['per-token']
    outs = {r: _abl_head_outputs(r, sem) for r in rows}
    for i, a in enumerate(rows):                 # no two switches build the same head
        for b in rows[:i]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)
    swapped = sem[:, [1, 0, 2, 3]]               # the semantics of positions 0 and 1 swapped
    for r in rows:
        d = (_abl_head_outputs(r, swapped) - outs[r]).abs().amax(dim=(0, 2))   # (N,)
        if r == 'adaln':                         # pooled semantics: blind to where they are
            assert d.max() < 1e-5, r
        else:                                    # every other injection sees the swap
            assert d.max() > 1e-3, r
    # per-token head (Table 5): each token's velocity depends on its own semantics only
    moved = sem.clone()
    moved[:, 2] += 1.0
    d = (_abl_head_outputs('per-token', moved) - outs['per-token']).abs().amax(dim=(0, 2))
    assert d[2] > 1e-3 and torch.all(d[[0, 1, 3]] < 1e-6)


@pytest.mark.parametrize('row', ['1,4,8', '1,8'])
def test_abl_scale_lists_keep_causality_and_the_kv_cache(row):
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


def test_abl_cli_refuses_bad_rows_and_missing_base(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ablations.main(['--table', '6', '--rows', 'sum', '--base', str(tmp_path)])
    assert 'not in Table 6' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablations.main(['--table', '4', '--base', str(tmp_path)])
    assert 'run `python train.py' in capsys.readouterr().err


# ---- Table 5's diffusion rows -----------------------------------------------------------

def test_abl_diffusion_forward_process_and_target():
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
def test_abl_ddim_with_the_exact_epsilon_recovers_the_clean_tokens(num_steps):
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
def test_abl_diffusion_sampler_applies_cfg_to_the_epsilons(cfg, guidance, monkeypatch):
    # the head predicts constant epsilons e_c / e_u (the semantics' first channels); DDIM
    # with e_u + w (e_c - e_u) inside the guidance interval and e_c outside it. (abar >= 0.1
    # here: DDIM amplifies float32 rounding by 1 / sqrt(abar(1)) when eps is not the noise.)
    monkeypatch.setattr(ablations, 'ABAR_MIN', 0.1)
    torch.manual_seed(0)
    model = ablations.DiffusionFlowAR.from_preset('toy', ar_dim=64, enc_depth=1, dec_depth=1, ar_heads=2,
                                                  head_depth=1, head_dim=64).eval()
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


def test_abl_variants_share_the_flow_models_weights_and_the_default_path():
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

def test_abl_image_pyramid_forward_uses_the_given_maps():
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


def test_abl_image_pyramid_maps_use_make_batchs_draws():
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


def test_abl_image_pyramid_moments_encode_the_downsampled_images_once(tmp_path, monkeypatch):
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
                           cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
        assert r.returncode == 0, r.stderr
        applied, faults = r.stdout.split()
        out[mode] = int(faults)
    if applied != 'True':
        pytest.skip("not glibc: keep_freed_memory is a no-op here")
    assert out['tuned'] * 5 < out['plain'], out


def test_sample_restores_the_training_mode_even_after_an_error():
    model = FlowAR.from_preset('toy', ar_dim=64, enc_depth=1, dec_depth=1, ar_heads=2, head_depth=1, head_dim=64)
    model.train()
    model.sample(torch.tensor([1]), num_steps=4)
    assert model.training
    with pytest.raises(ValueError, match='class ids'):
        model.sample(torch.tensor([99]), num_steps=4)      # fails inside, after eval()
    assert model.training


def test_bench_products_seconds_counts_matrix_products_and_nothing_else():
    # bench.py's "its products" columns: a call that is one big product spends almost all
    # its time in products; a call of element-wise work spends none there.
    import bench
    a = torch.randn(512, 512)
    prod_s, total_s = bench.products_seconds(lambda: [a @ a for _ in range(4)])
    assert 0 < prod_s <= total_s, (prod_s, total_s)            # no ratio: no timing assertion
    lin = torch.nn.Linear(512, 512)                           # addmm, counted too
    assert bench.products_seconds(lambda: lin(a))[0] > 0
    assert bench.products_seconds(lambda: [a * a + 1 for _ in range(4)])[0] == 0


def test_logit_normal_t_is_sigmoid_of_a_standard_normal():
    # The toy's t distribution (train.sample_randomness, t_sampling='logit-normal', SD3):
    # logit(t) must be N(0, 1), so 72.7% of the draws fall in [0.25, 0.75] (uniform: 50%).
    import train
    draw = lambda i, mode: train.sample_randomness(0, 0, i, (4, 8, 8), 2, [(1, 1), (8, 8)], mode)[2]
    t = torch.stack([draw(i, 'logit-normal') for i in range(4000)]).flatten()
    z = torch.log(t / (1 - t))                                     # logit
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    middle = ((t > 0.25) & (t < 0.75)).float().mean().item()
    assert abs(middle - 0.727) < 0.02, middle
    u = torch.stack([draw(i, 'uniform') for i in range(4000)]).flatten()
    assert abs(((u > 0.25) & (u < 0.75)).float().mean().item() - 0.5) < 0.03
    assert torch.equal(draw(7, 'logit-normal'), draw(7, 'logit-normal'))  # one generator per sample
