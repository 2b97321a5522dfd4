"""
The paper's ablations (Sec. 4.2, Tables 3-6) as experiments on the CPU toy, each row one
command, scored with the project's own metric (metrics.py). Results: docs/ablations.md.

    python train.py                                   # once: the toy's VAE and latent cache
    python ablations.py --table 6                     # every row of Table 6, seed 0
    python ablations.py --table 6 --seeds 0,1         # two seeds
    python ablations.py --table 4 --rows 1,4,8        # one row
    python ablations.py --table 6 --steps 300         # a shorter budget per row
    python ablations.py --table 3 --data-dir DIR      # Table 3 also reads the CIFAR-10 images

Every row trains the toy FlowAR (flowar.PRESETS['toy'], with the full pyramid of scales
PYRAMID = {1,2,4,8} in Tables 3, 5 and 6, not the toy recipe's {1,8}) with exactly one
change, from scratch, on the latent cache of a finished `python train.py` run (--base: its
vae.pt and latents/), for --steps optimizer steps, through train.py's own training loop and
recipe (row_recipe: train.PRESETS['cifar-toy'] with RECIPE_OVERRIDES); then samples
--num-samples class-balanced images with fixed settings (SAMPLING) from the EMA weights and
scores them (classifier accuracy, Frechet distance). It writes
    OUT/table<k>/<row>-seed<s>/       the row's run folder (ckpt.pt, log.jsonl): an
                                      interrupted row resumes from its checkpoint
    OUT/table<k>/<row>-seed<s>.json   the result (accuracy, FD, training and sampling time)
    OUT/table<k>/<row>-seed<s>.png    a grid, one row per class
    OUT/table<k>.md                   the table: each row's metric, mean over the seeds
                                      done so far, the paper's FID for the same row
Rows already done (their .json exists) are not run again.

The rows (in the paper's words, Sec. 4.2), in file order after the shared pieces:
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
                     as DDPM epsilon-predictors (DiffusionFlowAR): x_t = sqrt(abar(t)) x +
                     sqrt(1 - abar(t)) eps, target eps (Ho et al. 2020, Eq. 14), the cosine
                     schedule abar(t) = f(t) / f(0), f(t) = cos^2((t + 0.008) / 1.008 * pi / 2)
                     (Nichol & Dhariwal 2021, Eq. 17) in continuous t in [0, 1], t = 1 noise, so
                     the head's time embedding, training t and sampling grid are the flow rows'.
                     Sampling: deterministic DDIM (Song et al. 2021, Eq. 12, sigma = 0) on the
                     flow sampler's time grid, CFG applied to the epsilons. abar is clipped
                     below at ABAR_MIN, Stable Diffusion's terminal abar: from zero signal an
                     epsilon says nothing about x (Lin et al. 2024), and DDIM's first step
                     multiplies the head's error by sqrt(abar(t_2) / abar(1)); the clip was
                     chosen by a probe (docs/ablations.md, "ABAR_MIN").
  Table 4, the scale list (the 8x8 toy latent in place of 16x16):
    1,2,4,8 (the full pyramid, as {1,2,4,8,16}), 1,4,8 (as {1,4,8,16}), 1,8 (as {1,4,16}:
    fewer and coarser steps; the toy recipe's list).
  Table 3, where the coarse token maps come from:
    latent-pyramid   area-downsampled latent, Eq. 5 (the model of flowar.py, unchanged)
    image-pyramid    s^i = the VAE encoding of the image area-downsampled to f*h_i x f*w_i
                     pixels (f = 4), times the VAE scale factor (ImagePyramidFlowAR). Only
                     training changes; sampling decodes the finest map as usual. The coarse
                     images' posterior moments are encoded once (image_pyramid_moments), and
                     drawn with make_batch's own randomness (image_pyramid_maps).
"""

import argparse
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
# The heads that replace flowar.FlowHead (same call: (x, t, s_hat, pos) -> velocity)
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

    def forward(self, x, t, s_hat, pos):
        N = x.shape[1]
        t_emb = self.time_embed(t)[:, None]                                   # (B, 1, W)
        c = torch.zeros_like(t_emb)                                           # no spatial condition
        if self.injection == 'channel-concat':
            h = self.input_proj(torch.cat([x, s_hat], dim=-1))            # (B, N, W)
        else:
            h = self.input_proj(x)
        if self.injection == 'addition':
            h = h + self.cond_embed(s_hat)
        elif self.injection == 'adaln':
            c = self.cond_embed(s_hat).mean(dim=1, keepdim=True)          # (B, 1, W): pooled
        elif self.injection == 'sequence-concat':
            h = torch.cat([h, self.cond_embed(s_hat)], dim=1)             # (B, 2N, W)
            pos = torch.cat([pos, pos])                                       # same positions
        for block in self.res_blocks:
            h = block(h, t_emb, c, pos, s_hat) if self.injection == 'cross-attention' else block(h, t_emb, c, pos)
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

    def forward(self, x, t, s_hat, pos):
        c = self.cond_embed(s_hat) + self.time_embed(t)[:, None]         # (B, N, W)
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

    @staticmethod
    def interpolate(x, eps, t):
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


def image_pyramid_maps(moments, ds, idx, z, rcfg, step, scales, global_offset=0):
    """The token maps of the batch `idx` (positions global_offset.. of the global batch) for
    ImagePyramidFlowAR: make_batch's posterior sample z (B, C, H, W) at the finest scale; at
    scale i, (mean_i + std_i * r * Down(eps, r)) times the scale factor, with make_batch's
    posterior draw eps and flip (sample_randomness)."""
    maps = [[] for _ in scales[:-1]]
    for j, k in enumerate(idx):
        flip, eps, *_ = train.sample_randomness(rcfg['seed'], step, global_offset + j, tuple(z.shape[1:]),
                                                len(scales), scales, rcfg['t_sampling'])
        for i, (h, w) in enumerate(scales[:-1]):
            mean, logvar = moments[i][k, flip % moments[i].shape[1]].chunk(2, dim=0)
            e = F.interpolate(eps[None], size=(h, w), mode='area')[0] * math.sqrt(eps[0].numel() / (h * w))
            maps[i].append((mean + torch.exp(0.5 * logvar) * e) * ds.scale_factor)
    return [torch.stack(m) for m in maps] + [z]


def image_pyramid_inputs(moments):
    """train.make_batch for Table 3's image pyramid: the same inputs, with the latent z
    replaced by its token maps (image_pyramid_maps). Passed to train.train as make_inputs."""
    def make_inputs(ds, indices, global_offset, cfg, step, model_cfg, device):
        z, labels, noise, t = train.make_batch(ds, indices, global_offset, cfg, step, model_cfg, device)
        maps = image_pyramid_maps(moments, ds, indices, z.cpu(), cfg, step,
                                  flowar.normalize_scales(model_cfg['scales']), global_offset)
        return [m.to(device) for m in maps], labels, noise, t
    return make_inputs


# Tables 3, 5 and 6 vary one part of the paper's model, with the full pyramid of scales
# (the 8x8 toy latent's equivalent of {1,2,4,8,16}). The toy recipe itself uses {1, 8}, which
# scores best at its budget (docs/toy.md, "Scale list").
PYRAMID = (1, 2, 4, 8)

# Every row trains with the toy recipe of train.py (row_recipe), except where the recipe has
# moved on since the tables of docs/ablations.md were measured: these values are the ones
# they were measured with (the toy now trains with Muon, logit-normal t and precision auto).
RECIPE_OVERRIDES = dict(optimizer='adamw', t_sampling='uniform', precision='fp32')

# The sampling settings every row is scored with, fixed: the toy's defaults when the tables
# were measured (flowar.SAMPLING_DEFAULTS['toy'] has moved on since).
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
            model.flownet = TokenMLPHead(p['latent_channels'], p['head_width'], p['head_depth'], p['ar_dim'])
        else:
            model.flownet = InjectionHead(row, p['latent_channels'], p['head_width'], p['head_depth'],
                                          p['ar_dim'], p['mlp_ratio'], p['rope_theta'])
        torch.manual_seed(seed)
        model.initialize_weights('released')
    return model


# ---------------------------------------------------------------------------------------
# One row: train, sample, score
# ---------------------------------------------------------------------------------------

def row_recipe(steps, seed, out, num_latents):
    """The recipe of a row: the toy's own (train.PRESETS['cifar-toy'], so a change to it
    reaches the rows), with RECIPE_OVERRIDES, `seed`, and a schedule of `steps` steps (the
    warm-up + cosine ends at the last one). The run folder `out` gets the row's ckpt.pt and
    log.jsonl: an interrupted row resumes."""
    cfg = dict(train.PRESETS['cifar-toy'], **RECIPE_OVERRIDES, seed=seed, out=out, device='cpu',
               max_steps=steps, log_every=100)
    cfg['epochs'] = steps / (num_latents // cfg['batch_size'])
    return cfg


def train_row(model, ds, cfg, make_inputs=train.make_batch):
    """Train `model` with train.py's own loop (train.train), single process -> the EMA model.
    make_inputs: train.make_batch, or image_pyramid_inputs(...) for ImagePyramidFlowAR."""
    run = train.setup_distributed(cfg)
    state = train.new_state(model, cfg, cfg['lr'], run.device)
    record = dict(cfg, model=model.config, vae_fingerprint=ds.header['vae_fingerprint'])
    train.resume(run, state, record)
    train.train(cfg, run, state, ds, record=record, make_inputs=make_inputs)
    return state.ema


def run_row(table, row, seed, args, ds, vae, scale_factor, clf, ref, out):
    """Train, sample and score one row (seed `seed`, run folder `out`) -> (result, grid)."""
    model = build_model(table, row, seed)
    make_inputs = train.make_batch
    if row == 'image-pyramid':
        make_inputs = image_pyramid_inputs(image_pyramid_moments(
            vae, ds, model.scales, args.data_dir, os.path.join(args.out, 'table3', 'image-pyramid-moments.pt')))
    t0 = time.time()
    ema = train_row(model, ds, row_recipe(args.steps, seed, out, len(ds)), make_inputs)
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
            result, grid = run_row(args.table, row, seed, args, ds, vae, scale_factor, clf, ref, out=stem)
            Image.fromarray(grid).save(stem + '.png')
            with data.atomic_file(stem + '.json') as tmp, open(tmp, 'w') as f:
                json.dump(result, f, indent=1)
            print(f"[ablations] row {row} seed {seed}: acc {result['acc']:.3f} FD {result['fd']:.2f} "
                  f"({(result['train_s'] + result['sample_s']) / 60:.1f} min)", flush=True)
    print(write_table(args.table, args.out, blur8))


if __name__ == '__main__':
    data.keep_freed_memory()  # CPU: reuse freed memory instead of page-faulting it back in
    main()
