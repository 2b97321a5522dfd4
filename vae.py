"""
The image tokenizer of FlowAR: a KL-regularised convolutional autoencoder (LDM "AutoencoderKL").

FlowAR does not learn its own tokenizer. It reuses the KL-16 VAE released with MAR:
a 256x256 image becomes a (16, 16, 16) latent, which is multiplied by 0.2325 (so that it
has roughly unit variance) before the autoregressive model sees it. This file holds:

  1. the network (Encoder, Decoder, ResnetBlock, AttnBlock, MidBlock, Downsample, Upsample,
     DiagonalGaussian posterior, AutoencoderKL). Parameter names equal the LDM / MAR names,
     so MAR's kl16.ckpt loads with no renaming;
  2. the checkpoint format of this project (save_vae / load_vae) plus a strict loader that
     names every missing key, unexpected key and shape mismatch;
  3. a small trainer for the 'cifar' preset (32x32 images -> (4, 8, 8) latents) that runs
     on a laptop CPU (with train.py's lr schedule and precision policy), with PSNR
     evaluation and a reconstruction grid, and a CLI:

     python vae.py --dataset cifar10 --data-dir data --out out/vae --device cpu

Only torch, numpy and pillow are used.
"""

import argparse
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data  # data.py: the CIFAR / shapes loaders, atomic_save, vae_fingerprint

# -----------------------------------------------------------------------------
# Presets. A config is a plain dict of ints / floats / bools / lists / strings, so it can be
# stored inside a checkpoint and read back with torch.load(weights_only=True).

PRESETS = {
    # MAR KL-16 (https://github.com/LTH14/mar, models/vae.py), used unchanged by FlowAR:
    # 256x256x3 -> 16x16x16 by four stride-2 downsamples (len(ch_mult) - 1). The encoder has
    # attention at the level whose input is 16x16 (`resolution` only serves to place it),
    # MAR's decoder only in its middle block; double_z: the encoder predicts mean and logvar.
    'kl16': dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16],
                 dec_attn_resolutions=[], z_channels=16, embed_dim=16, resolution=256,
                 in_channels=3, out_ch=3, double_z=True, norm_groups=32),
    # A small VAE for 32x32 images (CIFAR-10, shapes): 32x32x3 -> 8x8x4, the toy FlowAR's
    # input; 32 channels at 32x32, 64 at 16x16 and 8x8; 1.29M parameters. The toy's budget
    # for it is in train.py's preset; its losses and PSNR: docs/toy.md, "VAE".
    'cifar': dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[],
                  dec_attn_resolutions=[], z_channels=4, embed_dim=4, resolution=32,
                  in_channels=3, out_ch=3, double_z=True, norm_groups=32),
}

# 1 / std of MAR KL-16 posterior samples on ImageNet (no mean shift). The cifar preset
# measures its own factor at the end of training (train_vae).
PRESET_SCALE_FACTORS = {'kl16': 0.2325}


# -----------------------------------------------------------------------------
# Building blocks (LDM, "taming transformers" lineage).

def Normalize(channels, groups):
    # GroupNorm with eps 1e-6 and affine weights, as in LDM; groups = 32 for kl16
    if channels % groups != 0:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible by "
                         f"norm_groups={groups}; change 'ch' or 'norm_groups' in the VAE config")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


swish = F.silu      # swish(x) = x * sigmoid(x), a.k.a. SiLU


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> conv3x3, plus a (1x1 conv) shortcut."""

    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1 = Normalize(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, stride=1, padding=1)
        # LDM calls the 1x1 projection of the skip path "nin_shortcut" (network-in-network);
        # it only exists when the channel count changes. (LDM's dropout is 0 and its
        # time-embedding projection is absent in the VAE, so neither appears here.)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):                       # x: (B, Cin, H, W)
        h = self.conv1(swish(self.norm1(x)))    # (B, Cout, H, W)
        h = self.conv2(swish(self.norm2(h)))    # (B, Cout, H, W)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)            # (B, Cout, H, W)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, q/k/v/out as 1x1 convolutions."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):                                   # x: (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head, H*W tokens of width C
        q = self.q(h).reshape(B, 1, C, H * W).transpose(2, 3)
        k = self.k(h).reshape(B, 1, C, H * W).transpose(2, 3)
        v = self.v(h).reshape(B, 1, C, H * W).transpose(2, 3)
        # softmax(q k^T / sqrt(C)) v, the LDM scaling
        h = F.scaled_dot_product_attention(q, k, v)         # (B, 1, H*W, C)
        h = h.transpose(2, 3).reshape(B, C, H, W)            # (B, C, H, W)
        return x + self.proj_out(h)


class MidBlock(nn.Module):
    """The middle of the encoder and of the decoder, at the lowest resolution:
    res block -> attention -> res block, with the channel count unchanged."""

    def __init__(self, channels, groups):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):                                    # (B, C, h, w) -> same
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    """Halve H and W: pad one pixel on the right and bottom, then 3x3 conv with stride 2."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):                                    # (B, C, H, W)
        x = F.pad(x, (0, 1, 0, 1), mode='constant', value=0)  # (B, C, H+1, W+1)
        return self.conv(x)                                  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):                                         # (B, C, H, W)
        x = F.interpolate(x, scale_factor=2.0, mode='nearest')    # (B, C, 2H, 2W)
        return self.conv(x)


# -----------------------------------------------------------------------------
# Encoder / decoder

class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2*z_channels, H/f, W/f) with f = 2^(len(ch_mult)-1)."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels,
                 resolution, in_channels, double_z, norm_groups, **ignored):
        super().__init__()
        g = norm_groups
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        # the down path: level i works at resolution / 2^i with ch * ch_mult[i] channels
        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in, g))
            level = nn.Module()          # a plain container, so keys read down.{i}.block.{j}
            level.block = block
            level.attn = attn
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                curr_res = curr_res // 2
            self.down.append(level)

        self.mid = MidBlock(block_in, g)

        self.norm_out = Normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels,
                                  kernel_size=3, stride=1, padding=1)

    def forward(self, x):                                   # (B, 3, H, W)
        h = self.conv_in(x)                                 # (B, ch, H, W)
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)                     # spatial size halves
        h = self.mid(h)                                     # (B, ch*ch_mult[-1], H/f, W/f)
        h = self.conv_out(swish(self.norm_out(h)))          # (B, 2*z, H/f, W/f)
        return h


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*f, w*f)."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, dec_attn_resolutions, z_channels,
                 resolution, out_ch, norm_groups, **ignored):
        super().__init__()
        g = norm_groups
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = MidBlock(block_in, g)

        # the up path is built from the lowest resolution upwards, but stored so that
        # up.{i} mirrors down.{i} of the encoder (up.0 is the full-resolution level)
        up_levels = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):        # one more block than the encoder
                block.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
                if curr_res in dec_attn_resolutions:
                    attn.append(AttnBlock(block_in, g))
            level = nn.Module()
            level.block = block
            level.attn = attn
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res = curr_res * 2
            up_levels.insert(0, level)
        self.up = nn.ModuleList(up_levels)

        self.norm_out = Normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z):                                   # (B, z, h, w)
        h = self.conv_in(z)                                 # (B, ch*ch_mult[-1], h, w)
        h = self.mid(h)
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)                       # spatial size doubles
        h = self.conv_out(swish(self.norm_out(h)))          # (B, 3, H, W)
        return h


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) given the encoder's moments.

    moments: (B, 2C, h, w); the first C channels are the mean, the last C the log-variance.
    """

    def __init__(self, moments):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)       # (B, C, h, w) each
        # clamp as in LDM, so exp() can neither overflow nor give exactly 0
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        # z = mean + std * eps, eps ~ N(0, I). A generator must live on the tensors' device.
        eps = torch.randn(self.mean.shape, generator=generator,
                          device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self):
        return self.mean

    def kl(self):
        # KL(N(mean, var) || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar), per sample (B,)
        return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):

    def __init__(self, config):
        super().__init__()
        missing = [k for k in PRESETS['kl16'] if k not in config]
        if missing:
            raise ValueError(f"VAE config lacks the keys {missing}; start from "
                             f"vae.PRESETS['kl16'] or vae.PRESETS['cifar']")
        if not config['double_z']:
            raise ValueError("AutoencoderKL needs double_z=True (the encoder must output mean and logvar)")
        # keep a plain-data copy (lists, not tuples) so it round-trips through a checkpoint
        self.config = json.loads(json.dumps(dict(config)))
        c = self.config
        self.encoder = Encoder(**c)
        self.decoder = Decoder(**c)
        # 1x1 convs between the encoder / decoder and the latent of embed_dim channels
        self.quant_conv = nn.Conv2d(2 * c['z_channels'], 2 * c['embed_dim'], 1)
        self.post_quant_conv = nn.Conv2d(c['embed_dim'], c['z_channels'], 1)

    @classmethod
    def from_preset(cls, name):
        if name not in PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(PRESETS[name])

    @property
    def downsample_factor(self):
        return 2 ** (len(self.config['ch_mult']) - 1)

    def encode(self, x):                           # x: (B, 3, H, W) in [-1, 1]
        h = self.encoder(x)                        # (B, 2*z, H/f, W/f)
        moments = self.quant_conv(h)               # (B, 2*embed_dim, H/f, W/f)
        return DiagonalGaussian(moments)

    def decode(self, z):                           # z: (B, embed_dim, h, w), NOT scaled
        z = self.post_quant_conv(z)                # (B, z, h, w)
        return self.decoder(z)                     # (B, 3, h*f, w*f), about [-1, 1]

    def forward(self, x, sample_posterior=True):
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


# -----------------------------------------------------------------------------
# Checkpoints

def load_state_dict_strict(module, sd, what='model'):
    """module.load_state_dict(sd, strict=True), never strict=False: torch's own error lists
    every missing key, unexpected key and shape mismatch; we raise it as a ValueError that
    says which file it was and what to check. The one strict loader of the project."""
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{what}: the weights do not fit the architecture; check that the "
                         f"checkpoint was made with the same config/preset. {e}") from None
    return module


def save_vae(path, model, scale_factor, extra=None):
    """Write {'model': state_dict, 'config': config, 'scale_factor': float, **extra} atomically."""
    ckpt = {
        'model': {k: v.detach().cpu() for k, v in model.state_dict().items()},
        'config': model.config,
        'scale_factor': float(scale_factor),
    }
    if extra:
        clash = set(extra) & set(ckpt)
        if clash:
            raise ValueError(f"save_vae: extra may not override the keys {sorted(clash)}")
        ckpt.update(extra)
    data.atomic_save(ckpt, path)
    return path


def load_vae(path, device='cpu'):
    """Load a VAE checkpoint -> (model in eval mode on `device`, scale_factor).

    Accepts this project's format (save_vae) and MAR's kl16.ckpt (a dict with the state
    dict under 'model' and no 'config': the kl16 preset with scale factor 0.2325).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"VAE checkpoint {path!r} not found. Pass the vae.pt written by "
            f"`python vae.py --out DIR` (DIR/vae.pt), or MAR's kl16.ckpt "
            f"(download it from the MAR repository, github.com/LTH14/mar).")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle errors differ between torch versions
        raise ValueError(f"could not read {path!r} as a weights-only torch checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        raise ValueError(f"{path!r} is not a VAE checkpoint: expected a dict with the state "
                         f"dict under the key 'model' (this project's vae.pt or MAR's kl16.ckpt)")
    if 'config' in ckpt:
        config = ckpt['config']
        if 'scale_factor' not in ckpt:
            raise ValueError(f"{path!r} has a 'config' but no 'scale_factor'; it was not "
                             f"written by vae.save_vae (re-run the VAE training to finish it)")
        scale_factor = float(ckpt['scale_factor'])
    else:
        # MAR's kl16.ckpt: only weights; the architecture and scale are the kl16 preset
        config = PRESETS['kl16']
        scale_factor = PRESET_SCALE_FACTORS['kl16']
    model = AutoencoderKL(config)
    load_state_dict_strict(model, ckpt['model'], what=f"VAE checkpoint {path!r}")
    return model.to(device).eval(), scale_factor


# -----------------------------------------------------------------------------
# Training (cifar preset; pixels only, no perceptual or adversarial loss)

@torch.no_grad()
def reconstruct(model, images, batch_size=256, device='cpu'):
    """uint8 (N, H, W, 3) -> uint8 reconstructions via the posterior mode (deterministic)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = data.to_float(torch.as_tensor(np.asarray(images[i:i + batch_size])).to(device))
        out.append(data.to_uint8(model.decode(model.encode(x).mode())).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def evaluate_psnr(model, images, batch_size=256, device='cpu'):
    """Mean PSNR (dB) over images of uint8 (N, H, W, 3) vs their uint8 reconstructions.

    PSNR is computed per image (10 log10(255^2 / MSE_image)) and then averaged over images
    (the usual convention for reconstruction tables). A perfect image would be infinite;
    its MSE is floored at 1e-10.
    """
    rec = reconstruct(model, images, batch_size, device).astype(np.float64)
    ref = np.asarray(images).astype(np.float64)
    mse = ((rec - ref) ** 2).reshape(len(ref), -1).mean(axis=1)      # (N,)
    psnr = 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))
    return float(psnr.mean())


def save_recon_grid(model, images, path, n=16, device='cpu'):
    """PNG: top row = the first n originals, bottom row = their reconstructions."""
    from PIL import Image
    imgs = np.asarray(images[:n])
    rec = reconstruct(model, imgs, len(imgs), device)
    grid = np.concatenate([np.concatenate(list(imgs), axis=1),      # (H, n*W, 3)
                           np.concatenate(list(rec), axis=1)], axis=0)  # (2H, n*W, 3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def make_vae_optimizers(model, lr, optimizer='muon'):
    """[Adam], or for 'muon' [Muon on the inner convolutions (at least 16 channels in and
    out: not the first and last layers, nor the 1x1 maps to and from the 4-channel latent),
    Adam on the rest (those, the norms, the biases)]. train.Muon: FlowAR's Muon, which sees a
    kernel (out, in, k, k) as an (out, in*k*k) matrix; no weight decay (the VAE's Adam has
    none). The toy VAE uses it for its better reconstructions at the same steps (docs/toy.md,
    "VAE")."""
    if optimizer not in ('adam', 'muon'):
        raise ValueError(f"optimizer must be 'adam' or 'muon', got {optimizer!r}")
    if optimizer == 'adam':
        return [torch.optim.Adam(model.parameters(), lr=lr)]
    from train import Muon  # train.py owns it (imported here: train.py imports this file)
    is_muon = lambda p: p.ndim == 4 and p.shape[0] >= 16 and p.shape[1] >= 16
    return [Muon([p for p in model.parameters() if is_muon(p)], lr=lr),
            torch.optim.Adam([p for p in model.parameters() if not is_muon(p)], lr=lr)]


@torch.no_grad()
def standardize_latent_channels(model, images, batch_size=256, device='cpu', max_images=10000, seed=0,
                                precision='fp32'):
    """Give every latent channel mean 0 and sd 1 over (up to max_images of) images, by
    folding an affine map into the 1x1 convs around the latent: the encoder's quant_conv
    then outputs mean' = (mean - m_c) / s_c and logvar' = logvar - 2 log s_c, and
    post_quant_conv undoes it (its input z' * s_c + m_c). The reconstructions are unchanged.
    Why: the toy VAE's channels come out of training with arbitrary offsets and spreads
    that differ by seed (docs/toy.md, "VAE"), while flow matching starts every channel from N(0, 1); SD3 shifts and scales its
    latent for the same reason. TOY ONLY: MAR's KL-16 (the released models' VAE) keeps one
    global factor, 0.2325, and no shift; this runs only in train_vae. The encoder runs once,
    in bf16 autocast where precision is 'bf16' (as the latent cache is encoded).
    Returns (m, s, scale_factor): m and s are (C,);
    scale_factor is MAR's recipe, 1 / std of posterior samples z' = mean' + std' * eps, in
    closed form (Var z' = Var mean' + E std'^2, no eps drawn); about 1, since std' << 1."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[:max_images].sort().values.numpy()
    means, logvars = [], []
    for i in range(0, len(idx), batch_size):
        x = data.to_float(torch.as_tensor(np.asarray(images)[idx[i:i + batch_size]]).to(device))
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=precision == 'bf16'):
            post = model.encode(x)
        means.append(post.mean.float().cpu())
        logvars.append(post.logvar.float().cpu())
    means, logvars = torch.cat(means), torch.cat(logvars)                           # (N, C, h, w) each
    m, s = means.mean(dim=(0, 2, 3)), means.std(dim=(0, 2, 3))                     # (C,) each
    C = len(m)
    q, p = model.quant_conv, model.post_quant_conv
    md, sd = m.to(q.weight), s.to(q.weight)
    p.bias += (p.weight[:, :, 0, 0] * md).sum(dim=1)          # z = z' s + m: b + W m ...
    p.weight *= sd[None, :, None, None]                       # ... + (W s) z'
    q.weight[:C] /= sd[:, None, None, None]                   # mean' = (mean - m) / s
    q.bias[:C] = (q.bias[:C] - md) / sd
    q.bias[C:] -= 2 * sd.log()                                # logvar' = logvar - 2 log s
    mean_std = (means - m[None, :, None, None]) / s[None, :, None, None]          # mean', as now encoded
    var_std = (logvars - 2 * s.log()[None, :, None, None]).exp()                    # std'^2
    scale_factor = float(1.0 / (mean_std.var() + var_std.mean()).sqrt())
    return m, s, scale_factor


def train_state_path(out_path):
    # the resumable training state lives next to the final checkpoint
    return os.path.splitext(out_path)[0] + '_train_state.pt'


def _save_train_state(path, model, opts, step, data_gen, device):
    # everything a resumed run needs to continue bit for bit: weights, optimizer moments,
    # the step, and the three random streams (batches/flips, CPU noise, CUDA noise)
    st = {'model': model.state_dict(), 'config': model.config,
          'optimizers': [o.state_dict() for o in opts], 'step': step,
          'data_rng': data_gen.get_state(), 'torch_rng': torch.get_rng_state()}
    if device.type == 'cuda':
        st['cuda_rng'] = torch.cuda.get_rng_state(device)
    data.atomic_save(st, path)


def _load_train_state(path, model, opts, data_gen, device):
    """Restore what _save_train_state wrote into model, opts and the RNGs; returns the step."""
    st = torch.load(path, map_location='cpu', weights_only=True)
    if st['config'] != model.config or len(st.get('optimizers', [])) != len(opts):
        raise ValueError(f"{path} was made with another VAE config or optimizer; delete it or "
                         f"pass resume=False to start over")
    load_state_dict_strict(model, st['model'], what=path)
    for o, sd in zip(opts, st['optimizers'], strict=True):
        o.load_state_dict(sd)
    data_gen.set_state(st['data_rng'])
    torch.set_rng_state(st['torch_rng'])
    if device.type == 'cuda' and 'cuda_rng' in st:
        torch.cuda.set_rng_state(st['cuda_rng'], device)
    print(f"[vae] resumed from {path} at step {int(st['step'])}")
    return int(st['step'])


def _random_batch(images_t, batch_size, data_gen, device):
    # batch_size random training images (with replacement), each flipped left-right with
    # probability 1/2; the indices and flips come from data_gen, on the CPU
    idx = torch.randint(len(images_t), (batch_size,), generator=data_gen)
    flip = torch.rand(batch_size, generator=data_gen) < 0.5
    x = data.to_float(images_t[idx])                                     # (B, 3, H, W)
    return torch.where(flip[:, None, None, None], x.flip(3), x).to(device)


def _batch_loss(model, x, loss, kl_weight):
    """-> (total, recon, kl) for one batch x: recon = mean |x - x'| ('l1') or mean
    (x - x')^2 ('mse') and kl = KL(q(z|x) || N(0, I)) per pixel value, so that kl_weight
    weighs the KL against the per-pixel reconstruction error, as in LDM (1e-6)."""
    recon, posterior = model(x)                  # decodes a sample z ~ q(z|x), (B, 3, H, W)
    rec_loss = (recon - x).abs().mean() if loss == 'l1' else ((recon - x) ** 2).mean()
    kl = posterior.kl().mean() / x[0].numel()    # (sum over the latent) / (3*H*W)
    return rec_loss + kl_weight * kl, rec_loss, kl


def _schedule_position(step, steps, warmup, elapsed, time_budget_s):
    # the x of lr_at, in steps. The warm-up counts the step being taken (step + 1), so the
    # first step is not spent at lr 0: the toy recipe was measured on this trajectory and is
    # sensitive to it (docs/toy.md, "VAE"). With a time budget, the cosine part moves by the
    # further along of the step and the elapsed fraction of the budget, so the lr is
    # annealed when the budget runs out even if `steps` was set too high
    if step < warmup:
        return step + 1
    if time_budget_s is None:
        return step
    return max(step, warmup + (steps - warmup) * elapsed / max(time_budget_s, 1e-9))


def _log_progress(step, steps, batch_size, ips, budget_left, total, rec_loss, kl, lr):
    # one progress line; the ETA is the steps left at the current rate, or the rest of the
    # time budget (budget_left seconds) if that ends first
    eta = (steps - step) * batch_size / max(ips, 1e-9)
    if budget_left is not None:
        eta = min(eta, max(0.0, budget_left))
    print(f"[vae] step {step}/{steps} loss {total.item():.4f} recon {rec_loss.item():.4f} "
          f"kl {kl.item():.4f} lr {lr:.2e} {ips:.0f} img/s ETA {eta / 60:.1f} min", flush=True)


@dataclass
class VAERecipe:
    """How train_vae trains the VAE; the defaults are the CPU toy's (train.py's preset)."""
    steps: int = 2800
    batch_size: int = 16
    lr: float = 2e-3             # peak lr: warm-up, then cosine to 10% of it at `steps`
    optimizer: str = 'muon'      # 'adam', or 'muon' on the inner convolutions (make_vae_optimizers)
    loss: str = 'l1'             # pixel reconstruction loss, 'l1' or 'mse'
    kl_weight: float = 1e-6      # weight of the KL per pixel value (LDM's)
    precision: str = 'fp32'      # 'fp32', 'bf16' or 'auto' (train.resolve_precision)
    seed: int = 0                # init, batches, flips and posterior noise


def train_vae(images, out_path, recipe=VAERecipe(), *, config=None, device='cpu', resume=True,
              time_budget_s=None, stop_at_step=None, log_every=100, ckpt_every=500):
    """Train a VAE (config: a PRESETS entry, default 'cifar') on uint8 images (N, H, W, 3)
    with `recipe` and write it with save_vae to out_path.

    Each step: a random flipped batch (_random_batch), its loss (_batch_loss; in bf16
    autocast where resolve_precision(recipe.precision) says bf16), one step of the optimizers
    of make_vae_optimizers at the lr of lr_at (warm-up, then cosine to 10% of lr at
    recipe.steps). Training stops after recipe.steps steps, or once time_budget_s seconds of
    training have passed in this call, or after step stop_at_step (a deterministic
    interruption, for chunked runs and tests). The training state is saved every ckpt_every
    steps and at the end to train_state_path(out_path); with resume=True a later call
    continues from it. Finally the latent channels are standardized and the scale factor
    measured (then about 1) in one pass (standardize_latent_channels), and the model saved
    with save_vae. Returns out_path.
    """
    r = recipe
    steps, batch_size, lr, seed = r.steps, r.batch_size, r.lr, r.seed
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"train_vae wants uint8 images of shape (N, H, W, 3), got "
                         f"{images.dtype} {images.shape}")
    if r.loss not in ('l1', 'mse'):
        raise ValueError(f"loss must be 'l1' or 'mse', got {r.loss!r}")
    # train.py owns the lr schedule and the precision policy of both stages (imported here,
    # not at the top, because train.py imports this file)
    from train import lr_at, resolve_precision
    device = torch.device(device)
    bf16 = resolve_precision(r.precision, device) == 'bf16'
    torch.manual_seed(seed)                        # model init and the posterior noise
    model = AutoencoderKL(config if config is not None else PRESETS['cifar']).to(device)
    opts = make_vae_optimizers(model, lr, r.optimizer)
    data_gen = torch.Generator().manual_seed(seed + 1)  # batch indices and flips (CPU)
    state_path = train_state_path(out_path)
    step = 0
    if resume and os.path.isfile(state_path):
        step = _load_train_state(state_path, model, opts, data_gen, device)

    images_t = torch.from_numpy(images)                   # (N, H, W, 3) uint8, stays on CPU
    warmup = min(200, max(1, steps // 20))
    model.train()
    t0 = t_log = time.time()
    n_log, start_step = 0, step
    while step < steps:
        elapsed = time.time() - t0
        if time_budget_s is not None and step > start_step and elapsed >= time_budget_s:
            print(f"[vae] time budget of {time_budget_s:.0f}s reached at step {step}")
            break
        if stop_at_step is not None and step >= stop_at_step:
            print(f"[vae] stopping at step {step} (stop_at_step)")
            break
        x_sched = _schedule_position(step, steps, warmup, elapsed, time_budget_s)
        for group in (g for o in opts for g in o.param_groups):
            group['lr'] = lr_at(x_sched, lr, 0.1 * lr, warmup, steps)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            total, rec_loss, kl = _batch_loss(model, _random_batch(images_t, batch_size, data_gen, device),
                                              r.loss, r.kl_weight)
        for o in opts:
            o.zero_grad(set_to_none=True)
        total.backward()
        for o in opts:
            o.step()
        step += 1
        n_log += batch_size

        if step % log_every == 0 or step == steps:
            ips = n_log / max(time.time() - t_log, 1e-9)                 # images per second
            budget_left = None if time_budget_s is None else time_budget_s - (time.time() - t0)
            _log_progress(step, steps, batch_size, ips, budget_left, total, rec_loss, kl,
                          opts[0].param_groups[0]['lr'])
            t_log, n_log = time.time(), 0
        if step % ckpt_every == 0:
            _save_train_state(state_path, model, opts, step, data_gen, device)
    train_time = time.time() - t0
    _save_train_state(state_path, model, opts, step, data_gen, device)

    m, s, scale_factor = standardize_latent_channels(model, images, device=device, seed=seed,
                                                     precision='bf16' if bf16 else 'fp32')
    print(f"[vae] trained to step {step} ({train_time:.0f}s in this call); latent channels "
          f"standardized (means {' '.join(f'{v:.2f}' for v in m)}, sds {' '.join(f'{v:.2f}' for v in s)}); "
          f"scale factor {scale_factor:.4f}")
    save_vae(out_path, model, scale_factor, extra={'step': step})
    return out_path


# -----------------------------------------------------------------------------
# CLI

def main():
    p = argparse.ArgumentParser(description="Train the small 'cifar' VAE (32x32 -> 4x8x8).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--dataset', choices=['cifar10', 'shapes'], default='cifar10', help='training images')
    p.add_argument('--data-dir', default='data', help="folder holding cifar-10-batches-py/ "
                   "or cifar-10-python.tar.gz (downloaded there if neither exists)")
    p.add_argument('--out', default='out/vae', help='writes OUT/vae.pt and OUT/vae_recon.png')
    p.add_argument('--steps', type=int, default=2800, help='training steps (the toy VAE of train.py)')
    p.add_argument('--batch-size', type=int, default=16, help='images per step (the toy VAE of train.py)')
    p.add_argument('--lr', type=float, default=2e-3, help='peak lr (warm-up, then cosine to 10%%)')
    p.add_argument('--optimizer', choices=['adam', 'muon'], default='muon',
                   help="'adam', or 'muon': Muon on the inner convolutions, Adam on the rest (make_vae_optimizers)")
    p.add_argument('--loss', choices=['l1', 'mse'], default='l1', help='pixel reconstruction loss')
    p.add_argument('--kl-weight', type=float, default=1e-6, help='weight of the KL per pixel value')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='cpu or cuda')
    p.add_argument('--time-budget', type=float, default=None,
                   help='stop training after this many seconds (then evaluate and save); the '
                   'cosine lr schedule then ends with the budget')
    p.add_argument('--seed', type=int, default=0, help='seed of init, batches and noise')
    p.add_argument('--precision', choices=['fp32', 'bf16', 'auto'], default='auto',
                   help='training steps in fp32 or bf16 autocast; auto: bf16 where native (resolve_precision)')
    p.add_argument('--log-every', type=int, default=100, help='steps between progress lines')
    p.add_argument('--no-resume', action='store_true', help='ignore an existing training state')
    args = p.parse_args()

    if args.dataset == 'cifar10':
        train_images, _ = data.load_cifar10(args.data_dir, train=True, download=True)
        test_images, _ = data.load_cifar10(args.data_dir, train=False, download=True)
    else:
        train_images, _ = data.make_shapes(50000, seed=0)
        test_images, _ = data.make_shapes(10000, seed=1)

    out_path = os.path.join(args.out, 'vae.pt')
    t0 = time.time()
    recipe = VAERecipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                       loss=args.loss, kl_weight=args.kl_weight, precision=args.precision, seed=args.seed)
    train_vae(train_images, out_path, recipe, device=args.device, resume=not args.no_resume,
              time_budget_s=args.time_budget, log_every=args.log_every)
    print(f"[vae] wall-clock for training + scale factor: {time.time() - t0:.0f}s")
    model, scale = load_vae(out_path, args.device)
    psnr = evaluate_psnr(model, test_images, device=args.device)
    print(f"[vae] test PSNR {psnr:.2f} dB on {len(test_images)} images; scale factor {scale:.4f}")
    save_recon_grid(model, test_images, os.path.join(args.out, 'vae_recon.png'), device=args.device)
    print(f"[vae] wrote {out_path} and {os.path.join(args.out, 'vae_recon.png')}")


if __name__ == '__main__':
    data.keep_freed_memory()  # CPU: reuse freed memory instead of page-faulting it back in
    main()
