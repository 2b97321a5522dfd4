"""
The paper's ablations (Sec. 4.2, Tables 3-6) as experiments on the CPU toy, each row one
command, scored with the project's own metric (metrics.py).

    python train.py                                   # once: the toy's VAE and latent cache
    python ablations.py --table 6                     # every row of Table 6, seed 0
    python ablations.py --table 6 --seeds 0,1         # two seeds
    python ablations.py --table 4 --rows 1,4,8        # one row
    python ablations.py --table 6 --steps 300         # a shorter budget per row
    python ablations.py --table 3 --data-dir DIR      # Table 3 also reads the CIFAR-10 images

Every row trains the toy FlowAR (flowar.PRESETS['toy'], with the full pyramid of scales
{1,2,4,8} = PYRAMID in Tables 3, 5 and 6, not the toy recipe's {1,8}) with exactly one
change, from scratch, on the latent cache of a finished `python train.py` run (--base: its vae.pt and
latents/), for --steps optimizer steps of the toy recipe (batch 64, AdamW lr 2e-3 with
warm-up and cosine, EMA 0.999 with warm-up, label drop 0.1; the randomness of train.py);
then samples --num-samples class-balanced images with fixed sampling settings (SAMPLING:
8 Euler steps, constant cfg 5) from the EMA weights and scores them (classifier accuracy, Frechet distance). It writes
    OUT/table<k>/<row>-seed<s>.json   the result (accuracy, FD, training and sampling time)
    OUT/table<k>/<row>-seed<s>.png    a grid, one row per class
    OUT/table<k>.md                   the table: each row's metric, mean over the seeds
                                      done so far, the paper's FID for the same row
Rows already done (their .json exists) are not run again, so an interrupted table resumes.

The rows (in the paper's words, Sec. 4.2):
  Table 6, how the AR semantics s-hat enter the flow head (InjectionHead):
    adaln            adaptive LayerNorm conditioned on the spatially averaged semantics
    sequence-concat  semantics concatenated with the flattened input along the sequence
    addition         element-wise addition of the semantics and the flattened input
    cross-attention  cross-attention, the flattened input as query, semantics as key/value
    channel-concat   semantics concatenated with the flattened input along the channels
    spatial-adaln    Spatial-adaLN, Eq. 10 (the model of flowar.py, unchanged)
    In the first five the head's blocks keep their adaLN, conditioned on t only (on t and
    the pooled semantics for 'adaln'), so the injection is the only difference.
  Table 5, per-token vs per-scale head, diffusion vs flow matching:
    per-token        MAR's head: an MLP with adaLN from t + the token's own semantics,
                     every token denoised on its own (no attention among the tokens)
    per-scale        the FlowAR head (flowar.FlowHead)
    per-token-diffusion, per-scale-diffusion   the same heads (and initial weights) trained
                     as DDPM epsilon-predictors instead of velocity predictors
                     (DiffusionFlowAR): x_t = sqrt(abar(t)) x + sqrt(1 - abar(t)) eps, target
                     eps (Ho et al. 2020, Eq. 14), with the cosine schedule abar(t) =
                     f(t) / f(0), f(t) = cos^2((t + 0.008) / 1.008 * pi / 2) (Nichol &
                     Dhariwal 2021, Eq. 17; MAR's schedule too) in continuous t in [0, 1], t = 1
                     noise as in the flow rows, so the head's time embedding, the training t
                     and the sampling time grid are the flow rows' own. Sampling:
                     deterministic DDIM (Song et al. 2021, Eq. 12, sigma = 0) on the flow
                     sampler's time grid, so the same number of head evaluations, CFG applied
                     to the epsilons as the flow sampler applies it to the velocities. abar is
                     clipped below at ABAR_MIN = 0.0047, Stable Diffusion's terminal abar
                     (Rombach et al. 2022): t = 1 is almost pure noise, not exactly (from zero
                     signal an epsilon says nothing about x, Lin et al. 2024), and DDIM's first
                     step multiplies the head's error by sqrt(abar(t_2) / abar(1)) (on the toy's
                     8-step grid: 5x here, 36x at 1e-4). 200-step probe (seed 0, 300 samples,
                     classifier acc / FD): ABAR_MIN 2.4e-9 (MAR's last step) 0.07 / 22.1, 1e-4
                     0.10 / 22.0 (chance level), 0.0047 0.20 / 14.9, 0.01 0.20 / 15.7, 0.03
                     0.23 / 16.5; flow matching 0.26 / 14.7.
  Table 4, the scale list (the 8x8 toy latent in place of 16x16):
    1,2,4,8 (the full pyramid, as {1,2,4,8,16}), 1,4,8 (as {1,4,8,16}), 1,8 (as {1,4,16}:
    fewer and coarser steps; the toy recipe's list).
  Table 3, where the coarse token maps come from:
    latent-pyramid   area-downsampled latent, Eq. 5 (the model of flowar.py, unchanged)
    image-pyramid    s^i = the VAE encoding of the image area-downsampled to f*h_i x f*w_i
                     pixels (f = 4: 4x4, 8x8, 16x16 and the 32x32 image itself), times the
                     VAE scale factor (ImagePyramidFlowAR). Only training changes; sampling
                     decodes the finest map as usual. The posterior moments of the coarse
                     images are encoded once into OUT/table3/image-pyramid-moments.pt (from
                     --data-dir). Same randomness as the latent pyramid (train.make_batch):
                     the finest map is make_batch's posterior sample itself, a coarse one
                     mean_i + std_i * r * Down(eps, r), eps make_batch's posterior draw (r *
                     Down(eps, r) is N(0, I) again), with make_batch's flip.
"""

import argparse
import copy
import json
import math
import os
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import flowar
import metrics
import sample
import train
import vae as vae_lib

# row name -> (what changes, the paper's FID for that row)
TABLES = {
    6: {'adaln': 14.28, 'sequence-concat': 9.22, 'addition': 6.22, 'cross-attention': 5.37,
        'channel-concat': 4.85, 'spatial-adaln': 3.61},
    5: {'per-token-diffusion': 6.85, 'per-token': 6.15, 'per-scale-diffusion': 3.93, 'per-scale': 3.61},
    4: {'1,2,4,8': 3.61, '1,4,8': 4.88, '1,8': 6.10},
    3: {'image-pyramid': 12.19, 'latent-pyramid': 3.61},
}
PAPER_ROW = {'1,2,4,8': '{1,2,4,8} (paper: {1,2,4,8,16})', '1,4,8': '{1,4,8} (paper: {1,4,8,16})',
             '1,8': '{1,8} (paper: {1,4,16})', 'per-token': 'per-token, flow matching',
             'per-scale': 'per-scale, flow matching'}
ABAR_MIN = 0.0047  # Table 5's diffusion rows: abar(1), SNR 0.0047 at t = 1 (see the docstring)


# ---------------------------------------------------------------------------------------
# The heads that replace flowar.FlowHead (same call: (x, t, semantics, pos) -> velocity)
# ---------------------------------------------------------------------------------------

class InjectionHead(nn.Module):
    """FM(F_t, s-hat, t) with one of the Table 6 injections other than Spatial-adaLN.
    Blocks: flowar.SpatialAdaLNBlock with a spatially constant condition (t only, or
    t + pooled semantics for 'adaln'), flowar.CrossAttnBlock for 'cross-attention'."""

    def __init__(self, injection, in_channels, width, depth, cond_dim, mlp_ratio=4.0, rope_theta=1e4):
        super().__init__()
        heads = width // 64
        self.injection = injection
        self.time_embed = flowar.TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width) if injection in ('addition', 'adaln', 'sequence-concat') else None
        extra = cond_dim if injection == 'channel-concat' else 0
        self.input_proj = nn.Linear(in_channels + extra, width)
        if injection == 'cross-attention':
            blocks = [flowar.CrossAttnBlock(width, cond_dim, heads, mlp_ratio, rope_theta) for _ in range(depth)]
        else:
            blocks = [flowar.SpatialAdaLNBlock(width, heads, mlp_ratio, rope_theta) for _ in range(depth)]
        self.res_blocks = nn.ModuleList(blocks)
        self.final_layer = flowar.FinalLayer(width, in_channels)

    def forward(self, x, t, semantics, pos):
        N = x.shape[1]
        t_emb = self.time_embed(t)[:, None]                                   # (B, 1, W)
        c = torch.zeros_like(t_emb)                                           # no spatial condition
        if self.injection == 'channel-concat':
            h = self.input_proj(torch.cat([x, semantics], dim=-1))            # (B, N, W)
        else:
            h = self.input_proj(x)
        if self.injection == 'addition':
            h = h + self.cond_embed(semantics)
        elif self.injection == 'adaln':
            c = self.cond_embed(semantics).mean(dim=1, keepdim=True)          # (B, 1, W): pooled
        elif self.injection == 'sequence-concat':
            h = torch.cat([h, self.cond_embed(semantics)], dim=1)             # (B, 2N, W)
            pos = torch.cat([pos, pos])                                       # same positions
        for block in self.res_blocks:
            h = block(h, t_emb, c, semantics, pos)
        return self.final_layer(h[:, :N], c + t_emb)                          # (B, N, C)


class TokenMLPHead(nn.Module):
    """Table 5's per-token head (MAR's SimpleMLPAdaLN): residual MLP blocks with adaLN from
    t + the token's own semantics; no attention, so every token is denoised on its own.
    2 x depth blocks (an MLP block is cheaper than an attention + MLP block)."""

    def __init__(self, in_channels, width, depth, cond_dim):
        super().__init__()
        self.time_embed = flowar.TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.norms = nn.ModuleList([nn.LayerNorm(width, elementwise_affine=False) for _ in range(2 * depth)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
                                   for _ in range(2 * depth)])
        self.ada = nn.ModuleList([nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width)) for _ in range(2 * depth)])
        self.final_layer = flowar.FinalLayer(width, in_channels)

    def forward(self, x, t, semantics, pos):
        c = self.cond_embed(semantics) + self.time_embed(t)[:, None]         # (B, N, W)
        h = self.input_proj(x)
        for norm, mlp, ada in zip(self.norms, self.mlps, self.ada):
            shift, scale, gate = ada(c).chunk(3, dim=-1)
            h = h + gate * mlp(flowar.modulate(norm(h), shift, scale))
        return self.final_layer(h, c)


# ---------------------------------------------------------------------------------------
# The models that replace a step of flowar.FlowAR: diffusion (Table 5), image pyramid (Table 3)
# ---------------------------------------------------------------------------------------

def alpha_bar(t):
    """The cosine schedule (Nichol & Dhariwal 2021, Eq. 17) in continuous t in [0, 1]
    (t = 1 noise), clipped below at ABAR_MIN: abar(0) = 1 exactly."""
    f = lambda u: torch.cos((u + 0.008) / 1.008 * (math.pi / 2)) ** 2
    return (f(t) / f(torch.zeros_like(t))).clamp(min=ABAR_MIN)


class DiffusionFlowAR(flowar.FlowAR):
    """Table 5's diffusion rows: FlowAR whose head is a DDPM epsilon-predictor."""

    def interpolate(self, x, eps, t):
        # DDPM forward process q(x_t | x) (Ho et al. 2020, Eq. 4) in place of Eq. 7, and the
        # epsilon target of their Eq. 14 (L_simple) in place of Eq. 8's velocity
        ab = alpha_bar(t)
        return ab.sqrt() * x + (1 - ab).sqrt() * eps, eps

    def integrate(self, predict, noise, ts):
        # deterministic DDIM (Song et al. 2021, Eq. 12 with sigma_t = 0) in place of the Euler
        # integration of Eq. 8's velocity; predict(x, t) is the (CFG-combined) epsilon
        x, ab = noise.double(), alpha_bar(ts.double())
        for j in range(len(ts) - 1):
            eps = predict(x, float(ts[j])).double()
            x0 = (x - (1 - ab[j]).sqrt() * eps) / ab[j].sqrt()           # predicted x_0
            x = ab[j + 1].sqrt() * x0 + (1 - ab[j + 1]).sqrt() * eps      # x at t_{j+1}
        return x


class ImagePyramidFlowAR(flowar.FlowAR):
    """Table 3's image pyramid: forward takes the token maps s^1..s^n themselves (VAE
    encodings of the downsampled images, image_pyramid_maps) in place of Eq. 5's pyramid
    of the latent."""

    def scale_maps(self, maps):
        if [tuple(m.shape[-2:]) for m in maps] != self.scales:
            raise ValueError(f"need one token map per scale {self.scales}")
        return list(maps)


def image_pyramid_moments(vae, ds, scales, data_dir, path):
    """Posterior moments [(N, P, 2C, h_i, w_i)] of every training image (and its flip when
    the base cache has flips: P = 2) area-downsampled to f*h_i x f*w_i pixels, for each
    scale but the last (that image is the full one: the base cache). Built once into `path`."""
    key = dict(vae=data.vae_fingerprint(vae), scales=[list(s) for s in scales], N=len(ds),
               flips=bool(ds.header['flips']))
    if os.path.isfile(path):
        saved = torch.load(path, weights_only=True)
        if saved['key'] == key:
            return saved['moments']
    images, labels = data.load_cifar10(data_dir, train=True, download=True)
    if not np.array_equal(labels, ds.labels):
        raise SystemExit(f"the CIFAR-10 of {data_dir} is not the base latent cache's data")
    f, out = vae.downsample_factor, [[] for _ in scales[:-1]]
    print(f"[ablations] encoding the image pyramid of {len(images)} images -> {path}", flush=True)
    with torch.no_grad():
        for b in range(0, len(images), 500):
            x = data.to_float(torch.from_numpy(images[b:b + 500]))                     # (B, 3, H, W)
            x = torch.stack([x, x.flip(3)], 1) if key['flips'] else x[:, None]      # (B, P, 3, H, W)
            for i, (h, w) in enumerate(scales[:-1]):
                post = vae.encode(F.interpolate(x.flatten(0, 1), size=(f * h, f * w), mode='area'))
                out[i].append(torch.cat([post.mean, post.logvar], 1).unflatten(0, x.shape[:2]))
    moments = [torch.cat(o) for o in out]
    data.atomic_save(dict(key=key, moments=moments), path)
    return moments


def image_pyramid_maps(moments, ds, idx, z, rcfg, step, scales):
    """The token maps of the batch `idx` for ImagePyramidFlowAR: make_batch's posterior
    sample z (B, C, H, W) at the finest scale; at scale i, (mean_i + std_i * r * Down(eps, r))
    times the scale factor, with make_batch's posterior draw eps and flip (sample_randomness)."""
    maps = [[] for _ in scales[:-1]]
    for j, k in enumerate(idx):
        flip, eps, *_ = train.sample_randomness(rcfg['seed'], step, j, tuple(z.shape[1:]), len(scales),
                                                scales, rcfg['t_sampling'])
        for i, (h, w) in enumerate(scales[:-1]):
            mean, logvar = moments[i][k, flip % moments[i].shape[1]].chunk(2, dim=0)
            e = F.interpolate(eps[None], size=(h, w), mode='area')[0] * math.sqrt(eps[0].numel() / (h * w))
            maps[i].append((mean + torch.exp(0.5 * logvar) * e) * ds.scale_factor)
    return [torch.stack(m) for m in maps] + [z]


# Tables 3, 5 and 6 vary one part of the paper's model, with the full pyramid of scales
# (the 8x8 toy latent's equivalent of {1,2,4,8,16}). The toy recipe itself uses {1, 8}: at
# its 20-minute budget that list scores best (Table 4 at 1,054 steps, README).
PYRAMID = (1, 2, 4, 8)


# The sampling settings every row is scored with: the toy's defaults when the README's tables
# were measured (flowar.SAMPLING_DEFAULTS['toy'] has since moved to cfg 6), kept fixed here.
SAMPLING = dict(num_steps=8, cfg=5.0, guidance=0.9, cfg_ramp=False)


def build_model(table, row, seed):
    """The toy FlowAR with the change of one row; initialised like the released model
    (a diffusion row starts from the same weights as its flow row)."""
    torch.manual_seed(seed)
    if table == 4:
        return flowar.FlowAR.from_preset('toy', scales=[int(s) for s in row.split(',')])
    cls = {'image-pyramid': ImagePyramidFlowAR}.get(row, DiffusionFlowAR if row.endswith('-diffusion') else flowar.FlowAR)
    model = cls.from_preset('toy', scales=PYRAMID)  # the paper's full pyramid, not the toy's {1, 8}
    row = row.removesuffix('-diffusion')
    p = flowar.PRESETS['toy']
    if row not in ('spatial-adaln', 'per-scale', 'image-pyramid', 'latent-pyramid'):
        if row == 'per-token':
            model.flownet = TokenMLPHead(p['latent_channels'], p['head_dim'], p['head_depth'], p['ar_dim'])
        else:
            model.flownet = InjectionHead(row, p['latent_channels'], p['head_dim'], p['head_depth'],
                                          p['ar_dim'], p['mlp_ratio'], p['rope_theta'])
        torch.manual_seed(seed)
        model.initialize_weights('released')
    return model


# ---------------------------------------------------------------------------------------
# One row: train, sample, score
# ---------------------------------------------------------------------------------------

def train_row(model, ds, steps, seed, batch=64, lr=2e-3, log=print, pyramid=None):
    """The toy recipe of train.py, single process, for `steps` steps -> the EMA model.
    pyramid: image_pyramid_moments for ImagePyramidFlowAR."""
    rcfg = dict(seed=seed, label_drop=0.1, t_sampling='uniform')
    opt = torch.optim.AdamW(train.param_groups(model.named_parameters(), 0.02), lr=lr, betas=(0.9, 0.95))
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    spe = len(ds) // batch
    model.train()
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group['lr'] = train.lr_at(step / spe, lr, 1e-5, 0.1, steps / spe)
        order = train.epoch_order(len(ds), seed, step // spe)
        idx = order[(step % spe) * batch:(step % spe + 1) * batch].tolist()
        z, y, noise, t = train.make_batch(ds, idx, 0, rcfg, step, model.config, 'cpu')
        if pyramid is not None:
            z = image_pyramid_maps(pyramid, ds, idx, z, rcfg, step, model.scales)
        loss, _ = model(z, y, noise, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        train.update_ema(ema, model, train.ema_decay(0.999, step))
        if (step + 1) % 100 == 0 or step + 1 == steps:
            rate = (step + 1) * batch / (time.time() - t0)
            log(f"  step {step + 1}/{steps} loss {loss.item():.4f} {rate:.0f} img/s "
                f"ETA {(steps - step - 1) * batch / rate / 60:.1f} min")
    return ema


def run_row(table, row, seed, args, ds, vae, scale_factor, clf, ref, log=print):
    model = build_model(table, row, seed)
    pyramid = None if row != 'image-pyramid' else image_pyramid_moments(
        vae, ds, model.scales, args.data_dir, os.path.join(args.out, 'table3', 'image-pyramid-moments.pt'))
    t0 = time.time()
    ema = train_row(model, ds, args.steps, seed, log=log, pyramid=pyramid)
    t_train = time.time() - t0
    labels = np.arange(args.num_samples) % 10
    images = sample.sample_images(ema, vae, scale_factor, labels, seed=0, batch_size=100, **SAMPLING)
    t_sample = time.time() - t0 - t_train
    r = metrics.score(clf, images, labels, ref)
    grid = sample.make_grid(images[np.argsort(labels[:80], kind='stable')][:80], nrow=8)
    return dict(table=table, row=row, seed=seed, acc=r['acc'], fd=r['fd'], n=r['n'], steps=args.steps,
                params=sum(p.numel() for p in ema.parameters()), train_s=t_train, sample_s=t_sample,
                paper_fid=TABLES[table][row]), grid


def write_table(table, out, blur8_fd):
    """OUT/table<k>.md from the .json results found so far."""
    results = {}
    folder = os.path.join(out, f'table{table}')
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith('.json'):
            with open(os.path.join(folder, name)) as f:
                r = json.load(f)
            results.setdefault(r['row'], []).append(r)
    lines = [f"| row | paper's FID | seeds | classifier acc (per seed) | FD (per seed) | FD / blurred-8x8 | params | time per row |",
             "|---|---|---|---|---|---|---|---|"]
    for row, fid in TABLES[table].items():
        rs = results.get(row, [])
        if not rs:
            lines.append(f"| {PAPER_ROW.get(row, row)} | {fid} | 0 | not run | | | | |")
            continue
        acc, fd = [r['acc'] for r in rs], [r['fd'] for r in rs]
        lines.append(f"| {PAPER_ROW.get(row, row)} | {fid} | {len(rs)} | {statistics.mean(acc):.3f} "
                     f"({', '.join(f'{a:.3f}' for a in acc)}) | {statistics.mean(fd):.2f} "
                     f"({', '.join(f'{d:.2f}' for d in fd)}) | {statistics.mean(fd) / blur8_fd:.2f}x "
                     f"| {rs[0]['params'] / 1e6:.2f}M | {statistics.mean(r['train_s'] + r['sample_s'] for r in rs) / 60:.1f} min |")
    text = "\n".join(lines) + "\n"
    with data.atomic_file(os.path.join(out, f'table{table}.md')) as tmp, open(tmp, 'w') as f:
        f.write(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--table', type=int, required=True, choices=sorted(TABLES))
    p.add_argument('--rows', default='', help="rows to run, separated by ';' (default: all rows of the table)")
    p.add_argument('--seeds', default='0', help="comma-separated seeds")
    p.add_argument('--steps', type=int, default=1054,
                   help="optimizer steps per row (default: 1.35 epochs, the toy's budget when the tables were measured)")
    p.add_argument('--num-samples', type=int, default=2000, help="samples scored per row (a multiple of 10)")
    p.add_argument('--base', default='out/cifar-toy', help="a finished train.py run: its vae.pt and latents/")
    p.add_argument('--out', default='out/ablations')
    p.add_argument('--data-dir', default='data', help="CIFAR-10 for the classifier (metrics.py) and Table 3")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(';') if r.strip()] or list(TABLES[args.table])
    bad = [r for r in rows if r not in TABLES[args.table]]
    if bad:
        p.error(f"--rows: {bad} not in Table {args.table}; choose from {'; '.join(TABLES[args.table])}")
    try:
        seeds = [int(s) for s in args.seeds.split(',')]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.steps < 1 or args.num_samples < 10 or args.num_samples % 10:
        p.error("--steps must be >= 1 and --num-samples a positive multiple of 10")
    vae_path, cache = os.path.join(args.base, 'vae.pt'), os.path.join(args.base, 'latents')
    if not (os.path.isfile(vae_path) and os.path.isdir(cache)):
        p.error(f"{args.base} has no vae.pt and latents/: run `python train.py --out {args.base}` first")
    vae, scale_factor = vae_lib.load_vae(vae_path)
    ds = data.LatentDataset(cache, vae_fingerprint=data.vae_fingerprint(vae))
    if not os.path.isfile(metrics.DEFAULT_CLASSIFIER):
        metrics.build_classifier(metrics.DEFAULT_CLASSIFIER, args.data_dir)
    clf, ck = metrics.load_classifier(metrics.DEFAULT_CLASSIFIER)
    ref = (ck['ref_mu'].numpy(), ck['ref_sigma'].numpy())
    blur8 = ck['calibration']['real, blurred 8x8']['fd']
    folder = os.path.join(args.out, f'table{args.table}')
    os.makedirs(folder, exist_ok=True)
    for row in rows:
        for seed in seeds:
            stem = os.path.join(folder, f"{row.replace(',', '-')}-seed{seed}")
            if os.path.isfile(stem + '.json'):
                print(f"[ablations] Table {args.table} row {row} seed {seed}: done, skipped")
                continue
            print(f"[ablations] Table {args.table} row {row} seed {seed}: {args.steps} steps", flush=True)
            result, grid = run_row(args.table, row, seed, args, ds, vae, scale_factor, clf, ref)
            Image.fromarray(grid).save(stem + '.png')
            with data.atomic_file(stem + '.json') as tmp, open(tmp, 'w') as f:
                json.dump(result, f, indent=1)
            print(f"[ablations] row {row} seed {seed}: acc {result['acc']:.3f} FD {result['fd']:.2f} "
                  f"({(result['train_s'] + result['sample_s']) / 60:.1f} min)", flush=True)
    print(write_table(args.table, args.out, blur8))


if __name__ == '__main__':
    data.keep_freed_memory()  # CPU: reuse freed memory instead of page-faulting it back in
    main()
