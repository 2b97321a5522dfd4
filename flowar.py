"""
FlowAR: scale-wise autoregressive image generation meets flow matching.
(Ren et al., ICML 2025, arXiv:2412.15205), in one file of plain PyTorch.

Read this file next to Section 3.2 of the paper. The pieces, top to bottom:

    Eq. 5   build_scale_pyramid      latent F -> token maps s^1..s^n (FlowAR.scale_maps)
    Eq. 6   upsample_to_next         Up(s^i), the input for scale i+1
            block_causal_mask, RoPE2D, Attention, ARBlock, FlowAR.transformer: the causal
                                     scale Transformer T (scale i sees scales <= i)
    Eq. 7/8 FlowAR.interpolate       interpolation F_t and velocity target V_t
    Eq. 9   FlowAR.forward           per-scale flow-matching loss
    Eq. 10  SpatialAdaLNBlock        Spatial-adaLN: six modulation tensors per *position*
            CrossAttnBlock, FlowHead the released L/H head block; the model FM(F_t, s-hat, t)
            euler_time_grid, FlowAR.sample, FlowAR.integrate, cfg_schedule, cfg_velocity:
                                     inference, per scale one AR step + Euler integration
    beyond  FlowAR.layout, pos_embeds any scale list at inference (pos_embed='scale-free', FlexVAR);
            FlowAR.sample(known=)    zero-shot editing (edit.py; docs/flexible.md)

The released code (Dec 2024) differs from the paper in a few places, each marked "RELEASED
vs PAPER" where it happens; this file follows the released code wherever the checkpoints
depend on it (sample.py loads them). The main one: the paper writes F_t = t * s + (1 - t) *
F_0 (t = 1 is data), the released x_t = (1 - t) * x + t * eps (t = 1 is noise): time reversed.

Shapes: B batch, L total tokens over all scales (341 for scales 1-2-4-8-16), N tokens of
one scale (h * w), C latent channels (16 for the MAR VAE), D width of the AR Transformer,
W width of the flow head (`head_width`; d = 64 is the width of one attention head).

Names, one per tensor in every file: `s_hat` the AR semantics s-hat (B, N, D), the output of
T; `c` their per-position projection to the head, cond_embed(s_hat), (B, N, W); `y_emb` the
class embedding (B, D), the adaLN condition of the AR blocks; `t_emb` the time embedding.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ==== Presets ===========================================================================
# S, L and H are the released factories (same parameter counts); B is the paper's ~300M size
# (no released weights); toy (1.9M parameters) is for CIFAR-10 latents (4 x 8 x 8) on 2 CPU
# cores: at its budget a small model that sees more images beats a bigger one (docs/toy.md).

_COMMON = dict(mlp_ratio=4.0, rope_theta=10000.0, grad_checkpointing=False,
               scale_weighting='tokens', init='released', pos_embed='learned')
_IMAGENET = dict(_COMMON, latent_channels=16, scales=(1, 2, 4, 8, 16), num_classes=1000,
                 attn_dropout=0.1, proj_dropout=0.1)

PRESETS = {
    # name: AR width D, AR depth (encoder + decoder stacks), AR heads, flow head depth and
    # width W, head block ('spatial' = Attn-MLP with Spatial-adaLN as in the paper; 'cross' =
    # Attn-CrossAttn-MLP of the released L and H). The toy's scales {1, 8} score best at its
    # budget (docs/toy.md, "Scale list").
    'toy': dict(_COMMON, latent_channels=4, scales=(1, 8), num_classes=10, attn_dropout=0.0,
                proj_dropout=0.0, ar_dim=128, enc_depth=2, dec_depth=2, ar_heads=2,
                head_depth=2, head_width=128, head_block='spatial'),
    'S': dict(_IMAGENET, ar_dim=768, enc_depth=6, dec_depth=6, ar_heads=12,
              head_depth=2, head_width=1024, head_block='spatial'),
    'B': dict(_IMAGENET, ar_dim=1024, enc_depth=6, dec_depth=6, ar_heads=16,
              head_depth=4, head_width=1024, head_block='spatial'),
    'L': dict(_IMAGENET, ar_dim=1024, enc_depth=8, dec_depth=8, ar_heads=16,
              head_depth=12, head_width=1024, head_block='cross', grad_checkpointing=True),
    'H': dict(_IMAGENET, ar_dim=1536, enc_depth=15, dec_depth=15, ar_heads=16,
              head_depth=12, head_width=1536, head_block='cross', grad_checkpointing=True),
}

# Sampling settings of the released evaluation scripts (cfg_ramp: CFG weight rising from 1 at
# the first scale to `cfg` at the last) and the toy's, tuned with metrics.py: the ramp to 6,
# 50 Euler steps on the 1x1 scale and 8 on the 8x8 map (docs/toy.md, "Sampling settings").
SAMPLING_DEFAULTS = {
    'toy': dict(num_steps=[50, 8], cfg=6.0, guidance=0.9, cfg_ramp=True),
    'S': dict(num_steps=25, cfg=4.3, guidance=0.9, cfg_ramp=True),
    'B': dict(num_steps=25, cfg=4.3, guidance=0.9, cfg_ramp=True),
    'L': dict(num_steps=25, cfg=2.4, guidance=0.9, cfg_ramp=True),
    'H': dict(num_steps=50, cfg=2.4, guidance=0.7, cfg_ramp=True),
}


def upgrade_config(config):
    """A FlowAR config read from a checkpoint -> today's field names (a copy). Checkpoints of
    older versions call the head width `head_dim` and may hold `class_dropout` (now train.py's
    --label-drop); mapped here, the one place that reads saved configs."""
    config = dict(config)
    config.pop('class_dropout', None)
    if 'head_dim' in config:
        config['head_width'] = config.pop('head_dim')
    return config


def normalize_scales(scales):
    """(1, 2, 4) or ((1, 1), (2, 3), ...) -> list of (h, w) pairs, checked increasing."""
    out = [(int(s), int(s)) if isinstance(s, (int, float)) else (int(s[0]), int(s[1])) for s in scales]
    if not out or min(min(hw) for hw in out) < 1:
        raise ValueError(f"need at least one scale, every size >= 1; got {scales!r}")
    if any(not (b[0] >= a[0] and b[1] >= a[1] and b != a) for a, b in zip(out, out[1:])):
        raise ValueError(f"scales must grow from one to the next, got {scales!r}")
    return out


# ==== Eq. 5: the scale pyramid, and the Up(.) of Eq. 6 ==================================

def build_scale_pyramid(latent, scales):
    """Eq. 5: S = {s^1, ..., s^n} = {Down(F, 2^(n-1)), ..., Down(F, 1)}: every scale is an
    area downsampling of the *full* latent F (not a residual as in VAR). Any increasing list
    of sizes works, e.g. FlexVAR's (1, 2, 3, 4, 6, 8) ('area' = adaptive average pooling).
    latent: (B, C, H, W); scales: (h, w) pairs ending at (H, W) -> n x (B, C, h_i, w_i)."""
    scales = normalize_scales(scales)
    if tuple(latent.shape[-2:]) != scales[-1]:
        raise ValueError(f"latent is {tuple(latent.shape[-2:])} but the last scale is "
                         f"{scales[-1]}: the scale list must end at the latent size")
    return [latent if hw == scales[-1] else F.interpolate(latent, size=hw, mode='area')
            for hw in scales]


def upsample_to_next(s, full_hw, next_hw):
    """Up(s^i, 2) of Eq. 6: bicubic to the full latent size, then area down to scale i+1.
    RELEASED vs PAPER: the paper upsamples 2x directly; the released code goes through the
    full size (the authors say both work the same). We follow the checkpoints' code.
    s: (B, C, h_i, w_i) -> (B, C, h_{i+1}, w_{i+1})."""
    x = F.interpolate(s, size=full_hw, mode='bicubic', align_corners=False)
    return F.interpolate(x, size=next_hw, mode='area')


def scale_slices(scales):
    """Where each scale's tokens sit in the flattened sequence: list of slice objects."""
    sizes = [h * w for h, w in normalize_scales(scales)]   # scale i: h_i * w_i tokens, after scales < i
    return [slice(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]


def block_causal_mask(scales):
    """(L, L) bool, True = may attend. A token of scale i sees every token of scales <= i
    (bidirectional inside its own scale, causal across scales)."""
    scale_id = torch.cat([torch.full((h * w,), i) for i, (h, w) in enumerate(normalize_scales(scales))])
    return scale_id[None, :] <= scale_id[:, None]  # (L, L): row = query, column = key


def token_positions(scales, grid=None):
    """(L, 2) float (row, col) of every token, each scale mapped onto the finest grid (H, W)
    (default: the last scale; a scale-free model passes its training latent size, so that a
    larger last scale gets positions between the trained ones): a scale of height h has rows
    arange(h) / h * H. The 2D RoPE's positions (released: arange(s) / s * 16)."""
    scales = normalize_scales(scales)
    (H, W), pos = (scales[-1] if grid is None else tuple(grid)), []
    for h, w in scales:                                     # raster (row-major) order
        rows = torch.arange(h, dtype=torch.float64) / h * H
        cols = torch.arange(w, dtype=torch.float64) / w * W
        pos.append(torch.stack(torch.meshgrid(rows, cols, indexing='ij'), dim=-1).reshape(-1, 2))
    return torch.cat(pos).float()


def tokens_from_map(x):
    """(B, C, h, w) -> (B, h * w, C), raster order."""
    return x.flatten(2).transpose(1, 2)


def map_from_tokens(x, hw):
    """(B, h * w, C) -> (B, C, h, w)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], hw[0], hw[1])


# ==== Building blocks shared by the AR Transformer and the flow head ====================

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps), optionally times a learned weight. Computed in fp32."""

    def __init__(self, dim, weight=False, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, (nn.Parameter(torch.ones(dim)) if weight else None)

    def forward(self, x):
        y = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x)  # torch's fused kernel
        return y if self.weight is None else y * self.weight


class RoPE2D(nn.Module):
    """2D rotary position embedding (axial, as in EVA/FlowAR): the first half of the head
    dim d is rotated by the row, the second by the column, in interleaved pairs (0, 1), (2, 3),
    ... (released layout) with frequencies theta^(-2j / (d/2)), j < d/4 (`freqs`, 16 for d = 64)."""

    def __init__(self, head_dim, theta=10000.0):
        super().__init__()
        assert head_dim % 4 == 0, "2D RoPE needs a head dim divisible by 4"
        half = head_dim // 2
        freqs = 1.0 / theta ** (torch.arange(0, half, 2).float() / half)  # (d/4,)
        # a constant, not saved; the released checkpoints hold it, sample.py checks their copy
        self.register_buffer('freqs', freqs, persistent=False)

    def forward(self, x, pos):
        """x: (B, heads, N, d); pos: (N, 2) -> rotated x. A pair (x_2j, x_2j+1) rotated by a is
        (x_2j + i x_2j+1) * e^{ia}: one complex product (= x * cos + rotate_half(x) * sin)."""
        ang = torch.cat([pos[:, 0:1] * self.freqs, pos[:, 1:2] * self.freqs], -1)  # (N, d/2) pair angles
        rot = torch.polar(torch.ones_like(ang), ang)                                  # (N, d/2) e^{i ang}
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))              # (B, heads, N, d/2)
        return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)


def attention(q, k, v, mask=None, dropout_p=0.0):
    """softmax(q k^T / sqrt(d), masked) v for (B, h, N, d) queries; mask: bool, True = may
    attend. On a CPU the plain products, faster there than torch's fused kernel, whose
    backward is slow on a CPU (docs/speed.md); elsewhere the fused kernel."""
    if q.device.type != 'cpu':
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])                  # (B, h, N, M)
    s = s if mask is None else s.masked_fill(~mask, float('-inf'))
    return F.dropout(s.float().softmax(-1), dropout_p).to(v.dtype) @ v    # (B, h, N, d)


class Attention(nn.Module):
    """Multi-head self-attention with 2D RoPE, an optional mask and an optional KV cache (a
    dict per layer, sampling): the current scale's keys/values are appended to the earlier
    scales' and the queries attend to all of them, which is what the block-causal mask allows."""

    def __init__(self, dim, heads, qkv_bias, attn_dropout=0.0, proj_dropout=0.0, rope_theta=1e4):
        super().__init__()
        assert dim % heads == 0
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout, self.proj_drop = attn_dropout, nn.Dropout(proj_dropout)
        self.rope = RoPE2D(self.head_dim, rope_theta)

    def forward(self, x, pos, mask=None, cache=None):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d)
        q, k = self.rope(q, pos), self.rope(k, pos)
        if cache is not None:  # sampling: prepend the keys/values of all earlier scales
            if 'k' in cache:
                k, v = torch.cat([cache['k'], k], dim=2), torch.cat([cache['v'], v], dim=2)
            cache['k'], cache['v'] = k, v
        out = attention(q, k, v, mask, self.attn_dropout if self.training else 0.0)  # (B, h, N, d)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))


class CrossAttention(nn.Module):
    """Cross-attention of the released Attn-CrossAttn-MLP head block: queries from the
    head's tokens, keys/values from the AR semantics of the same scale (same length N,
    same positions, so the same RoPE is applied to queries and keys)."""

    def __init__(self, dim, cond_dim, heads, rope_theta=1e4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(cond_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.rope = RoPE2D(self.head_dim, rope_theta)

    def forward(self, x, s_hat, pos):
        # x: (B, N, W) head tokens; s_hat: (B, N, D) semantics of the same scale
        B, N, W = x.shape
        q = self.q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        k, v = self.kv(s_hat).view(B, N, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rope(q, pos), self.rope(k, pos)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, W))


class GatedMLP(nn.Module):
    """The gated MLP (timm's SwiGLU layer with a GELU gate, as released):
    fc2(GELU(fc1_g(x)) * fc1_x(x)), hidden = int(dim * mlp_ratio * 2 / 3)."""

    def __init__(self, dim, mlp_ratio=4.0, dropout=0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio * 2 / 3)
        self.fc1_g, self.fc1_x = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1_g(x)) * self.fc1_x(x))))


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift. Names used in every block below, as in the paper's
    Eq. 10: gamma = scale, beta = shift, alpha = the gate that multiplies the branch."""
    return torch.addcmul(shift, x, 1 + scale)  # = x * (1 + scale) + shift, in one pass


# ==== Eq. 6: the causal scale Transformer T =============================================

class ARBlock(nn.Module):
    """A block of the AR Transformer: pre-norm attention + gated MLP with adaLN from the
    class embedding (one set of six modulation vectors per sample, broadcast over tokens):
        x = x + alpha1 * Attn(RMSNorm(x) * (1 + gamma1) + beta1)
        x = x + alpha2 * MLP(RMSNorm(x) * (1 + gamma2) + beta2)
    """

    def __init__(self, dim, heads, mlp_ratio, attn_dropout, proj_dropout, rope_theta):
        super().__init__()
        self.norm1 = RMSNorm(dim)  # no affine weight: adaLN provides scale and shift
        self.attn = Attention(dim, heads, qkv_bias=True, attn_dropout=attn_dropout,
                              proj_dropout=proj_dropout, rope_theta=rope_theta)
        self.norm2 = RMSNorm(dim)
        self.mlp = GatedMLP(dim, mlp_ratio, proj_dropout)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, y_emb, pos, mask=None, cache=None):
        # x: (B, N, D); y_emb: (B, D) class embedding
        alpha1, alpha2, gamma1, gamma2, beta1, beta2 = self.ada_lin(y_emb)[:, None].chunk(6, dim=-1)  # 6 x (B, 1, D)
        x = x + self.attn(modulate(self.norm1(x), beta1, gamma1), pos, mask, cache) * alpha1
        return x + self.mlp(modulate(self.norm2(x), beta2, gamma2)) * alpha2


# ==== Eq. 7-10: the flow-matching head FM(F_t, s-hat, t) with Spatial-adaLN =============

def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding [cos, sin] of (integer) time steps t: (B,) -> (B, dim)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    args = t[:, None].float() * freqs[None]                                  # (B, dim / 2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, W). RELEASED vs PAPER: the paper treats t as continuous; the
    released code embeds the integer step int(t * 1000) (truncated), which we follow."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(timestep_embedding((t * 1000).long(), self.freq_dim))


class SpatialAdaLNBlock(nn.Module):
    """Eq. 10, the paper's head block (used by FlowAR-S), in the paper's symbols
    (alpha = gate, gamma = scale, beta = shift):

        alpha1, alpha2, gamma1, gamma2, beta1, beta2 = MLP(s-hat^i + t)   (per position!)
        F'  = F  + Attn(LN(F)  * (1 + gamma1) + beta1) * alpha1
        F'' = F' + MLP (LN(F') * (1 + gamma2) + beta2) * alpha2

    Unlike adaLN, `c` (the projected semantics) has one vector per token, so every modulation
    tensor is (B, N, W): the semantics steer each position separately. RELEASED vs PAPER (we
    follow the released code): (1) the paper writes gamma * LN(F), the released LN(F) * (1 +
    gamma); (2) the paper's Eq. 10 has no residuals, the released block adds them ("F +");
    (3) LN is an RMSNorm without weight. The MLP's output order is the released one above.
    """

    def __init__(self, width, heads, mlp_ratio=4.0, rope_theta=1e4):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = Attention(width, heads, qkv_bias=False, rope_theta=rope_theta)
        self.norm2 = RMSNorm(width)
        self.mlp = GatedMLP(width, mlp_ratio)
        self.ada_lin = nn.Linear(width, 6 * width)

    def modulation(self, t_emb, c):
        """t_emb: (B, 1, W), c: (B, N, W) -> six (B, N, W) tensors (Eq. 10, first line)."""
        return self.ada_lin(F.silu(t_emb + c)).chunk(6, dim=-1)

    def forward(self, x, t_emb, c, pos):
        # x: (B, N, W) tokens of one scale; c: (B, N, W) projected semantics s-hat^i
        alpha1, alpha2, gamma1, gamma2, beta1, beta2 = self.modulation(t_emb, c)     # 6 x (B, N, W)
        x = x + self.attn(modulate(self.norm1(x), beta1, gamma1), pos) * alpha1      # Eq. 10, line 2
        return x + self.mlp(modulate(self.norm2(x), beta2, gamma2)) * alpha2         # Eq. 10, line 3


class CrossAttnBlock(nn.Module):
    """The released Attn-CrossAttn-MLP head block (FlowAR-L and -H; not in the paper's
    text, the authors' README says both blocks perform alike):

        x = x + alpha1 * Attn(RMSNorm(x) * (1 + gamma1) + beta1)       (alpha1.. from t only)
        x = x + CrossAttn(RMSNorm_w(x), RMSNorm_w(s-hat))               (no gate)
        x = x + alpha2 * MLP(RMSNorm(x) * (1 + gamma2) + beta2)        (per position, from c + t)
    """

    def __init__(self, width, cond_dim, heads, mlp_ratio=4.0, rope_theta=1e4):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = Attention(width, heads, qkv_bias=False, rope_theta=rope_theta)
        self.crossattn = CrossAttention(width, cond_dim, heads, rope_theta)
        self.norm2_1 = RMSNorm(width, weight=True)
        self.norm2_2 = RMSNorm(cond_dim, weight=True)
        self.norm3 = RMSNorm(width)
        self.mlp = GatedMLP(width, mlp_ratio)
        self.ada_lin_attn = nn.Linear(width, 3 * width)
        self.ada_lin_mlp = nn.Linear(width, 3 * width)

    def forward(self, x, t_emb, c, pos, s_hat):
        # x: (B, N, W); c: (B, N, W) projected semantics; s_hat: (B, N, D) the semantics themselves
        alpha1, gamma1, beta1 = self.ada_lin_attn(F.silu(t_emb)).chunk(3, dim=-1)     # 3 x (B, 1, W)
        alpha2, gamma2, beta2 = self.ada_lin_mlp(F.silu(c + t_emb)).chunk(3, dim=-1)   # 3 x (B, N, W)
        x = x + self.attn(modulate(self.norm1(x), beta1, gamma1), pos) * alpha1
        x = x + self.crossattn(self.norm2_1(x), self.norm2_2(s_hat), pos)
        return x + self.mlp(modulate(self.norm3(x), beta2, gamma2)) * alpha2


class FinalLayer(nn.Module):
    """Per-position adaLN (shift, scale from c + t) then Linear(W -> C)."""

    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = RMSNorm(width)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class FlowHead(nn.Module):
    """FM(F_t^i, s-hat^i, t): a small Transformer over the N tokens of *one* scale that
    predicts the velocity of every token, conditioned position by position on the AR
    semantics s-hat^i (same length N as the tokens: the paper's point in Sec. 3.2)."""

    def __init__(self, in_channels, width, depth, cond_dim, block='spatial', mlp_ratio=4.0, rope_theta=1e4):
        super().__init__()
        heads = width // 64  # released: head dim 64
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)    # per-position Linear(D -> W) of s-hat
        self.input_proj = nn.Linear(in_channels, width)
        if block == 'spatial':
            blocks = [SpatialAdaLNBlock(width, heads, mlp_ratio, rope_theta) for _ in range(depth)]
        elif block == 'cross':
            blocks = [CrossAttnBlock(width, cond_dim, heads, mlp_ratio, rope_theta) for _ in range(depth)]
        else:
            raise ValueError(f"head_block must be 'spatial' or 'cross', got {block!r}")
        self.res_blocks = nn.ModuleList(blocks)
        self.cross = block == 'cross'  # the cross block also attends to s-hat itself
        self.final_layer = FinalLayer(width, in_channels)

    def forward(self, x, t, s_hat, pos):
        """x: (B, N, C) noisy tokens F_t; t: (B,) in [0, 1]; s_hat: (B, N, D) semantics;
        pos: (N, 2) RoPE coordinates -> predicted velocity (B, N, C)."""
        x = self.input_proj(x)                    # (B, N, W)
        t_emb = self.time_embed(t)[:, None]       # (B, 1, W)
        c = self.cond_embed(s_hat)                # (B, N, W)
        for block in self.res_blocks:
            x = block(x, t_emb, c, pos, s_hat) if self.cross else block(x, t_emb, c, pos)
        return self.final_layer(x, c + t_emb)     # (B, N, C)


# ==== Sampling helpers: the time grid, the Euler integrator, the CFG schedule ===========

def euler_time_grid(num_steps, dtype=torch.float64, device=None):
    """The released time grid from t = 1 (noise) to t = 0 (data). 50: linspace(1, 0, 51);
    any other n: linspace(1, 0.3, n // 2) then linspace(0.25, 0, n // 2 + 1), coarse early
    steps and fine late ones (n = 25: 25 points, i.e. 24 Euler steps, as released)."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if num_steps == 50:
        return torch.linspace(1, 0, num_steps + 1, dtype=dtype, device=device)
    n = num_steps // 2
    return torch.cat([torch.linspace(1, 0.3, n, dtype=dtype, device=device),
                      torch.linspace(0.25, 0, n + 1, dtype=dtype, device=device)])


def cfg_schedule(num_scales, cfg, ramp=True):
    """CFG weight per scale, rising linearly from 1 at the first scale to `cfg` at the last
    (ramp=True, released; the paper does not describe it), or `cfg` at every scale
    (ramp=False, an option of this code; docs/toy.md, "Sampling settings")."""
    if not ramp or num_scales == 1:
        return [float(cfg)] * num_scales
    return [1.0 + (cfg - 1.0) * i / (num_scales - 1) for i in range(num_scales)]


def cfg_velocity(head, x, t, s_hat, pos, w, guidance):
    """The head's velocity at the state x (B, N, C) and time t (a float), with classifier-free
    guidance: v = v_u + w * (v_c - v_u) while t <= guidance (the released guidance interval)
    and w != 1, else the conditional v_c alone. s_hat: (2B, N, D), the conditional semantics
    then the unconditional ones (or (B, N, D) without CFG); w: this scale's weight
    (cfg_schedule). RELEASED: a guided step runs the head on [x; x], both halves at the
    conditional state; an unguided step runs the conditional half only (released: both,
    the unconditional one then unused)."""
    B = x.shape[0]
    if s_hat.shape[0] == 2 * B and w != 1.0 and t <= guidance:               # the guidance interval
        tb = torch.full((2 * B,), t, device=x.device, dtype=x.dtype)
        v_c, v_u = head(torch.cat([x, x]), tb, s_hat, pos).chunk(2)          # (B, N, C) each
        return v_u + w * (v_c - v_u)                                          # CFG combination
    return head(x, torch.full((B,), t, device=x.device, dtype=x.dtype), s_hat[:B], pos)


# ==== The model =========================================================================

class FlowAR(nn.Module):
    """Causal scale Transformer (Eq. 6) + flow-matching head (Eq. 7-10). Attribute names are
    the released state-dict keys, so the released checkpoints load with an identity mapping."""

    def __init__(self, latent_channels=16, scales=(1, 2, 4, 8, 16), num_classes=1000,
                 ar_dim=768, enc_depth=6, dec_depth=6, ar_heads=12,
                 head_depth=2, head_width=1024, head_block='spatial', mlp_ratio=4.0,
                 attn_dropout=0.1, proj_dropout=0.1, rope_theta=10000.0,
                 grad_checkpointing=False, scale_weighting='tokens', init='released',
                 pos_embed='learned'):
        super().__init__()
        scales_hw = normalize_scales(scales)
        if pos_embed not in ('learned', 'scale-free'):
            raise ValueError(f"pos_embed must be 'learned' (released) or 'scale-free', got {pos_embed!r}")
        if scale_weighting not in ('tokens', 'uniform'):
            raise ValueError(f"scale_weighting must be 'tokens' (released) or 'uniform', got {scale_weighting!r}")
        if init not in ('released', 'adaln-zero'):
            raise ValueError(f"init must be 'released' or 'adaln-zero', got {init!r}")
        if head_width % 64:
            raise ValueError(f"head_width must be a multiple of 64 (64 per attention head), got {head_width}")
        if ar_dim % ar_heads or (ar_dim // ar_heads) % 4:
            raise ValueError(f"ar_dim {ar_dim} / ar_heads {ar_heads} must give a head dim divisible by 4")
        # A plain dict of python values: goes into checkpoints (weights_only-safe).
        self.config = dict(latent_channels=latent_channels, scales=[list(s) for s in scales_hw],
                           num_classes=num_classes, ar_dim=ar_dim, enc_depth=enc_depth, dec_depth=dec_depth,
                           ar_heads=ar_heads, head_depth=head_depth, head_width=head_width, head_block=head_block,
                           mlp_ratio=mlp_ratio, attn_dropout=attn_dropout, proj_dropout=proj_dropout,
                           rope_theta=rope_theta, grad_checkpointing=grad_checkpointing,
                           scale_weighting=scale_weighting, init=init, pos_embed=pos_embed)
        self.scales, self.slices = scales_hw, scale_slices(scales_hw)
        self.latent_channels, self.num_classes = latent_channels, num_classes
        self.grad_checkpointing, self.scale_weighting = grad_checkpointing, scale_weighting
        self.pos_embed = pos_embed
        L = self.seq_len = self.slices[-1].stop  # 341 for 1-2-4-8-16
        D = ar_dim

        # Class embedding C; row `num_classes` is the null class used for CFG.
        self.class_emb = nn.Embedding(num_classes + 1, D)
        # Input projection of the upsampled latent tokens, then RMSNorm (with weight).
        self.z_proj = nn.Linear(latent_channels, D)
        self.z_proj_ln = RMSNorm(D, weight=True)
        # Three learned absolute position embeddings, plus RoPE in attention. 'learned'
        # (released): one vector per token of the training scale list, (1, L, D), so that list
        # is fixed. 'scale-free' (FlexVAR's way, not released): one table on the finest grid,
        # (1, H * W, D), resized to every scale of whatever list is in use (pos_embeds).
        P = L if pos_embed == 'learned' else scales_hw[-1][0] * scales_hw[-1][1]
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, P, D))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, P, D))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, P, D))
        # Two stacks with the same block-causal mask ("encoder" + "decoder", released).
        block = lambda: ARBlock(D, ar_heads, mlp_ratio, attn_dropout, proj_dropout, rope_theta)
        self.encoder_blocks = nn.ModuleList([block() for _ in range(enc_depth)])
        self.encoder_norm = RMSNorm(D, weight=True)
        self.decoder_embed = nn.Linear(D, D)
        self.decoder_blocks = nn.ModuleList([block() for _ in range(dec_depth)])
        self.decoder_norm = RMSNorm(D, weight=True)
        # The flow-matching head, shared by all scales.
        self.flownet = FlowHead(latent_channels, head_width, head_depth, D, head_block, mlp_ratio, rope_theta)

        self.register_buffer('attn_mask', block_causal_mask(scales_hw), persistent=False)  # (L, L)
        self.register_buffer('positions', token_positions(scales_hw), persistent=False)    # (L, 2)
        self.initialize_weights(init)

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown FlowAR preset {name!r}; choose one of {sorted(PRESETS)}")
        cfg = PRESETS[name]
        if set(overrides) - set(cfg):
            raise ValueError(f"unknown FlowAR config field(s) {sorted(set(overrides) - set(cfg))}; "
                             f"valid: {sorted(cfg)}")
        return cls(**dict(cfg, **overrides))

    def initialize_weights(self, init='released'):
        """Released: every Linear xavier-uniform with zero bias (gates and the head's output
        included: nothing starts at zero, unlike DiT), position and class embeddings N(0, 0.02).
        init='adaln-zero' (an option, not released): DiT's adaLN-Zero (Peebles & Xie 2023, Sec.
        3.2) on top: every adaLN modulation Linear and the head's output Linear start at zero,
        so every block starts as the identity and the head predicts v = 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                  self.diffusion_pos_embed_learned, self.class_emb.weight):
            nn.init.normal_(p, std=0.02)
        if init == 'adaln-zero':
            zero = [self.flownet.final_layer.linear, self.flownet.final_layer.adaLN_modulation[-1]]
            zero += [blk.ada_lin[-1] for blk in list(self.encoder_blocks) + list(self.decoder_blocks)]
            for blk in self.flownet.res_blocks:
                zero += [blk.ada_lin] if hasattr(blk, 'ada_lin') else [blk.ada_lin_attn, blk.ada_lin_mlp]
            for m in zero:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- Any scale list: the sequence layout and the position embeddings ---------------

    def layout(self, scales=None):
        """The sequence of a scale list: (scales as (h, w) pairs, their slices, the block-causal
        mask (L, L), the RoPE positions (L, 2)). None: the training list (the buffers). Other
        lists need pos_embed='scale-free' and must end at the latent size or beyond (expansion)."""
        if scales is None or normalize_scales(scales) == self.scales:
            return self.scales, self.slices, self.attn_mask, self.positions
        hw, (H, W) = normalize_scales(scales), self.scales[-1]
        if self.pos_embed == 'learned':
            raise ValueError(f"this model's position embeddings are learned for its scale list "
                             f"{[list(s) for s in self.scales]} only; another list needs a model trained "
                             f"with pos_embed='scale-free' (train.py --preset cifar-toy-flex)")
        if hw[-1][0] < H or hw[-1][1] < W:
            raise ValueError(f"a scale list must end at the latent size {(H, W)} (or beyond, to expand "
                             f"the image), got {[list(s) for s in hw]}")
        dev = self.attn_mask.device
        return hw, scale_slices(hw), block_causal_mask(hw).to(dev), token_positions(hw, grid=(H, W)).to(dev)

    def pos_embeds(self, scales_hw):
        """The three position embeddings of the sequence of scales_hw, (1, L, D) each: the
        parameters themselves ('learned'), or the finest-grid tables area-resized to every
        scale ('scale-free'; bicubic for a scale larger than the grid, expansion)."""
        tables = (self.encoder_pos_embed_learned, self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned)
        if self.pos_embed == 'learned':
            return tables
        H, W = self.scales[-1]
        resize = lambda g, hw: g if hw == (H, W) else F.interpolate(
            g, size=hw, mode='area' if hw[0] <= H and hw[1] <= W else 'bicubic')
        return [torch.cat([tokens_from_map(resize(map_from_tokens(p, (H, W)), hw)) for hw in scales_hw], 1)
                for p in tables]

    # ---- Eq. 6: T([C, Up(s^1), ..., Up(s^{n-1})]) ------------------------------------

    def scale_input(self, i, labels, prev=None, scales=None):
        """The AR input of scale i, (B, N_i, D): the class token C over the N_1 positions of
        scale 1 (i = 0), else z_proj(Up(s^{i-1})) of the previous map prev (B, C, h, w).
        labels: (B,), num_classes = null; scales: the list in use (None: the training list).
        The one place that builds AR inputs (training, sampling)."""
        hw = self.scales if scales is None else normalize_scales(scales)
        if i == 0:
            return self.class_emb(labels)[:, None].expand(-1, hw[0][0] * hw[0][1], -1)
        up = upsample_to_next(prev, hw[-1], hw[i])                    # (B, C, h_i, w_i)
        return self.z_proj(tokens_from_map(up))

    def ar_input_tokens(self, maps, labels, scales=None):
        """[C, Up(s^1), ..., Up(s^m)], (B, L', D); maps: s^1..s^m (ground truth in training)."""
        return torch.cat([self.scale_input(i, labels, maps[i - 1] if i else None, scales)
                          for i in range(len(maps) + 1)], dim=1)

    def transformer(self, x, labels, start=0, caches=None, scales=None):
        """The causal scale Transformer T. x: (B, N, D) inputs of the positions [start, start +
        N) of the sequence of `scales` (None: the training list). Without caches: the whole
        prefix (start = 0) under the block-causal mask; with caches (a dict per block,
        sampling): just the next scale, attending to the cached keys.
        returns the semantics s-hat of those positions, (B, N, D)."""
        if caches is not None and start != (caches[0]['k'].shape[2] if 'k' in caches[0] else 0):
            raise ValueError(f"start={start} but the KV cache holds {caches[0]['k'].shape[2]} tokens")
        hw, _, attn_mask, positions = self.layout(scales)
        enc_pe, dec_pe, diff_pe = self.pos_embeds(hw)                 # (1, L, D) each
        idx = slice(start, start + x.shape[1])
        pos = positions[idx]
        mask = None if caches is not None else attn_mask[idx, idx]
        y_emb = self.class_emb(labels)  # (B, D): adaLN condition of every AR block
        blocks = list(self.encoder_blocks) + list(self.decoder_blocks)
        x = self.z_proj_ln(x + enc_pe[:, idx])
        for i, blk in enumerate(blocks):
            if i == len(self.encoder_blocks):  # between the two stacks
                x = self.decoder_embed(self.encoder_norm(x)) + dec_pe[:, idx]
            cache = None if caches is None else caches[i]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, y_emb, pos, mask, cache, use_reentrant=False)
            else:
                x = blk(x, y_emb, pos, mask, cache)
        return self.decoder_norm(x) + diff_pe[:, idx]  # s-hat

    def semantics(self, maps, labels):
        """Teacher-forced semantics T([C, Up(s^1), ..., Up(s^{n-1})]) of the n maps (their
        sizes are the scale list): (B, L, D)."""
        scales = [tuple(m.shape[-2:]) for m in maps]
        return self.transformer(self.ar_input_tokens(maps[:-1], labels, scales), labels, scales=scales)

    # ---- Eq. 5 and Eq. 7-8 as methods: the steps that ablations.py's variants replace ----

    def scale_maps(self, latents):
        """Eq. 5: the maps s^1..s^n of F (Table 3's image-pyramid variant takes the maps)."""
        return build_scale_pyramid(latents, self.scales)

    @staticmethod
    def interpolate(x, eps, t):
        """Eq. 7-8 for tokens x = s^i, noise eps = F_0^i, times t -> (x_t, regression target).
        RELEASED vs PAPER: the paper writes F_t = t * s + (1 - t) * F_0, velocity s - F_0; the
        released code uses t' = 1 - t: x_t = (1 - t) * s + t * eps, target d x_t / dt = eps - s,
        t = 1 is pure noise. We follow the released code (the checkpoints need it)."""
        return (1 - t) * x + t * eps, eps - x                          # Eq. 7, Eq. 8 (released sign)

    @staticmethod
    def integrate(velocity, x, ts):
        """Inference of Eq. 7-8: noise x (t = ts[0] = 1) to a token map (t = ts[-1] = 0) by
        Euler steps x <- x + (t_{j+1} - t_j) * velocity(x, t_j) on the decreasing grid ts;
        velocity(x, float t) is the head's (CFG-combined) one. x stays float64 (as released)."""
        x = x.double()
        for j in range(len(ts) - 1):
            t, t_next = float(ts[j]), float(ts[j + 1])
            x = x + (t_next - t) * velocity(x, t).double()
        return x

    # ---- Eq. 7-9: the training loss -----------------------------------------------------

    def forward(self, latents, labels, noise, t):
        """Flow-matching loss of Eq. 9 over all scales, with the released weights.
        latents: (B, C, H, W) scaled VAE latents (or what scale_maps takes); labels: (B,) in
        [0, num_classes] (null class = num_classes, already dropped for CFG); noise: F_0^i,
        n x (B, C, h_i, w_i), whose sizes are this step's scale list (the training list, or
        any list for a scale-free model); t: (B, n) in [0, 1]. Deterministic:
        train.sample_randomness draws the inputs (RELEASED: the authors' forward draws t, noise
        and the label drop itself; drawn outside, a run is the same for any split over GPUs
        and accumulation steps). returns (loss, per-scale losses (n,), unweighted and detached)."""
        hw, slices, _, positions = self.layout([tuple(z.shape[-2:]) for z in noise])
        B, n = labels.shape[0], len(hw)
        if tuple(t.shape) != (B, n):
            raise ValueError(f"need t of shape ({B}, {n}), one per scale of the noise maps' list "
                             f"{[list(s) for s in hw]}, got t {tuple(t.shape)}")
        # Eq. 5: n x (B, C, h_i, w_i)
        maps = self.scale_maps(latents) if hw == self.scales else build_scale_pyramid(latents, hw)
        s_hat = self.semantics(maps, labels)               # Eq. 6: (B, L, D)
        total, per_scale = 0.0, []
        H, W = hw[-1]
        for i, (s, sl) in enumerate(zip(maps, slices)):
            x = tokens_from_map(s)                                     # (B, N, C): s^i
            eps = tokens_from_map(noise[i])                             # F_0^i
            ti = t[:, i].to(x.dtype)[:, None, None]                    # (B, 1, 1)
            x_t, target = self.interpolate(x, eps, ti)                 # Eq. 7-8
            v = self.flownet(x_t, t[:, i], s_hat[:, sl], positions[sl])       # FM(F_t, s-hat^i, t)
            loss_i = ((v.float() - target.float()) ** 2).mean(dim=(1, 2)).mean()  # per sample, then batch
            # Eq. 9 sums the scales; RELEASED: weighted by the token share h_i * w_i / (H * W),
            # so the 1x1 scale does not dominate ('uniform': Eq. 9's plain sum, an option).
            weight = (s.shape[-2] * s.shape[-1]) / (H * W) if self.scale_weighting == 'tokens' else 1.0
            total = total + loss_i * weight
            per_scale.append(loss_i.detach())
        return total, torch.stack(per_scale)

    # ---- Inference ------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, labels=None, num_steps=25, cfg=1.0, guidance=1.0, generator=None,
               batch_size=None, return_details=False, cfg_ramp=True, scales=None, known=None,
               known_inside=True):
        """Generate latents scale by scale (Sec. 3.2, "Inference Pipeline"): per scale i one AR
        step (KV cache) gives s-hat^i, the head moves noise (t = 1) to the map s^i (t = 0) on
        the released time grid euler_time_grid(num_steps) (one int for every scale, as
        released, or a list with one per scale), Up(s^i) is the next input.
        labels: (B,) class ids, or None (the null class; needs batch_size, and cfg = 1).
        cfg: the CFG weight at the last scale, rising from 1 at the first (cfg_ramp=True,
        released), or at every scale (cfg_ramp=False); CFG applies only while t <= guidance.
        generator: a torch.Generator (reproducible noise). scales: the scale list (None: the
        training list; any other needs pos_embed='scale-free', see layout).
        known (zero-shot editing, FlexVAR's idea on FlowAR's ground-truth scales): (maps, masks),
        per scale of the list the ground truth s^i (B, C, h_i, w_i) and a mask (B or 1, 1, h_i,
        w_i) in [0, 1], 1 = known (a pixel mask area-downsampled is soft at coarse scales: a
        position is known in the share of its area that is; masks[i] = None: nothing known).
        After each scale the known region is forced to the ground truth, s^i <- m s^i_gt + (1 -
        m) s^i, so every later scale is conditioned on it (between scales); with known_inside
        also inside the integration: at each Euler step the head sees the known region on the
        ground truth's own straight path, x_t <- m ((1 - t) s^i_gt + t eps) + (1 - m) x_t, with
        the same eps as the generated region, so the two sides of the boundary are at the same
        noise level (between scales only, the head sees the known region as noise until t = 0).
        returns latents (B, C, H, W), scaled as in training; with return_details also
        {'maps': [s^i], 'semantics': [cond. s-hat^i (B, N_i, D)]}."""
        was_training = self.training
        self.eval()  # no dropout while sampling; the mode comes back even after an error
        try:
            return self._sample(labels, num_steps, cfg, guidance, generator, batch_size, return_details, cfg_ramp,
                                scales, known, known_inside)
        finally:
            self.train(was_training)

    def _sample(self, labels, num_steps, cfg, guidance, generator, batch_size, return_details, cfg_ramp,
                scales, known, known_inside):
        device = self.class_emb.weight.device
        dtype = self.class_emb.weight.dtype
        if labels is None:  # unconditional samples: the null class
            if batch_size is None or cfg != 1.0:
                raise ValueError("unconditional sampling (labels=None) needs batch_size, and "
                                 "cfg=1: classifier-free guidance needs class labels")
            labels = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        labels = labels.to(device)
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"class ids must be in [0, {self.num_classes}] "
                             f"({self.num_classes} = null class), got {labels.tolist()}")
        B = labels.shape[0]
        use_cfg = cfg != 1.0  # then the AR batch is [conditional; unconditional]
        labels_in = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if use_cfg else labels
        hws, slices, _, positions = self.layout(scales)
        n = len(hws)
        weights = cfg_schedule(n, cfg, cfg_ramp)
        steps = [num_steps] * n if isinstance(num_steps, int) else list(num_steps)
        if len(steps) != n:
            raise ValueError(f"num_steps: one int, or one per scale ({n}), got {num_steps}")
        if known is not None and (len(known[0]) != n or len(known[1]) != n):
            raise ValueError(f"known: a ground-truth map and a mask (or None) per scale ({n}), "
                             f"got {len(known[0])} maps and {len(known[1])} masks")
        caches = [dict() for _ in range(len(self.encoder_blocks) + len(self.decoder_blocks))]
        maps, sems = [], []
        gen_device = generator.device if generator is not None else device

        for i, (hw, sl) in enumerate(zip(hws, slices)):
            # AR step: C (i = 0) or Up(s^{i-1}) of the generated (conditional) map, both CFG halves
            prev = None if i == 0 else (torch.cat([maps[-1], maps[-1]]) if use_cfg else maps[-1]).to(dtype)
            x_in = self.scale_input(i, labels_in, prev, hws)                                   # (B', N_i, D)
            s_hat = self.transformer(x_in, labels_in, start=sl.start, caches=caches, scales=hws)  # (B', N_i, D)
            sems.append(s_hat[:B])
            pos, N = positions[sl], sl.stop - sl.start

            # Flow matching: Euler from noise (t = 1) to data (t = 0) with only the conditional
            # state x (B, N, C); cfg_velocity guides the steps inside the guidance interval.
            noise = torch.randn(B, N, self.latent_channels, generator=generator,
                                device=gen_device, dtype=torch.float64).to(device)
            m = None if known is None or known[1][i] is None else tokens_from_map(
                known[1][i].to(device, torch.float64).expand(B, 1, *hw))                     # (B, N, 1)
            if m is not None:                                                                   # editing
                gt = tokens_from_map(known[0][i].to(device, torch.float64))                     # (B, N, C)
                path = lambda t, gt=gt, eps=noise: (1 - t) * gt + t * eps   # released Eq. 7 at time t
                head_in = (lambda x, t, m=m, path=path: m * path(t) + (1 - m) * x) if known_inside else (lambda x, t: x)
            else:
                head_in = lambda x, t: x
            predict = lambda x, t, w=weights[i], f=head_in: cfg_velocity(
                self.flownet, f(x, t).to(dtype), t, s_hat, pos, w, guidance)
            x = self.integrate(predict, noise, euler_time_grid(steps[i], device=device))  # (B, N_i, C) fp64
            if m is not None:                          # the known region is the ground truth
                x = m * gt + (1 - m) * x
            maps.append(map_from_tokens(x.to(dtype), hw))

        return (maps[-1], dict(maps=maps, semantics=sems)) if return_details else maps[-1]
