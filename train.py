"""
Train FlowAR. One file, from a CPU toy run to multi-GPU ImageNet.

    python train.py                                   # CPU toy: CIFAR-10 -> VAE -> latents -> FlowAR -> samples
    python train.py --preset imagenet-S --data-dir /path/imagenet/train --vae kl16.ckpt
    torchrun --nproc_per_node=8 train.py --preset imagenet-S ...       # one node
    torchrun --nnodes=4 --nproc_per_node=8 --node_rank=$RANK --master_addr=$ADDR --master_port=29500 \
        train.py --preset imagenet-S ...                                # several nodes

The pipeline has stages, and each one is skipped when its output already exists in --out:
    1. data       CIFAR-10 (downloaded by data.py when absent), procedural shapes, or an
                  ImageNet-style folder
    2. VAE        the small 'cifar' KL VAE is trained when no --vae is given (OUT/vae.pt)
    3. latents    every image is encoded once (and its mirror image with --cache-flips)
                  into OUT/latents/
    4. FlowAR     trained on the cached latents; OUT/ckpt.pt is written every --ckpt-every
                  steps and at the end; rerunning the same command resumes from it
    5. samples    a class-conditional grid (one row per class) from the EMA weights:
                  OUT/samples.png

A run folder:
    out/cifar-toy/
      vae.pt                the small VAE (weights, config, latent scale factor)
      vae_train_state.pt    its resumable training state; vae_recon.png: test images, reconstructions
      latents/              moments.npy (N, P, 2C, h, w) memmap (P = 1 plain, 2 with --cache-flips), labels.npy, header.json, done.npy
      ckpt.pt               model, EMA, optimizers, step, epoch, config, RNG states (loads with weights_only=True)
      log.jsonl             one JSON line per log step: loss, per-scale losses, lr, grad norm, img/s, ETA
      samples.png           the class-conditional grid (samples_<step>.png with --sample-every)
    out/ablations/table<k>/<row>-seed<s>/   an ablation row's ckpt.pt, log.jsonl (resumes); its .json, .png beside

Single process vs torchrun is decided by one thing: is RANK in the environment (as in
nanoGPT). Only rank 0 logs, samples and writes checkpoints.

Reproducibility. All randomness of a training step (which latent of a pair, the posterior
sample, t, the flow noise, label dropout) is drawn per *sample* from a generator seeded by
(seed, step, global index of the sample in the batch). So a run gives the same numbers
whatever the number of ranks or gradient-accumulation steps, and a resumed run continues
exactly as if it had never stopped (the data order is a function of (seed, epoch)).

In file order: the presets and the command line; the small pieces (lr_at, resolve_precision,
the optimizers, the EMA, the per-sample randomness, make_batch); stages 1-3 and 5; main,
TrainState and train, the one training loop (ablations.py trains its rows with it too), and
forward_backward; the machinery of processes (DDP) and checkpoints.
"""

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import flowar
import vae as vae_lib

# ---------------------------------------------------------------------------------------
# Presets. Every value can be overridden on the command line: --batch-size 1024 etc.
# ---------------------------------------------------------------------------------------

_IMAGENET = dict(
    dataset='imagenet', data_dir='', vae='', image_size=256, subset=0,
    batch_size=2048,            # global batch (paper)
    blr=5e-5, lr=0.0,           # lr = blr * batch_size / 256 = 4e-4 unless --lr is given
    min_lr=1e-5, epochs=400.0, warmup_epochs=100.0, max_steps=0,
    optimizer='adamw', weight_decay=0.02, beta1=0.9, beta2=0.95, grad_clip=3.0, ema=0.9999, label_drop=0.1,
    grad_ckpt=False, precision='fp32', compile=False, scale_weighting='tokens',
    init='released', t_sampling='uniform', vae_max_steps=0, vae_batch_size=64, vae_optimizer='adam',
    cache_batch_size=64,
    cache_flips=True, pos_embed='learned', scale_lists='fixed',
    log_every=100, ckpt_every=5000, sample_every=0, num_sample_classes=10,
    seed=0, device='',
)

# The CPU toy: a 1.9M-parameter FlowAR on 4x8x8 latents of a small VAE trained here, sized
# for a short run on 2 CPU cores: the VAE (2,800 steps of batch 16, Muon; more updates on the
# same images beat bigger batches), the latent cache (no flipped copies), FlowAR (2.5 epochs,
# scales {1, 8}, logit-normal t, Muon). Each choice and its measurement: docs/toy.md; the
# time of each stage per CPU: docs/speed.md.
_TOY = dict(
    model='toy', dataset='cifar10', data_dir='data', out='out/cifar-toy', vae='',
    image_size=32, subset=0, batch_size=64, micro_batch=0,
    blr=0.0, lr=2e-3, min_lr=1e-5, epochs=2.5, warmup_epochs=0.1, max_steps=0,
    optimizer='muon', weight_decay=0.02, beta1=0.9, beta2=0.95, grad_clip=3.0, ema=0.999, label_drop=0.1,
    grad_ckpt=False, precision='auto', compile=False, scale_weighting='tokens',
    init='released', t_sampling='logit-normal', vae_max_steps=2800, vae_batch_size=16, vae_optimizer='muon',
    cache_batch_size=256,
    cache_flips=False, pos_embed='learned', scale_lists='fixed',
    log_every=50, ckpt_every=500, sample_every=0, num_sample_classes=10,
    seed=0, device='',
)

PRESETS = {
    'cifar-toy': _TOY,
    # The smoke run: every stage of the toy end to end (VAE, latent cache, FlowAR, grid) in a
    # few minutes on 2 CPU cores, to check an install or walk through the pipeline in a lab:
    # 4,000 images, 700 VAE steps (the VAE's colour comes between 500 and 700), 600 FlowAR
    # steps of batch 16 (more steps beat bigger batches this short). Its grid shows colours
    # and layouts, not objects. `--dataset shapes`: the same, no download. Its time and
    # score: docs/speed.md, "Smoke run".
    # The toy with scale-free position embeddings and a random scale list every step
    # (FlexVAR's recipe on the 8x8 latent, draw_scale_list): one model for any list at
    # inference (sample.py --scales) and for zero-shot editing; docs/flexible.md.
    'cifar-toy-flex': dict(_TOY, out='out/cifar-toy-flex', pos_embed='scale-free', scale_lists='random'),
    'cifar-smoke': dict(_TOY, out='out/cifar-smoke', subset=4000, vae_max_steps=700, batch_size=16,
                        epochs=2.4, log_every=100),
    # ImageNet 256x256 with the MAR KL-16 VAE (--vae kl16.ckpt): the paper's recipe.
    # micro_batch = per-GPU batch per forward; gradient accumulation fills the rest.
    'imagenet-S': dict(_IMAGENET, model='S', out='out/imagenet-S', micro_batch=64),
    'imagenet-B': dict(_IMAGENET, model='B', out='out/imagenet-B', micro_batch=64),
    'imagenet-L': dict(_IMAGENET, model='L', out='out/imagenet-L', micro_batch=64, grad_ckpt=True),
    'imagenet-H': dict(_IMAGENET, model='H', out='out/imagenet-H', micro_batch=32, grad_ckpt=True),
}

HELP = {
    'model': 'FlowAR preset (flowar.PRESETS): toy, S, B, L, H',
    'dataset': 'cifar10, shapes (procedural, no download) or imagenet (class folders)',
    'data_dir': 'cifar10: folder for cifar-10-batches-py/ (downloaded if absent); imagenet: the train/ folder',
    'out': 'output folder: vae.pt, latents/, ckpt.pt, log.jsonl, samples.png',
    'vae': 'VAE checkpoint (this project\'s or MAR kl16.ckpt); empty = train the small cifar VAE',
    'image_size': 'image resolution (32 for CIFAR/shapes, 256 for ImageNet)',
    'subset': 'use only the first N training images (0 = all; for smoke tests)',
    'batch_size': 'global batch size (all ranks and accumulation steps together)',
    'micro_batch': 'per-rank batch of one forward pass; 0 = batch_size / world_size (no accumulation)',
    'blr': 'base lr per 256 images: lr = blr * batch_size / 256 (used when --lr is 0)',
    'lr': 'peak learning rate (0 = from --blr)',
    'min_lr': 'final learning rate of the cosine schedule',
    'epochs': 'length of the lr schedule in epochs (warm-up + cosine)',
    'warmup_epochs': 'linear warm-up in epochs',
    'max_steps': 'stop the FlowAR stage after this many optimizer steps (0 = run all epochs)',
    'optimizer': "'adamw' (paper) or 'muon' (Muon on the blocks' weight matrices, AdamW on the rest; see make_optimizers)",
    'weight_decay': 'AdamW weight decay (not on 1-D parameters and biases)',
    'beta1': 'AdamW beta1', 'beta2': 'AdamW beta2',
    'grad_clip': 'clip the gradient norm to this (0 = off)',
    'ema': 'EMA decay of the weights used for sampling (reached after a warm-up, see ema_decay)',
    'label_drop': 'probability of replacing the label by the null class (for CFG)',
    'grad_ckpt': 'gradient checkpointing of the AR blocks (saves memory for L and H)',
    'precision': "training steps (VAE and FlowAR) in fp32 or bf16 autocast (the authors report NaNs with mixed "
                 "precision); 'auto': bf16 where the device computes it natively, else fp32 (resolve_precision)",
    'compile': 'torch.compile the model',
    'scale_weighting': "loss weight of each scale: 'tokens' (released, h*w / (H*W)) or 'uniform' (Eq. 9's plain sum)",
    'pos_embed': "FlowAR's position embeddings: 'learned' (released; one per token of the training scale list) or 'scale-free' (one table on the finest grid, resized to any scale list)",
    'scale_lists': "'fixed' (the model's scale list every step) or 'random' (a random list every step: 1, some sizes between, the latent size; needs --pos-embed scale-free)",
    'init': "weight init: 'released' (xavier everywhere) or 'adaln-zero' (DiT: zero adaLN and output layers)",
    't_sampling': "training time steps t per scale: 'uniform' (released) or 'logit-normal' (sigmoid of N(0, 1), SD3)",
    'vae_max_steps': 'training steps of the small VAE (toy pipeline, when no --vae is given)',
    'vae_batch_size': 'batch size of the VAE training',
    'vae_optimizer': "'adam', or 'muon': Muon on the VAE's inner convolutions, Adam on the rest (vae.make_vae_optimizers)",
    'cache_batch_size': 'batch size when encoding images into the latent cache',
    'cache_flips': 'also cache the latents of the horizontally flipped images (flip augmentation; 2x the encoding time)',
    'log_every': 'steps between log lines', 'ckpt_every': 'steps between checkpoints',
    'sample_every': 'steps between sample grids (0 = only at the end)',
    'num_sample_classes': 'rows (classes) of the sample grid',
    'seed': 'random seed (data order, init, noise)',
    'device': 'cpu, cuda, cuda:1 ... (empty = cuda if available, else cpu)',
}


def parse_args(argv=None):
    """Two passes: --preset picks the defaults, then every field can be overridden."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--preset', default='cifar-toy')
    known, _ = pre.parse_known_args(argv)
    if known.preset not in PRESETS:
        pre.error(f"unknown --preset {known.preset!r}; choose one of {', '.join(PRESETS)}")
    defaults = PRESETS[known.preset]
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--preset', default='cifar-toy', choices=list(PRESETS), help='recipe whose values are the defaults below')
    for key, value in defaults.items():
        flag = '--' + key.replace('_', '-')
        if isinstance(value, bool):
            p.add_argument(flag, default=value, action=argparse.BooleanOptionalAction, help=HELP.get(key, key))
        else:
            p.add_argument(flag, default=value, type=type(value), help=HELP.get(key, key))
    args = p.parse_args(argv)
    cfg = vars(args)
    # Refuse bad values with a message rather than failing later.
    checks = [
        (cfg['model'] in flowar.PRESETS, f"--model must be one of {sorted(flowar.PRESETS)}"),
        (cfg['dataset'] in ('cifar10', 'shapes', 'imagenet'), "--dataset must be cifar10, shapes or imagenet"),
        (cfg['batch_size'] > 0, "--batch-size must be > 0"),
        (cfg['micro_batch'] >= 0, "--micro-batch must be >= 0"),
        (cfg['lr'] >= 0 and cfg['blr'] >= 0 and (cfg['lr'] > 0 or cfg['blr'] > 0), "give --lr > 0 or --blr > 0"),
        (cfg['min_lr'] >= 0, "--min-lr must be >= 0"),
        (cfg['epochs'] > 0, "--epochs must be > 0"),
        (0 <= cfg['warmup_epochs'] <= cfg['epochs'], "--warmup-epochs must be in [0, epochs]"),
        (cfg['max_steps'] >= 0, "--max-steps must be >= 0"),
        (cfg['subset'] >= 0, "--subset must be >= 0"),
        (0 <= cfg['ema'] < 1, "--ema must be in [0, 1)"),
        (0 <= cfg['label_drop'] < 1, "--label-drop must be in [0, 1)"),
        (cfg['grad_clip'] >= 0, "--grad-clip must be >= 0"),
        (cfg['precision'] in ('fp32', 'bf16', 'auto'), "--precision must be fp32, bf16 or auto"),
        (cfg['scale_weighting'] in ('tokens', 'uniform'), "--scale-weighting must be tokens or uniform"),
        (cfg['init'] in ('released', 'adaln-zero'), "--init must be released or adaln-zero"),
        (cfg['pos_embed'] in ('learned', 'scale-free'), "--pos-embed must be learned or scale-free"),
        (cfg['scale_lists'] in ('fixed', 'random'), "--scale-lists must be fixed or random"),
        (cfg['scale_lists'] == 'fixed' or cfg['pos_embed'] == 'scale-free',
         "--scale-lists random needs --pos-embed scale-free (learned embeddings fix the list)"),
        (cfg['t_sampling'] in ('uniform', 'logit-normal'), "--t-sampling must be uniform or logit-normal"),
        (cfg['optimizer'] in ('adamw', 'muon'), "--optimizer must be adamw or muon"),
        (cfg['vae_max_steps'] >= 0, "--vae-max-steps must be >= 0"),
        (cfg['vae_optimizer'] in ('adam', 'muon'), "--vae-optimizer must be adam or muon"),
        (cfg['log_every'] > 0 and cfg['ckpt_every'] > 0 and cfg['sample_every'] >= 0,
         "--log-every and --ckpt-every must be > 0, --sample-every >= 0"),
        (cfg['dataset'] != 'imagenet' or (cfg['data_dir'] and cfg['vae']),
         "ImageNet needs --data-dir /path/to/imagenet/train and --vae /path/to/kl16.ckpt"),
        (not cfg['vae'] or os.path.isfile(cfg['vae']),
         f"--vae {cfg['vae']!r}: no such file (a vae.pt of `python vae.py`, or MAR's kl16.ckpt)"),
    ]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    return cfg


# ---------------------------------------------------------------------------------------
# Small pieces, each tested in tests/test_train.py
# ---------------------------------------------------------------------------------------

def lr_at(x, lr, min_lr, warmup, end):
    """The one learning-rate schedule of the project, for both stages (FlowAR here, where x
    is the fractional epoch step / steps_per_epoch, so the lr changes every step; the VAE in
    vae.train_vae, where x counts steps): linear warm-up from 0 to `lr` over `warmup`, then
    half a cosine from `lr` down to `min_lr` at `end`, and `min_lr` after it. The paper's
    FlowAR recipe is 100 warm-up + 300 cosine epochs, 4e-4 -> 1e-5."""
    if x < warmup:
        return lr * x / warmup
    if x >= end:
        return min_lr
    progress = (x - warmup) / max(end - warmup, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def native_bf16(device):
    """Does `device` multiply bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or
    AMX)? Elsewhere bf16 is emulated, slower than fp32 (docs/speed.md, "bf16 on the CPU")."""
    if torch.device(device).type == 'cuda':
        return torch.cuda.is_bf16_supported()
    # torch's private CPU probes; a torch version without them cannot tell, and gets False
    probe = lambda name: getattr(torch.cpu, name, lambda: False)()
    return bool(probe('_is_avx512_bf16_supported') or probe('_is_amx_tile_supported'))


def resolve_precision(precision, device):
    """The training steps' precision, for both stages (and the latent cache's encoding):
    'fp32', 'bf16' (torch.autocast), or 'auto' = bf16 where the device has native_bf16,
    else fp32."""
    if precision not in ('fp32', 'bf16', 'auto'):
        raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
    if precision != 'auto':
        return precision
    return 'bf16' if native_bf16(device) else 'fp32'


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024), the optimizer of the toy's matrices in both stages: Nesterov
    momentum, then the update orthogonalised by five Newton-Schulz steps, decoupled weight
    decay, and Moonshot's 'match_rms_adamw' scale 0.2 * sqrt(max(rows, cols)), which gives the
    update the RMS of an AdamW update, so one lr and schedule drive Muon and AdamW. It
    computes torch.optim.Muon's steps (bit for bit in bf16), with two additions: convolution
    kernels (out, in, k, k) are orthogonalised as (out, in*k*k) matrices, and weights of one
    shape as one stack. ns_dtype: the Newton-Schulz precision; default bf16 (Keller Jordan's
    and torch's) where the device has native_bf16, else fp32, because emulated bf16 costs a
    CPU without it most of the optimizer step (docs/speed.md, "Muon")."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95, ns_dtype=None):
        params = list(params)
        if ns_dtype is None:
            ns_dtype = torch.bfloat16 if params and native_bf16(params[0].device) else torch.float32
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self.ns_dtype = ns_dtype

    @staticmethod
    def orthogonalize(g, dtype=torch.bfloat16, steps=5, eps=1e-7):
        """The quintic Newton-Schulz iteration X -> aX + (bA + cA^2)X, A = XX^T, which pushes
        the singular values of g / |g| towards 1 (to about 0.7-1.2); torch.optim.Muon's
        coefficients and order of operations. g: (n, r, c), a stack, each matrix on its own."""
        a, b, c = 3.4445, -4.7750, 2.0315
        x = g.to(dtype)
        tall = x.shape[-2] > x.shape[-1]
        x = x.mT if tall else x                                        # (n, short, long)
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            A = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(A, A, A, beta=b, alpha=c), x, beta=a)
        return x.mT if tall else x

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            m, lr, same_shape = group['momentum'], group['lr'], {}
            for p in group['params']:
                if p.grad is not None:
                    same_shape.setdefault(p.shape, []).append(p)
            for ps in same_shape.values():
                bufs = [self.state[p].setdefault('momentum_buffer', torch.zeros_like(p)) for p in ps]
                for p, buf in zip(ps, bufs):
                    buf.lerp_(p.grad, 1 - m)
                u = torch.stack([p.grad.lerp(buf, m) for p, buf in zip(ps, bufs)]).flatten(2)  # (n, out, in*k*k)
                o = self.orthogonalize(u, self.ns_dtype)
                for p, o_p in zip(ps, o):
                    p.mul_(1 - lr * group['weight_decay'])
                    p.add_(o_p.view_as(p), alpha=-(lr * (0.2 * math.sqrt(max(u.shape[1:])))))  # torch's rounding


def param_groups(named_parameters, weight_decay):
    """AdamW groups: no weight decay on 1-D parameters (norm weights) and biases."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith('.bias') else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def make_optimizers(model, cfg, lr, fused=False):
    """[AdamW] (the paper), or for --optimizer muon [Muon, AdamW]: Muon (above) on the 2-D
    weights of the transformer blocks, AdamW on the rest (embeddings, input and output maps,
    norms, biases).
    TOY DEVIATION: the paper trains with AdamW; the toy uses Muon, which reaches a lower
    loss and FD in its budget (docs/toy.md, "Optimizer"); the ImageNet presets keep AdamW."""
    adamw = lambda params: torch.optim.AdamW(param_groups(params, cfg['weight_decay']), lr=lr,
                                             betas=(cfg['beta1'], cfg['beta2']), fused=fused)
    if cfg['optimizer'] == 'adamw':
        return [adamw(model.named_parameters())]
    is_muon = lambda name, p: p.ndim == 2 and 'blocks.' in name
    params = list(model.named_parameters())
    return [Muon([p for n, p in params if is_muon(n, p)], lr=lr, weight_decay=cfg['weight_decay']),
            adamw([(n, p) for n, p in params if not is_muon(n, p)])]


def ema_decay(decay, step):
    """The EMA decay used at optimizer step `step` (0, 1, 2, ...): min(decay, (1 + step) /
    (10 + step)), the warm-up of TensorFlow's ExponentialMovingAverage(num_updates=step).

    Why: the EMA starts from the random initial weights, and with a constant decay d their
    share after T steps is d^T (0.999^1405 = 0.25: after 1,405 steps a quarter of the
    sampled model would still be noise). With the warm-up the share is prod_t (1 + t) /
    (10 + t) ~ 9! / T^9, negligible after a few dozen steps, and the average covers roughly
    the last 10% of the steps until the warm-up reaches `decay` (step 8,990 for 0.999,
    89,990 for 0.9999). The ImageNet recipe (0.9999, 250k steps) is unchanged in effect: its
    last 160k steps run at 0.9999, which leaves 0.9999^160000 ~ 1e-7 of the warm-up period.
    Neither the paper nor the released code warms up the EMA (they train 400 epochs).
    """
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def epoch_order(n, seed, epoch):
    """The data order of one epoch: a permutation that depends only on (seed, epoch), so
    a resumed run (or a run with another number of ranks) sees the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def sample_randomness(seed, step, global_index, latent_shape, num_scales, scales, t_sampling='uniform'):
    """Everything random about one training sample at one step, from its own generator:
    flip (pick plain or flipped moments), posterior eps, t per scale, flow noise per scale,
    and the label-dropout draw. t is uniform on [0, 1] (paper and released code) or
    logit-normal, sigmoid(n) with n ~ N(0, 1) (Esser et al. 2024, SD3, Sec. 3.1), which
    puts more training on the middle of the path."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + global_index)
    C, H, W = latent_shape
    flip = int(torch.randint(0, 2, (), generator=g))
    eps_post = torch.randn(C, H, W, generator=g)
    t = torch.rand(num_scales, generator=g) if t_sampling == 'uniform' else torch.sigmoid(torch.randn(num_scales, generator=g))
    noise = [torch.randn(C, h, w, generator=g) for h, w in scales]
    drop = float(torch.rand((), generator=g))
    return flip, eps_post, t, noise, drop


def draw_scale_list(seed, step, final_hw, keep=0.25):
    """The scale list of one training step for --scale-lists random (FlexVAR's random lists,
    adapted to a small square latent): always 1 and the latent size, each size between kept
    with probability `keep`; from a generator seeded by (seed, step) alone, so every rank and
    accumulation step of the step uses the same list. E.g. (8, 8) -> [(1, 1), (3, 3), (8, 8)]."""
    H, W = final_hw
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 - 1)  # not a sample's seed
    kept = torch.rand(max(min(H, W) - 2, 0), generator=g) < keep                   # sizes 2 .. H-1
    between = [(k, round(k * W / H)) for k, on in zip(range(2, min(H, W)), kept.tolist()) if on]
    return [(1, 1)] + between + [(H, W)]


def make_batch(ds, indices, global_offset, cfg, step, model_cfg, device):
    """The training inputs of the samples `indices` (positions global_offset.. in the
    global batch): scaled posterior samples, labels after dropout, noise and t. The noise
    maps' sizes are this step's scale list (the model's, or draw_scale_list's)."""
    moments, labels = ds.moments_batch(indices)                # (B, 2, 2C, h, w), (B,)
    scales = flowar.normalize_scales(model_cfg['scales'])
    if cfg.get('scale_lists') == 'random':
        scales = draw_scale_list(cfg['seed'], step, scales[-1])
    C = model_cfg['latent_channels']
    z, ts, noise, keep = [], [], [[] for _ in scales], []
    for j in range(len(indices)):
        flip, eps, t, nz, drop = sample_randomness(cfg['seed'], step, global_offset + j,
                                                   (C, *moments.shape[-2:]), len(scales), scales,
                                                   cfg.get('t_sampling', 'uniform'))
        mean, logvar = moments[j, flip % moments.shape[1]].chunk(2, dim=0)  # (C, h, w) each (a cache without flips has one version)
        z.append((mean + torch.exp(0.5 * logvar) * eps) * ds.scale_factor)  # posterior sample
        ts.append(t)
        for i, n in enumerate(nz):
            noise[i].append(n)
        keep.append(drop >= cfg['label_drop'])
    null = model_cfg['num_classes']
    labels = torch.where(torch.tensor(keep), labels, torch.full_like(labels, null))
    return (torch.stack(z).to(device), labels.to(device), [torch.stack(n).to(device) for n in noise],
            torch.stack(ts).to(device))


def check_resume_config(saved, cfg, model_cfg, path):
    """Refuse a checkpoint made for another model or data, naming the differing fields."""
    diffs = []
    saved_model = flowar.upgrade_config(saved['model'])  # older field names
    for k in sorted(set(saved_model) | set(model_cfg)):
        a, b = saved_model.get(k), model_cfg.get(k)
        if a != b:
            diffs.append(f"model.{k}: checkpoint {a!r}, now {b!r}")
    for k in ('dataset', 'batch_size', 'seed', 'vae_fingerprint', 'optimizer'):
        if saved.get(k) != cfg.get(k):
            diffs.append(f"{k}: checkpoint {saved.get(k)!r}, now {cfg.get(k)!r}")
    if diffs:
        raise SystemExit(f"{path} was written by a different configuration:\n  " + "\n  ".join(diffs)
                         + "\nUse another --out, delete the checkpoint, or pass the matching options.")


# ---------------------------------------------------------------------------------------
# Stages 1-3: data, VAE, latent cache
# ---------------------------------------------------------------------------------------

def load_images(cfg, rank=0, world_size=1):
    """uint8 (N, H, W, 3) + labels for CIFAR-10 / shapes, or an ImageFolderDataset."""
    n = cfg['subset']
    if cfg['dataset'] == 'cifar10':
        if world_size > 1:  # rank 0 downloads (if needed) while the others wait
            if rank == 0:
                data.load_cifar10(cfg['data_dir'], train=True, download=True)
            dist.barrier()
        images, labels = data.load_cifar10(cfg['data_dir'], train=True, download=True)
        return images[:n or None], labels[:n or None], data.CIFAR10_CLASSES
    if cfg['dataset'] == 'shapes':
        images, labels = data.make_shapes(n or 50_000, seed=cfg['seed'], size=cfg['image_size'])
        return images, labels, data.SHAPES_CLASSES
    ds = data.ImageFolderDataset(cfg['data_dir'], image_size=cfg['image_size'])
    if n:
        raise SystemExit("--subset is for CIFAR-10 / shapes; for ImageNet point --data-dir at a smaller folder")
    return ds, None, ds.classes


def prepare_latents(cfg, run):
    """Stages 1-3. Returns (LatentDataset, VAE, vae path, VAE scale factor, class names)."""
    out, rank, world_size, device, log = cfg['out'], run.rank, run.world_size, run.device, run.log
    images, labels, class_names = load_images(cfg, rank, world_size)
    vae_path = cfg['vae'] or os.path.join(out, 'vae.pt')
    if not cfg['vae'] and not os.path.exists(vae_path):
        if cfg['dataset'] == 'imagenet':
            raise SystemExit("ImageNet needs a pretrained VAE: --vae /path/to/kl16.ckpt")
        if rank == 0:  # small VAE: trained on rank 0 only, the others wait
            t0 = time.time()
            log(f"[stage vae] training the small '{cfg['dataset']}' VAE for {cfg['vae_max_steps']} steps "
                f"({run.precision}) -> {vae_path}")
            recipe = vae_lib.VAERecipe(steps=cfg['vae_max_steps'], batch_size=cfg['vae_batch_size'],
                                       optimizer=cfg['vae_optimizer'], precision=cfg['precision'], seed=cfg['seed'])
            vae_lib.train_vae(images, vae_path, recipe, device=device, log_every=max(cfg['log_every'], 100))
            trained, _ = vae_lib.load_vae(vae_path, device=device)
            if cfg['dataset'] == 'cifar10':  # held-out quality: PSNR on 2,000 test images
                test = data.load_cifar10(cfg['data_dir'], train=False)[0][:2000]
                psnr = vae_lib.evaluate_psnr(trained, test, device=device)
                vae_lib.save_recon_grid(trained, test, os.path.join(out, 'vae_recon.png'), device=device)
                log(f"[stage vae] test PSNR {psnr:.2f} dB (2,000 CIFAR-10 test images); "
                    f"originals vs reconstructions: {os.path.join(out, 'vae_recon.png')}")
            log(f"[stage vae] done in {time.time() - t0:.0f}s")
        if world_size > 1:
            dist.barrier()
    vae, scale_factor = vae_lib.load_vae(vae_path, device=device)
    cache = os.path.join(out, 'latents')
    t0 = time.time()
    data.build_latent_cache(vae, images, labels, cache, scale_factor=scale_factor,
                            batch_size=cfg['cache_batch_size'], flips=cfg['cache_flips'],
                            precision=run.precision, device=device,
                            ranks=data.Ranks(rank, world_size, dist.barrier if world_size > 1 else None),
                            dataset_name=cfg['dataset'])
    log(f"[stage latents] {cache} ready ({time.time() - t0:.0f}s)")
    ds = data.LatentDataset(cache, vae_fingerprint=data.vae_fingerprint(vae))
    return ds, vae, vae_path, scale_factor, class_names


# ---------------------------------------------------------------------------------------
# Stage 5: samples
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def write_sample_grid(model, vae, scale_factor, path, num_classes, per_class=8, seed=0):
    """One row per class (the first `num_classes` classes), `per_class` samples each,
    with the preset's default sampling settings (flowar.SAMPLING_DEFAULTS)."""
    import sample as sample_lib  # sample.py: generation and grid helpers
    settings = flowar.SAMPLING_DEFAULTS[model.preset_name]
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = sample_lib.sample_images(model, vae, scale_factor, labels, seed=seed,
                                      batch_size=len(labels), **settings)   # uint8 (N, H, W, 3)
    from PIL import Image
    Image.fromarray(sample_lib.make_grid(images, nrow=per_class)).save(path)
    return path


# ---------------------------------------------------------------------------------------
# A run, and stage 4: FlowAR training
# ---------------------------------------------------------------------------------------

def main(argv=None):
    """A run, stage by stage (top of this file); rerunning it skips what exists, resumes the rest."""
    cfg = parse_args(argv)
    run = setup_distributed(cfg)              # device, rank, world size, log(); OUT/ exists
    batch = split_batch(cfg, run.world_size)  # checked before the long stages 1-3

    # --- stages 1-3 ---
    ds, vae, vae_path, scale_factor, class_names = prepare_latents(cfg, run)
    cfg.update(vae_fingerprint=ds.header['vae_fingerprint'], vae_path=vae_path)

    # --- stage 4: model, EMA, optimizers; resume; train ---
    state = build_model(cfg, ds.latent_shape, len(class_names), batch.lr, run.device)
    record = dict(cfg, preset=cfg['preset'], model_preset=cfg['model'], model=state.model.config,
                  vae=vae_path, vae_scale_factor=float(scale_factor))   # what a checkpoint records
    rows = min(cfg['num_sample_classes'], len(class_names))
    sample_grid = lambda path: write_sample_grid(state.ema, vae, scale_factor, path, rows, seed=cfg['seed'])
    step0 = resume(run, state, record)
    train(cfg, run, state, ds, record=record, sample_grid=sample_grid)

    # --- stage 5: samples from the EMA weights (skipped if nothing was trained and the grid exists) ---
    grid_path = os.path.join(cfg['out'], 'samples.png')
    if run.master and state.step == step0 and os.path.exists(grid_path):
        run.log(f"[stage samples] {grid_path} exists; nothing new to sample")
    elif run.master:
        t0 = time.time()
        path = sample_grid(grid_path)
        run.log(f"[stage samples] {path} ({time.time() - t0:.0f}s); rows = classes "
                f"{', '.join(class_names[:cfg['num_sample_classes']])}")
        if cfg['dataset'] == 'cifar10':  # the number behind the picture (metrics.py)
            npz = os.path.join(cfg['out'], 'samples10k.npz')
            run.log(f"[quality] measure it: python sample.py --ckpt {run.ckpt_path} --num-images 10000 "
                    f"--batch-size 100 --npz {npz} && python metrics.py score {npz} --data-dir {cfg['data_dir']}")
    _cleanup(run.ddp)


def split_batch(cfg, world_size):
    """The global batch (--batch-size) = world_size ranks x accum micro-batches (gradient
    accumulation) x micro samples; and the peak lr, lr = blr * batch / 256 unless --lr."""
    B = cfg['batch_size']
    if B % world_size:
        raise SystemExit(f"--batch-size {B} is not divisible by the {world_size} ranks")
    per_rank = B // world_size
    micro = cfg['micro_batch'] or per_rank
    if per_rank % micro:
        raise SystemExit(f"per-rank batch {per_rank} (= {B} / {world_size} ranks) is not divisible "
                         f"by --micro-batch {micro}")
    return SimpleNamespace(size=B, per_rank=per_rank, micro=micro, accum=per_rank // micro,
                           lr=cfg['lr'] or cfg['blr'] * B / 256)


@dataclass
class TrainState:
    """What training changes, and what a checkpoint saves of it."""
    model: torch.nn.Module      # the weights being trained (the raw module, not the DDP/compiled wrapper)
    ema: torch.nn.Module        # their exponential moving average: the weights that are sampled
    opts: list                  # the optimizers (make_optimizers)
    step: int = 0               # optimizer steps taken


def build_model(cfg, latent_shape, num_classes, lr, device):
    """FlowAR from its preset, the EMA copy of its weights, and its optimizers: a TrainState."""
    torch.manual_seed(cfg['seed'])  # same init on every rank (DDP also broadcasts it)
    model = flowar.FlowAR.from_preset(cfg['model'], latent_channels=latent_shape[0], num_classes=num_classes,
                                      scales=_default_scales(cfg['model'], latent_shape), init=cfg['init'],
                                      grad_checkpointing=cfg['grad_ckpt'], scale_weighting=cfg['scale_weighting'],
                                      pos_embed=cfg.get('pos_embed', 'learned')).to(device)
    model.preset_name = cfg['model']
    return new_state(model, cfg, lr, device)


def new_state(model, cfg, lr, device):
    """A TrainState at step 0 for `model`: its EMA copy and the optimizers of cfg."""
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    return TrainState(model, ema, make_optimizers(model, cfg, lr, fused=device.type == 'cuda'))


def train(cfg, run, state, ds, *, record, sample_grid=None, make_inputs=make_batch):
    """Stage 4: optimizer steps (one global batch each, then the EMA) from state.step to the
    end of the schedule; logs, checkpoints every --ckpt-every steps and at the end. Ctrl-C on
    any rank: finish the step, save, exit. The one training loop: ablations.py trains its rows
    with it too.
    cfg: the recipe (a PRESETS entry with the command line's overrides); run: the processes
    (setup_distributed); state: a TrainState, advanced in place; ds: a LatentDataset;
    record: what a checkpoint records as its config (check_resume_config compares it);
    sample_grid(path): writes a grid (every --sample-every steps); make_inputs: make_batch,
    or a variant with its signature (ablations.py's image pyramid)."""
    batch = split_batch(cfg, run.world_size)
    model, B, device, log = state.model, batch.size, run.device, run.log
    if len(ds) < B:
        raise SystemExit(f"the dataset has {len(ds)} items, fewer than one batch of {B}")
    steps_per_epoch = len(ds) // B
    total_steps = cfg['max_steps'] or int(cfg['epochs'] * steps_per_epoch)
    train_model = torch.compile(model) if cfg['compile'] else model  # checkpoints hold the raw module's keys
    if run.ddp:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == 'cuda' else None)
    stop = {'now': False}  # Ctrl-C: finish the current step, save, exit
    previous_handler = signal.signal(signal.SIGINT, lambda *a: stop.update(now=True))
    log(f"[stage flowar] model {cfg['model']} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
        f"{len(ds)} latents {tuple(ds.latent_shape)}, global batch {B} = {run.world_size} ranks x {batch.accum} x "
        f"{batch.micro}, lr {batch.lr:.2e}, {steps_per_epoch} steps/epoch, steps {state.step} -> {total_steps}, "
        f"device {device}, {run.precision}")
    log_file = open(os.path.join(cfg['out'], 'log.jsonl'), 'a') if run.master else None
    t_log, n_log, t_start, step0 = time.time(), 0, time.time(), state.step
    sums, n_sums, order_epoch = 0.0, 0, None
    train_model.train()
    while state.step < total_steps and not _any_rank(stop['now'], run.ddp, device):
        step = state.step
        epoch = step // steps_per_epoch
        lr = lr_at(step / steps_per_epoch, batch.lr, cfg['min_lr'], cfg['warmup_epochs'], cfg['epochs'])
        for group in (g for opt in state.opts for g in opt.param_groups):
            group['lr'] = lr
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(ds), cfg['seed'], epoch), epoch
        batch_idx = order[(step % steps_per_epoch) * B:(step % steps_per_epoch + 1) * B]  # global batch
        # this rank's micro-batches: (z, y, noise, t) of positions off.. in the global batch
        offsets = [run.rank * batch.per_rank + m * batch.micro for m in range(batch.accum)]
        micro_batches = [make_inputs(ds, batch_idx[off:off + batch.micro].tolist(), off, cfg, step,
                                     model.config, device) for off in offsets]
        step_loss = forward_backward(train_model, micro_batches, run)
        if cfg.get('scale_lists') == 'random':   # lists differ between steps: log the first and last scale
            step_loss = step_loss[[0, 1, -1]]
        if not torch.isfinite(step_loss[0]):
            raise SystemExit(f"non-finite loss at step {step} ({step_loss[0].item()}); stopping without "
                             f"saving. The last good checkpoint is {run.ckpt_path}. With --precision bf16 "
                             "try fp32 (the authors report NaNs with mixed precision), or lower --lr.")
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'] or float('inf'))
        for opt in state.opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        update_ema(state.ema, model, ema_decay(cfg['ema'], step))  # warm-up: see ema_decay
        state.step = step = step + 1
        n_log += B

        # --- logging ---
        sums, n_sums = sums + step_loss, n_sums + 1
        if step % cfg['log_every'] == 0 or step == total_steps:
            avg = (sums / n_sums).tolist()
            sums, n_sums = 0.0, 0
            dt = time.time() - t_log
            ips = n_log / max(dt, 1e-9)
            eta = (total_steps - step) * B / max(ips, 1e-9)
            rec = dict(step=step, epoch=round(step / steps_per_epoch, 3), loss=avg[0],
                       scale_losses=avg[1:], lr=lr, grad_norm=float(gnorm), img_per_s=ips, eta_s=eta)
            log(f"step {step}/{total_steps} ep {rec['epoch']:.2f} loss {avg[0]:.4f} "
                f"[{' '.join(f'{v:.3f}' for v in avg[1:])}] lr {lr:.2e} gnorm {float(gnorm):.2f} "
                f"{ips:.0f} img/s ETA {eta / 60:.1f} min")
            if run.master:
                log_file.write(json.dumps(rec) + '\n')
                log_file.flush()
            t_log, n_log = time.time(), 0
        if state.step % cfg['ckpt_every'] == 0:
            save_checkpoint(run, state, record, steps_per_epoch)
        if run.master and sample_grid and cfg['sample_every'] and state.step % cfg['sample_every'] == 0:
            sample_grid(os.path.join(cfg['out'], f'samples_{state.step:07d}.png'))

    save_checkpoint(run, state, record, steps_per_epoch)
    signal.signal(signal.SIGINT, previous_handler)
    if stop['now']:
        log(f"[interrupted] checkpoint saved at step {state.step}: {run.ckpt_path}; rerun the same command to resume")
        _cleanup(run.ddp)
        sys.exit(130)
    log(f"[stage flowar] done: {state.step - step0} steps in {(time.time() - t_start) / 60:.1f} min -> {run.ckpt_path}")
    return state


def forward_backward(train_model, micro_batches, run):
    """Gradients of one global batch from this rank's share of it, `micro_batches` (a list
    of make_batch's (z, y, noise, t); gradient accumulation when there are several: loss /
    accum each, so they add up to the mean). Returns its [loss, per-scale losses]."""
    accum, step_loss = len(micro_batches), 0.0
    for m, (z, y, noise, t) in enumerate(micro_batches):
        # DDP: sync gradients only on the last micro-step (set before the forward)
        sync = contextlib.nullcontext() if (not run.ddp or m == accum - 1) else train_model.no_sync()
        with sync:
            with torch.autocast(run.device.type, torch.bfloat16, enabled=run.precision == 'bf16'):
                loss, per_scale = train_model(z, y, noise, t)
            (loss / accum).backward()
        step_loss = step_loss + torch.cat([loss.detach().float()[None], per_scale.float()]) / accum
    if run.ddp:  # average the logged losses over ranks (and let every rank see a NaN)
        dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
    return step_loss


def _default_scales(model_preset, latent_shape):
    """The FlowAR preset's scale list, checked against the latent size of the VAE."""
    scales = flowar.PRESETS[model_preset]['scales']
    if tuple(flowar.normalize_scales(scales)[-1]) != tuple(latent_shape[1:]):
        raise SystemExit(f"model {model_preset} ends at scale {scales[-1]} but the VAE gives "
                         f"{tuple(latent_shape[1:])} latents; use a matching --model / --vae / --image-size")
    return scales


# ---------------------------------------------------------------------------------------
# Machinery: processes (DDP) and checkpoints
# ---------------------------------------------------------------------------------------

def setup_distributed(cfg):
    """One switch, "is RANK in the environment?" (torchrun sets it). Joins the process group,
    creates OUT. Returns ddp, rank, world_size, master (rank 0), device, precision, log, ckpt_path."""
    ddp = 'RANK' in os.environ
    device = torch.device(cfg['device'] or ('cuda' if torch.cuda.is_available() else 'cpu'))
    rank, world_size = 0, 1
    if ddp:
        rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        if device.type == 'cuda':  # device_id: nccl binds this rank to its GPU (no guessing)
            device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
            torch.cuda.set_device(device)
            dist.init_process_group(backend='nccl', device_id=device)
        else:
            dist.init_process_group(backend='gloo')
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32: the released training precision
        torch.backends.cudnn.allow_tf32 = True
    master = rank == 0
    if master:
        os.makedirs(cfg['out'], exist_ok=True)
    if ddp:
        dist.barrier()
    return SimpleNamespace(ddp=ddp, rank=rank, world_size=world_size, master=master, device=device,
                           precision=resolve_precision(cfg['precision'], device),  # 'auto' decided once
                           log=lambda msg: print(msg, flush=True) if master else None,
                           ckpt_path=os.path.join(cfg['out'], 'ckpt.pt'))


def _any_rank(flag, ddp, device):
    """True if `flag` is set on any rank (so that all ranks stop at the same step)."""
    if not ddp:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _cleanup(ddp):
    """Leave the process group (all ranks together)."""
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def resume(run, state, record):
    """Load run.ckpt_path into `state` if it exists: weights, EMA, optimizers, step and this
    rank's RNG state (exact resume). A fresh run seeds each rank instead. Returns state.step."""
    if not os.path.exists(run.ckpt_path):
        torch.manual_seed(record['seed'] + run.rank)  # per-rank seed (dropout inside the model)
        return state.step
    ck = torch.load(run.ckpt_path, map_location='cpu', weights_only=True)
    check_resume_config(ck['config'], record, state.model.config, run.ckpt_path)
    state.model.load_state_dict(ck['model'])
    state.ema.load_state_dict(ck['ema'])
    for opt, saved in zip(state.opts, ck['optimizers'], strict=True):  # same --optimizer: checked above
        opt.load_state_dict(saved)
    state.step = step = int(ck['step'])
    rng = ck['rng'][run.rank] if run.rank < len(ck['rng']) else ck['rng'][0]
    torch.set_rng_state(rng['torch'])
    if run.device.type == 'cuda' and 'cuda' in rng:
        torch.cuda.set_rng_state(rng['cuda'], run.device)
    run.log(f"[resume] {run.ckpt_path} at step {step}")
    return step


def save_checkpoint(run, state, record, steps_per_epoch):
    """run.ckpt_path <- weights, EMA, optimizers, step, `record` as the config, every rank's
    RNG (call on all ranks)."""
    rng = {'torch': torch.get_rng_state()}
    if run.device.type == 'cuda':
        rng['cuda'] = torch.cuda.get_rng_state(run.device)
    rngs = [rng] * run.world_size
    if run.ddp:  # every rank's (all_gather_object overwrites the list)
        dist.all_gather_object(rngs, rng)
    if run.master:  # never lose a checkpoint: temp file, then rename
        data.atomic_save({'model': state.model.state_dict(), 'ema': state.ema.state_dict(),
                          'optimizers': [opt.state_dict() for opt in state.opts], 'step': state.step,
                          'epoch': state.step // steps_per_epoch, 'config': record, 'rng': rngs}, run.ckpt_path)


if __name__ == '__main__':
    data.keep_freed_memory()  # CPU: reuse freed memory instead of page-faulting it back in
    main()
