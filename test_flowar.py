"""Tests of flowar.py, one class per part of the paper, in the paper's order:

    TestScalePyramid         Eq. 5: the scale pyramid S = {Down(F, 2^(n-1)), ..., F}
    TestUpsample             Eq. 6: Up(.), the input of the next scale
    TestCausalTransformer    Eq. 6: the causal scale Transformer (layout, mask, RoPE, KV cache)
    TestFlowMatchingLoss     Eq. 7-9: interpolation, velocity target, per-scale loss
    TestSpatialAdaLN         Eq. 10: Spatial-adaLN and the flow head
    TestSampler              Sec. 3.2 "Inference Pipeline": Euler, time grid, CFG
    TestReleasedCheckpoints  the presets against the released checkpoints

A student who rewrites one component runs its class:

    python -m pytest test_flowar.py::TestSpatialAdaLN -q

(one test: -k NAME). `python -m pytest -q` runs these and tests/, which holds the tests of
the other project files (train, vae + data, sample, metrics, ablations, bench). All run on
a CPU in float32; the key lists of the released checkpoints are in reference/.
"""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flowar
import sample
import vae
from flowar import FlowAR

# One thread per test process: deterministic, and no oversubscription when the tests
# launch 2-process torchrun jobs on a 2-core machine. (tests/conftest.py does the same for
# the tests in tests/.)
torch.set_num_threads(1)

REFERENCE = Path(__file__).resolve().parent / 'reference'   # key lists of the released checkpoints (in the repo)


def tiny_model(**overrides):
    """A very small FlowAR for fast tests (toy latents: 4 x 8 x 8, scales 1-2-4-8: the full
    pyramid, so every test sees coarse, middle and final scales; the toy recipe uses 1-8)."""
    cfg = dict(ar_dim=64, enc_depth=1, dec_depth=1, ar_heads=2, head_depth=2, head_width=64,
               attn_dropout=0.0, proj_dropout=0.0, scales=(1, 2, 4, 8))
    cfg.update(overrides)
    torch.manual_seed(0)
    return FlowAR.from_preset('toy', **cfg).eval()


def fm_inputs(z, g=None):
    """Flow-matching noise (one map per toy scale 1-2-4-8) and t (B, 4) for FlowAR.forward."""
    B, C = z.shape[:2]
    return [torch.randn(B, C, s, s, generator=g) for s in (1, 2, 4, 8)], torch.rand(B, 4, generator=g)


class TestScalePyramid:
    """Eq. 5: build_scale_pyramid, normalize_scales, flexible and non-square scales."""

    def test_scale_pyramid_is_area_downsampling_of_the_full_latent(self):
        torch.manual_seed(0)
        z = torch.randn(2, 4, 8, 8)
        maps = flowar.build_scale_pyramid(z, [1, 2, 4, 8])
        assert [tuple(m.shape) for m in maps] == [(2, 4, s, s) for s in (1, 2, 4, 8)]
        assert torch.equal(maps[-1], z)                                   # Down(F, 1) = F
        assert torch.allclose(maps[0][:, :, 0, 0], z.mean(dim=(2, 3)), atol=1e-6)  # 1x1 = mean
        # 4x4 = mean of each 2x2 block of the full latent (not of the 8x8 -> residual etc.)
        assert torch.allclose(maps[2], z.reshape(2, 4, 4, 2, 4, 2).mean(dim=(3, 5)), atol=1e-6)

    def test_scale_pyramid_flexible_and_non_square_scales(self):
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


class TestUpsample:
    """Eq. 6's Up(.): upsample_to_next (bicubic to the full size, then area down)."""

    def test_upsample_to_next_is_bicubic_to_full_then_area_down(self):
        s = torch.randn(1, 2, 2, 2)
        up = flowar.upsample_to_next(s, (8, 8), (4, 4))
        full = F.interpolate(s, size=(8, 8), mode='bicubic', align_corners=False)
        assert torch.allclose(up, full.reshape(1, 2, 4, 2, 4, 2).mean(dim=(3, 5)), atol=1e-6)
        const = torch.full((1, 2, 1, 1), 0.7)   # a constant map stays constant
        assert torch.allclose(flowar.upsample_to_next(const, (16, 16), (2, 2)), torch.full((1, 2, 2, 2), 0.7))


class TestCausalTransformer:
    """Eq. 6's Transformer: sequence layout, block-causal mask, 2D RoPE, attention, KV cache."""

    def test_sequence_layout_mask_and_rope_positions(self):
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

    def test_attention_module_is_rope_on_queries_and_keys_then_attention(self):
        # Attention.forward written out: qkv, RoPE on q and k only (not v), softmax(q k^T /
        # sqrt(d)) v under the mask, heads joined, output projection
        torch.manual_seed(0)
        B, N, D, h = 2, 5, 32, 2
        att = flowar.Attention(D, h, qkv_bias=True)
        x, pos = torch.randn(B, N, D), torch.rand(N, 2) * 8
        mask = torch.rand(N, N) > 0.3
        mask |= torch.eye(N, dtype=torch.bool)                       # every query sees itself
        q, k, v = att.qkv(x).view(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4)
        q, k = att.rope(q, pos), att.rope(k, pos)
        w = ((q @ k.transpose(-2, -1)) / math.sqrt(D // h)).masked_fill(~mask, float('-inf')).softmax(-1)
        want = att.proj((w @ v).transpose(1, 2).reshape(B, N, D))
        assert (att(x, pos, mask) - want).abs().max() < 1e-5

    def test_block_causal_mask_changing_scale_k_plus_1_leaves_scales_up_to_k_unchanged(self):
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

    def test_rope_rotates_pairs_and_preserves_relative_positions(self):
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
        # the released layout: channels (2j, 2j+1) are one pair, turned counter-clockwise by
        # row * freqs[j] (first half) and col * freqs[j] (second half); a rotate-half layout
        # (pairs (j, j + d/4)) or the opposite direction fails here
        out, (r, c) = rope(q, p(3, 5))[0, 0, 0], (3.0, 5.0)
        ang = torch.cat([r * rope.freqs, c * rope.freqs])                 # (8,) one angle per pair
        x0, x1 = q[0, 0, 0, 0::2], q[0, 0, 0, 1::2]
        assert torch.allclose(out[0::2], x0 * ang.cos() - x1 * ang.sin(), atol=1e-5)
        assert torch.allclose(out[1::2], x0 * ang.sin() + x1 * ang.cos(), atol=1e-5)

    def test_attention_equals_torch_sdpa_with_and_without_a_mask(self):
        # flowar.attention's CPU path (plain products) against torch's fused kernel, fp32
        g = torch.Generator().manual_seed(0)
        q, k, v = torch.randn(3, 2, 4, 21, 16, generator=g).unbind(0)
        mask = flowar.block_causal_mask([(1, 1), (2, 2), (4, 4)])      # (21, 21) bool
        for m in (None, mask):
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            assert torch.allclose(flowar.attention(q, k, v, m), want, atol=1e-6)
        assert not torch.allclose(flowar.attention(q, k, v, mask), flowar.attention(q, k, v), atol=1e-3)

    def test_kv_cache_scale_by_scale_equals_the_masked_forward(self):
        # Sampling runs T one scale at a time, each attending to the cached keys/values of the
        # scales before it; that must give the semantics of one pass under the block-causal mask
        model = tiny_model()
        torch.manual_seed(2)
        labels = torch.tensor([4, 0])
        maps = flowar.build_scale_pyramid(torch.randn(2, 4, 8, 8), model.scales)
        x_in = model.ar_input_tokens(maps[:-1], labels)               # (B, L, D)
        full = model.transformer(x_in, labels)                        # one pass, mask
        caches = [dict() for _ in range(len(model.encoder_blocks) + len(model.decoder_blocks))]
        for sl in model.slices:
            part = model.transformer(x_in[:, sl], labels, start=sl.start, caches=caches)
            assert (part - full[:, sl]).abs().max() <= 1e-5
            assert caches[0]['k'].shape[2] == sl.stop                 # the cache holds scales <= i
        with pytest.raises(ValueError, match='KV cache holds'):
            model.transformer(x_in[:, model.slices[1]], labels, start=0, caches=caches)

    @pytest.mark.parametrize('cfg', [1.0, 3.0])
    def test_kv_cached_sampling_equals_teacher_forced_forward(self, cfg):
        model = tiny_model()
        labels = torch.tensor([0, 5, 9])
        g = torch.Generator().manual_seed(0)
        z, info = model.sample(labels, num_steps=6, cfg=cfg, guidance=0.9, generator=g, return_details=True)
        assert z.shape == (3, 4, 8, 8) and torch.equal(z, info['maps'][-1])
        full = model.semantics(info['maps'], labels)               # one forward, block-causal mask
        for sl, s_hat in zip(model.slices, info['semantics']):
            assert (full[:, sl] - s_hat).abs().max() <= 1e-5

    def test_cross_attention_head_block_runs_and_is_causal_too(self):
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


class _EchoHead(torch.nn.Module):
    """A stand-in for the flow head that predicts v = x_t (to pin the loss formula)."""

    def forward(self, x, t, semantics, pos):
        return x


class _RecordingHead(torch.nn.Module):
    """Wraps a flow head and records every call: (t[0], x); full records (t, s_hat, pos) in `args`."""

    def __init__(self, head):
        super().__init__()
        self.head, self.calls, self.args = head, [], []

    def forward(self, x, t, semantics, pos):
        self.calls.append((float(t[0]), x.detach().clone()))
        self.args.append((t.detach().clone(), semantics.detach().clone(), pos.clone()))
        return self.head(x, t, semantics, pos)


class TestFlowMatchingLoss:
    """Eq. 7-9: interpolation, velocity target and scale weights of the flow-matching loss."""

    def test_interpolation_and_velocity_target_are_the_released_ones(self):
        # RELEASED (Eq. 7-8 with t reversed): x_t = (1 - t) s + t eps, t = 1 is pure noise, and
        # the target is d x_t / dt = eps - s. The paper's F_t = t s + (1 - t) F_0 fails here.
        g = torch.Generator().manual_seed(0)
        x, eps = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
        t = torch.tensor([0.0, 0.3, 1.0]).view(3, 1, 1)
        x_t, target = FlowAR.interpolate(x, eps, t)
        assert torch.equal(x_t[0], x[0]) and torch.equal(x_t[2], eps[2])    # t = 0 data, t = 1 noise
        assert torch.allclose(x_t[1], 0.7 * x[1] + 0.3 * eps[1], atol=1e-6)
        assert torch.allclose(target, eps - x, atol=1e-6)
        dt = 1e-3                                                            # the target is d x_t / dt
        assert torch.allclose((FlowAR.interpolate(x, eps, t + dt)[0] - x_t) / dt, target, atol=1e-3)

    def test_loss_uses_released_interpolation_target_and_scale_weights(self):
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

    def test_loss_gives_the_head_each_scales_own_semantics_time_and_positions(self):
        # FM(F_t^i, s-hat^i, t_i): scale i's head call gets the teacher-forced semantics of
        # scale i's positions (not pooled, not another scale's), its own t and RoPE positions
        model = tiny_model()
        model.flownet = _RecordingHead(_EchoHead())
        torch.manual_seed(3)
        z, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
        noise, t = fm_inputs(z)
        model(z, y, noise, t)
        full = model.semantics(flowar.build_scale_pyramid(z, model.scales), y)    # (B, L, D)
        calls = model.flownet.args
        assert len(calls) == len(model.scales)
        for i, (sl, (ti, s_hat, pos)) in enumerate(zip(model.slices, calls)):
            assert torch.equal(ti, t[:, i]) and torch.equal(pos, model.positions[sl])
            assert torch.allclose(s_hat, full[:, sl], atol=1e-6)

    def test_uniform_scale_weighting_is_the_plain_sum_of_eq9(self):
        model = tiny_model(scale_weighting='uniform')
        model.flownet = _EchoHead()
        z = torch.randn(2, 4, 8, 8)
        noise = [torch.randn(2, 4, s, s) for s in (1, 2, 4, 8)]
        loss, per_scale = model(z, torch.tensor([1, 2]), noise, torch.rand(2, 4))
        assert torch.allclose(loss, per_scale.sum(), atol=1e-6)
        with pytest.raises(ValueError, match='scale_weighting'):
            tiny_model(scale_weighting='area')

    def test_tiny_model_overfits_a_handful_of_latents(self):
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


class TestSpatialAdaLN:
    """Eq. 10: Spatial-adaLN's per-position modulation, its block, and the flow head."""

    def test_spatial_adaln_reduces_to_adaln_for_constant_semantics_and_is_local(self):
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

    def test_spatial_adaln_block_is_eq10_written_out(self):
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
        assert (block(x, t_emb, c, pos) - F2).abs().max() < 1e-6 * F2.abs().max()  # |F2| ~ 1e3

    def test_time_embedding_is_the_released_integer_step(self):
        # RELEASED vs PAPER: the head embeds the integer step int(t * 1000), truncated, not the
        # continuous t: t = 0.0012 and 0.0019 are both step 1; the sinusoids are [cos, sin]
        emb = flowar.TimestepEmbedder(64)
        same = emb(torch.tensor([0.0012, 0.0019, 0.001]))
        assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])
        assert not torch.allclose(same[0], emb(torch.tensor([0.002]))[0])
        f = flowar.timestep_embedding(torch.tensor([3]), dim=8)[0]
        freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
        assert torch.allclose(f, torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]), atol=1e-6)

    def test_flow_head_uses_semantics_position_by_position(self):
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





class _SemanticsHead(torch.nn.Module):
    """A flow head with a known output: the velocity is the first C channels of the
    semantics, whatever x and t are (so the conditional and unconditional velocities are
    known from the AR Transformer alone)."""

    def __init__(self, C):
        super().__init__()
        self.C = C

    def forward(self, x, t, semantics, pos):
        return semantics[..., :self.C].to(x.dtype)


class TestSampler:
    """Sec. 3.2 "Inference Pipeline": Euler, time grid, CFG schedule and combination, guidance."""

    def test_euler_moves_noise_to_a_gaussian_target_with_the_exact_velocity_field(self):
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

    def test_time_grids_are_the_released_ones(self):
        g = flowar.euler_time_grid(25)
        assert len(g) == 25 and g[0] == 1 and g[-1] == 0 and torch.all(g[1:] < g[:-1])
        assert torch.allclose(g[:12], torch.linspace(1, 0.3, 12, dtype=torch.float64))
        assert torch.allclose(g[12:], torch.linspace(0.25, 0, 13, dtype=torch.float64))
        u = flowar.euler_time_grid(50)
        assert len(u) == 51 and torch.allclose(u[1:] - u[:-1], torch.full((50,), -0.02, dtype=torch.float64))

    def test_cfg_schedule_rises_linearly(self):
        assert flowar.cfg_schedule(4, 4.0) == [1.0, 2.0, 3.0, 4.0]
        assert flowar.cfg_schedule(5, 1.0) == [1.0] * 5
        assert flowar.cfg_schedule(4, 4.0, ramp=False) == [4.0] * 4

    @pytest.mark.parametrize('cfg, guidance, ramp, num_steps', [
        (3.0, 0.5, True, 8), (2.0, 1.0, True, 8), (1.0, 1.0, True, 8), (3.0, 0.5, False, 8),
        (3.0, 0.5, True, [50, 3, 8, 4])])  # a grid per scale (the toy's [50, 8])
    def test_cfg_combination_guidance_interval_and_euler_direction(self, cfg, guidance, ramp, num_steps):
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

    def test_cfg_velocity_combines_the_halves_inside_the_guidance_interval(self):
        # cfg_velocity with a head whose velocity is known (the semantics' first C channels):
        # v_u + w (v_c - v_u) while t <= guidance and w != 1, the conditional v_c otherwise;
        # both halves evaluated at the same (conditional) state x
        head = _RecordingHead(_SemanticsHead(4))
        x, s_hat, pos = torch.randn(2, 3, 4), torch.randn(4, 3, 8), torch.zeros(3, 2)
        v_c, v_u = s_hat[:2, :, :4], s_hat[2:, :, :4]
        v = flowar.cfg_velocity(head, x, 0.4, s_hat, pos, 3.0, 0.5)
        assert torch.allclose(v, v_u + 3.0 * (v_c - v_u), atol=1e-6)
        assert torch.equal(head.calls[-1][1], torch.cat([x, x])) and head.calls[-1][0] == pytest.approx(0.4)
        for t, w in ((0.6, 3.0), (0.4, 1.0)):                       # outside the interval; weight 1
            assert torch.equal(flowar.cfg_velocity(head, x, t, s_hat, pos, w, 0.5), v_c)
            assert head.calls[-1][1].shape[0] == 2                   # the conditional half only
        assert torch.equal(flowar.cfg_velocity(head, x, 0.4, s_hat[:2], pos, 3.0, 0.5), v_c)  # no CFG batch

    def test_cfg_one_is_the_conditional_sample_and_guidance_outside_interval_is_off(self):
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

    def test_guided_steps_evaluate_both_halves_at_the_conditional_state(self):
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

    def test_unconditional_sampling_and_bad_labels(self):
        model = tiny_model()
        z = model.sample(None, batch_size=2, num_steps=4, generator=torch.Generator().manual_seed(0))
        assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()
        with pytest.raises(ValueError, match='one per scale'):
            model.sample(torch.tensor([1]), num_steps=[50, 8])          # 2 grids for 4 scales
        with pytest.raises(ValueError, match='class ids'):
            model.sample(torch.tensor([11]), num_steps=4)
        with pytest.raises(ValueError, match='labels'):
            model.sample(None, batch_size=2, cfg=2.0)

    def test_sample_restores_the_training_mode_even_after_an_error(self):
        model = FlowAR.from_preset('toy', ar_dim=64, enc_depth=1, dec_depth=1, ar_heads=2, head_depth=1, head_width=64)
        model.train()
        model.sample(torch.tensor([1]), num_steps=4)
        assert model.training
        with pytest.raises(ValueError, match='class ids'):
            model.sample(torch.tensor([99]), num_steps=4)      # fails inside, after eval()
        assert model.training


class TestFlexibleScales:
    """Beyond the paper (FlexVAR on FlowAR): scale-free position embeddings, any scale list,
    and the known region of zero-shot editing (FlowAR.sample's `known`)."""

    def test_learned_embeddings_keep_the_released_layout_and_refuse_other_lists(self):
        model = tiny_model()
        assert model.config['pos_embed'] == 'learned' and model.encoder_pos_embed_learned.shape == (1, 85, 64)
        hw, sl, mask, pos = model.layout(None)
        assert hw == model.scales and mask is model.attn_mask and pos is model.positions
        assert model.layout([1, 2, 4, 8])[2] is model.attn_mask           # its own list, spelled out
        with pytest.raises(ValueError, match='scale-free'):
            model.sample(torch.tensor([1]), num_steps=4, scales=[1, 8])
        with pytest.raises(ValueError, match='pos_embed'):
            tiny_model(pos_embed='absolute')

    def test_scale_free_embeddings_are_one_table_resized_to_every_scale(self):
        model = tiny_model(pos_embed='scale-free')
        table = model.encoder_pos_embed_learned
        assert table.shape == (1, 64, 64)                                 # the 8x8 grid, D = 64
        grid = flowar.map_from_tokens(table, (8, 8))                      # (1, D, 8, 8)
        enc = model.pos_embeds(flowar.normalize_scales([1, 3, 8]))[0]     # (1, 1 + 9 + 64, D)
        assert enc.shape == (1, 74, 64)
        assert torch.allclose(enc[0, 0], table[0].mean(0), atol=1e-6)     # 1x1: the mean of the table
        assert torch.allclose(enc[:, 1:10], flowar.tokens_from_map(F.interpolate(grid, size=(3, 3), mode='area')))
        assert torch.equal(enc[:, 10:], table)                            # the full grid: the table
        hw, sl, mask, pos = model.layout([1, 3, 8])
        assert torch.equal(mask, flowar.block_causal_mask([1, 3, 8]))
        assert torch.equal(pos[1:4], torch.tensor([[0, 0], [0, 8 / 3], [0, 16 / 3]]))
        with pytest.raises(ValueError, match='latent size'):
            model.layout([1, 2, 4])

    @pytest.mark.parametrize('scales', [[1, 8], [1, 3, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    def test_scale_free_model_samples_and_trains_on_any_list(self, scales):
        model = tiny_model(pos_embed='scale-free')
        labels = torch.tensor([0, 5])
        z, info = model.sample(labels, num_steps=4, cfg=2.0, generator=torch.Generator().manual_seed(0),
                               return_details=True, scales=scales)
        assert z.shape == (2, 4, 8, 8) and [m.shape[-1] for m in info['maps']] == scales
        full = model.semantics(info['maps'], labels)                    # KV cache = masked pass
        for sl, s_hat in zip(model.layout(scales)[1], info['semantics']):
            assert (full[:, sl] - s_hat).abs().max() <= 1e-5
        noise = [torch.randn(2, 4, s, s) for s in scales]                # the noise sets the list
        loss, per = model(z, labels, noise, torch.rand(2, len(scales)))
        assert torch.isfinite(loss) and per.shape == (len(scales),)
        with pytest.raises(ValueError, match='t of shape'):
            model(z, labels, noise, torch.rand(2, len(scales) + 1))

    def test_expansion_list_ends_beyond_the_latent(self):
        model = tiny_model(pos_embed='scale-free')
        z = model.sample(torch.tensor([1]), num_steps=4, scales=[1, 4, 8, 16], generator=torch.Generator().manual_seed(0))
        assert z.shape == (1, 4, 16, 16) and torch.isfinite(z).all()
        pos = model.layout([1, 8, 16])[3]
        assert pos[-1].tolist() == [7.5, 7.5]        # 16x16 positions between the trained 8x8 ones

    def test_known_region_is_the_ground_truth_and_unknown_is_plain_sampling(self):
        model = tiny_model()
        torch.manual_seed(4)
        y = torch.tensor([2, 3])
        gt = flowar.build_scale_pyramid(torch.randn(2, 4, 8, 8), model.scales)
        run = lambda masks, inside=True: model.sample(
            y, num_steps=6, cfg=2.0, generator=torch.Generator().manual_seed(1), return_details=True,
            known=(gt, masks), known_inside=inside)[1]['maps']
        plain = model.sample(y, num_steps=6, cfg=2.0, generator=torch.Generator().manual_seed(1))
        assert torch.equal(run([None] * 4)[-1], plain)                       # nothing known
        assert all(torch.equal(a, b) for a, b in zip(run([torch.ones(1, 1, s, s) for s in (1, 2, 4, 8)]), gt))
        m = torch.zeros(1, 1, 8, 8)
        m[..., :, :4] = 1.0                                                  # the left half known
        masks = [F.interpolate(m, size=(s, s), mode='area') for s in (1, 2, 4, 8)]
        assert masks[0].item() == 0.5                                        # soft at the coarse scale
        for inside in (True, False):
            maps = run(masks, inside)
            assert torch.allclose(maps[-1][..., :4], gt[-1][..., :4], atol=1e-6)
            assert not torch.allclose(maps[-1][..., 4:], gt[-1][..., 4:], atol=1e-2)
        with pytest.raises(ValueError, match='per scale'):
            model.sample(y, num_steps=4, known=(gt[:2], masks[:2]))

    def test_inside_the_integration_the_head_sees_the_known_region_on_its_path(self):
        # known_inside: at step time t the head's input in the known region is (1 - t) s_gt + t eps,
        # with eps the state at t = 1 (the scale's noise); between scales only it is the Euler state
        model = tiny_model()
        torch.manual_seed(5)
        gt = flowar.build_scale_pyramid(torch.randn(1, 4, 8, 8), model.scales)
        masks = [None, None, None, torch.ones(1, 1, 8, 8)]
        masks[3][..., 4:, :] = 0.0                                           # rows 0-3 known
        known_tok = flowar.tokens_from_map(masks[3])[0, :, 0] > 0.5          # (64,)
        gt_tok = flowar.tokens_from_map(gt[3])[0]
        for inside in (True, False):
            model.flownet = _RecordingHead(model.flownet.head if inside is False else model.flownet)
            model.sample(torch.tensor([1]), num_steps=6, known=(gt, masks), known_inside=inside,
                         generator=torch.Generator().manual_seed(0))
            calls = model.flownet.calls[-6:]                       # the 8x8 scale's 6 Euler steps
            eps = calls[0][1][0].double()                                     # t = 1: the noise
            assert calls[0][0] == 1.0
            t, x = calls[2]
            on_path = (1 - t) * gt_tok.double() + t * eps
            close = torch.allclose(x[0].double()[known_tok], on_path[known_tok], atol=1e-5)
            assert close == inside

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


class TestReleasedCheckpoints:
    """Presets vs the released S / L / H checkpoints (reference/), the B size, strict loading."""

    @pytest.mark.parametrize('preset,ref,count', [('S', 'small', 171_718_072), ('L', 'large', 586_862_912),
                                                  ('H', 'huge', 1_913_316_880)])
    def test_presets_match_the_released_models(self, preset, ref, count):
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

    def test_b_preset_is_the_papers_300m_size(self):
        with torch.device('meta'):
            model = FlowAR.from_preset('B')
        assert 290e6 < sum(p.numel() for p in model.parameters()) < 320e6

    def test_released_small_state_dict_loads_strictly_and_wrong_shapes_are_named(self):
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

    def test_unknown_preset_and_override_are_refused(self):
        with pytest.raises(ValueError, match='unknown FlowAR preset'):
            FlowAR.from_preset('XL')
        with pytest.raises(ValueError, match='unknown FlowAR config field'):
            FlowAR.from_preset('toy', depth=3)
