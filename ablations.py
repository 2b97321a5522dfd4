"""
The paper's ablations (Sec. 4.2, Tables 4-6) as experiments on the CPU toy, each row one
command, scored with the project's own metric (metrics.py).

    python train.py                                   # once: the toy's VAE and latent cache
    python ablations.py --table 6                     # every row of Table 6, seed 0
    python ablations.py --table 6 --seeds 0,1         # two seeds
    python ablations.py --table 4 --rows 1,4,8        # one row
    python ablations.py --table 6 --steps 300         # a shorter budget per row

Every row trains the toy FlowAR (flowar.PRESETS['toy']) with exactly one change, from
scratch, on the latent cache of a finished `python train.py` run (--base: its vae.pt and
latents/), for --steps optimizer steps of the toy recipe (batch 64, AdamW lr 2e-3 with
warm-up and cosine, EMA 0.999 with warm-up, label drop 0.1; the randomness of train.py);
then samples --num-samples class-balanced images with the toy's sampling defaults from
the EMA weights and scores them (classifier accuracy, Frechet distance). It writes
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
  Table 5, per-token vs per-scale head, flow matching:
    per-token        MAR's head: an MLP with adaLN from t + the token's own semantics,
                     every token denoised on its own (no attention among the tokens)
    per-scale        the FlowAR head (flowar.FlowHead)
    The diffusion rows of Table 5 are not implemented here.
  Table 4, the scale list (the 8x8 toy latent in place of 16x16):
    1,2,4,8 (the toy's, as {1,2,4,8,16}), 1,4,8 (as {1,4,8,16}), 1,8 (as {1,4,16}: fewer
    and coarser steps).
  Table 3 (pyramid from downsampled images) is not implemented.
"""

import argparse
import copy
import json
import os
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
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
    5: {'per-token': 6.15, 'per-scale': 3.61},                    # flow-matching rows
    4: {'1,2,4,8': 3.61, '1,4,8': 4.88, '1,8': 6.10},
}
PAPER_ROW = {'1,2,4,8': '{1,2,4,8} (paper: {1,2,4,8,16})', '1,4,8': '{1,4,8} (paper: {1,4,8,16})',
             '1,8': '{1,8} (paper: {1,4,16})'}


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


def build_model(table, row, seed):
    """The toy FlowAR with the change of one row; initialised like the released model."""
    torch.manual_seed(seed)
    if table == 4:
        return flowar.FlowAR.from_preset('toy', scales=[int(s) for s in row.split(',')])
    model = flowar.FlowAR.from_preset('toy')
    p = flowar.PRESETS['toy']
    if row not in ('spatial-adaln', 'per-scale'):
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

def train_row(model, ds, steps, seed, batch=64, lr=2e-3, log=print):
    """The toy recipe of train.py, single process, for `steps` steps -> the EMA model."""
    rcfg = dict(seed=seed, label_drop=0.1, t_sampling='uniform')
    opt = torch.optim.AdamW(train.param_groups(model, 0.02), lr=lr, betas=(0.9, 0.95))
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
    t0 = time.time()
    model = build_model(table, row, seed)
    ema = train_row(model, ds, args.steps, seed, log=log)
    t_train = time.time() - t0
    labels = np.arange(args.num_samples) % 10
    sd = flowar.SAMPLING_DEFAULTS['toy']
    images = sample.sample_images(ema, vae, scale_factor, labels, seed=0, batch_size=100, **sd)
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
    p.add_argument('--steps', type=int, default=1054, help="optimizer steps per row (default: the toy's 1.35 epochs)")
    p.add_argument('--num-samples', type=int, default=2000, help="samples scored per row (a multiple of 10)")
    p.add_argument('--base', default='out/cifar-toy', help="a finished train.py run: its vae.pt and latents/")
    p.add_argument('--out', default='out/ablations')
    p.add_argument('--data-dir', default='data', help="CIFAR-10 for the classifier (metrics.py)")
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
    main()
