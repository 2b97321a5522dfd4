"""
Sample images from a trained FlowAR: a PNG grid to look at, or an .npz set for FID / IS.

    # a grid, one row per class (EMA weights, the preset's sampling settings)
    python sample.py --ckpt out/cifar-toy/ckpt.pt
    python sample.py --ckpt out/cifar-toy/ckpt.pt --classes 3,5 --per-class 16 --seed 1

    # coarse-to-fine: every scale's token map decoded, one column per scale
    python sample.py --ckpt out/cifar-toy/ckpt.pt --show-scales

    # the authors' released weights with MAR's KL-16 VAE
    python sample.py --official flowar_small.pth --model S --vae kl16.ckpt --classes 1,207,360

    # 50,000 class-balanced images for the evaluators (one GPU, or several with torchrun)
    python sample.py --official flowar_small.pth --model S --vae kl16.ckpt \\
        --num-images 50000 --npz flowar_s.npz
    torchrun --nproc_per_node=8 sample.py --official ... --num-images 50000 --npz flowar_s.npz

    # the same on a CPU
    python sample.py --ckpt out/cifar-toy/ckpt.pt --device cpu --num-images 1000 --npz toy.npz

Images 0..N-1 are made in chunks of --batch-size, chunk c with its own CPU generator seeded
(seed, c): the same --seed and --batch-size give the same grid or .npz on 1 or 8 ranks, on
CPU or GPU, interrupted or not (sample_npz, at the end, has the details).

In file order: loading (a train.py checkpoint, a released .pth, the VAE check, the sampling
settings), sampling and decoding (generate, make_grid, sample_images), the command line,
and the .npz set at scale (sample_npz, its parts folder, torchrun).
"""

import argparse
import datetime
import json
import os
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from data import CIFAR10_CLASSES, SHAPES_CLASSES, atomic_file, keep_freed_memory, to_uint8
from flowar import FlowAR, SAMPLING_DEFAULTS, upgrade_config
from flowar import normalize_scales as flowar_normalize
from vae import load_state_dict_strict, load_vae

# Class names of the small datasets (the grid log prints them); ImageNet shows ids.
CLASS_NAMES = {'cifar10': CIFAR10_CLASSES, 'shapes': SHAPES_CLASSES}

# Chunk c of a run with seed s draws its noise from a generator seeded with
# s * SEED_STRIDE + c. SEED_STRIDE is a prime larger than any chunk count we will see, so
# two (seed, chunk) pairs never share a stream while c < SEED_STRIDE.
SEED_STRIDE = 1_000_003


# ---------------------------------------------------------------------------------------
# Loading: a training checkpoint (train.py) or a released .pth, and the VAE
# ---------------------------------------------------------------------------------------

def load_model_from_checkpoint(path, use_ema=True, device='cpu'):
    """A checkpoint written by train.py -> (FlowAR in eval mode on `device`, its 'config').

    The checkpoint is {'model': sd, 'ema': sd, 'config': {'model': <FlowAR config>,
    'model_preset': ..., 'vae': path, 'vae_scale_factor': float, ...}, ...}. The EMA
    weights are sampled by default (use_ema=False takes the raw 'model' weights); both are
    loaded strictly: any missing, unexpected or mis-shaped key is an error.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found (train.py writes OUT/ckpt.pt)")
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path!r} is not a training checkpoint (expected a dict, got {type(ckpt).__name__})")
    weights_key = 'ema' if use_ema else 'model'
    missing = [k for k in ('config', weights_key) if k not in ckpt]
    if 'config' in ckpt and not (isinstance(ckpt['config'], dict) and 'model' in ckpt['config']):
        missing.append("config['model']")
    if missing:
        hint = (" (a checkpoint without EMA weights: pass --no-ema to sample the raw weights)"
                if missing == ['ema'] else "")
        raise ValueError(f"{path!r} lacks the key(s) {missing} that sampling needs; it has "
                         f"{sorted(ckpt)}. Expected the format train.py writes: "
                         f"{{'model', 'ema', 'config': {{'model', 'vae', 'vae_scale_factor', ...}}}}{hint}. "
                         f"For the authors' released .pth use --official PATH --model S|L|H.")
    config = dict(ckpt['config'], model=upgrade_config(ckpt['config']['model']))  # older field names
    model = FlowAR(**config['model'])
    load_state_dict_strict(model, ckpt[weights_key], what=f"{path!r} ('{weights_key}' weights vs config['model'])")
    return model.to(device).eval(), config


def load_official_model(path, model_name, device='cpu', trust_pickle=False):
    """A released FlowAR-S/L/H .pth -> FlowAR in eval mode (EMA weights when the file has them)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"released checkpoint {path!r} not found")
    try:
        obj = torch.load(path, map_location='cpu', weights_only=not trust_pickle)
    except Exception as e:  # weights_only refuses pickled python objects (e.g. an argparse Namespace)
        raise ValueError(f"could not read {path!r} with torch.load(weights_only=True): {e}\n"
                         f"If the file holds pickled python objects besides the tensors and you "
                         f"trust where it came from, re-run with --trust-pickle.") from e
    model = FlowAR.from_preset(model_name)
    load_state_dict_strict(model, official_state_dict(model, obj), what=f"released checkpoint {path!r}")  # EMA weights
    return model.to(device).eval()


def official_state_dict(model, obj):
    """A released FlowAR-S/L/H checkpoint -> the state dict to load into `model` strictly
    (load_official_model does it with vae.load_state_dict_strict, whose error lists
    every missing, unexpected and mis-shaped key).

    The released .pth files are {'model': sd, 'model_ema': sd, ...} (MAR style; the EMA
    weights are taken) or a bare state dict. This model uses the released module names,
    so parameters map one to one. The files also hold two kinds of constants that this
    model recomputes instead of storing: the (1, 1, L, L) attention mask and every
    attention layer's `rope.freqs`. They are checked against ours here, then dropped.
    """
    if isinstance(obj, dict) and ('model' in obj or 'model_ema' in obj):
        obj = obj['model_ema' if 'model_ema' in obj else 'model']
    sd = {k.removeprefix('module.'): v for k, v in obj.items()}    # saved from a DDP wrapper
    hint = "; is it the right preset (--model S|L|H)?"
    if 'mask' in sd:  # block-causal, bool or additive (0 = may attend)
        m, ours = sd.pop('mask').reshape(-1).cpu(), model.attn_mask.reshape(-1).cpu()
        allowed = m if m.dtype == torch.bool else (m == 0)
        if m.numel() != ours.numel() or not (torch.equal(allowed, ours) or torch.equal(~allowed, ours)):
            raise ValueError(f"the checkpoint's attention mask is not the block-causal mask of "
                             f"scales {model.scales}{hint}")
    buffers = dict(model.named_buffers())
    for k in [k for k in sd if k.endswith('.rope.freqs')]:
        v, ours = sd.pop(k).float().cpu(), buffers.get(k)
        if ours is None or v.shape != ours.shape or not torch.allclose(v, ours.float().cpu(), rtol=1e-5, atol=0):
            raise ValueError(f"{k}: the checkpoint's RoPE frequencies are not this model's{hint}")
    return sd


def check_vae(model, vae):
    """The VAE must decode the model's latents: same number of latent channels."""
    c_vae = vae.config['embed_dim']
    if c_vae != model.latent_channels:
        raise ValueError(f"the VAE has {c_vae} latent channels but the FlowAR model has "
                         f"latent_channels={model.latent_channels}: this is not the VAE the "
                         f"model was trained with (pass the right one with --vae)")


def sampling_settings(preset, num_steps=None, cfg=None, guidance=None, cfg_ramp=None, scales=None):
    """Flags given on the command line win; the others come from SAMPLING_DEFAULTS[preset].
    scales: a scale list other than the training one (scale-free models), or None; a default
    grid per scale (the toy's [50, 8]) then becomes the first value for the 1x1 scale and the
    last for every other (1, 2, 4, 8 -> [50, 8, 8, 8]); a --num-steps list must fit the list."""
    given = dict(num_steps=num_steps, cfg=cfg, guidance=guidance, cfg_ramp=cfg_ramp)
    unset = ['--' + k.replace('_', '-') for k, v in given.items() if v is None]
    if unset and preset not in SAMPLING_DEFAULTS:
        raise ValueError(f"no sampling defaults for the model preset {preset!r} (known: "
                         f"{sorted(SAMPLING_DEFAULTS)}); pass {' '.join(unset)} explicitly")
    st = {k: (SAMPLING_DEFAULTS[preset][k] if v is None else v) for k, v in given.items()}
    steps = st['num_steps']
    if scales is not None and isinstance(steps, list) and len(steps) != len(scales):
        if num_steps is not None:
            raise ValueError(f"--num-steps {','.join(map(str, steps))} has {len(steps)} values but --scales "
                             f"has {len(scales)} scales: give one value, or one per scale")
        st['num_steps'] = [steps[0]] + [steps[-1]] * (len(scales) - 1)
    return dict(st, scales=scales)


def parse_scales(text):
    """--scales: '1,2,4,8' -> [1, 2, 4, 8], increasing square sizes (flowar.normalize_scales)."""
    try:
        scales = [int(part) for part in text.split(',')]
        flowar_normalize(scales)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"increasing integers such as 1,2,4,8, got {text!r} ({err})") from None
    return scales


def parse_steps(text):
    """--num-steps: '8' -> 8 (every scale), '50,8' -> [50, 8] (one per scale), each >= 2."""
    try:
        steps = [int(part) for part in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer or comma-separated integers, got {text!r}") from None
    if min(steps) < 2:
        raise argparse.ArgumentTypeError(f"every --num-steps value must be >= 2, got {text!r}")
    return steps[0] if len(steps) == 1 else steps


def parse_classes(text, num_classes):
    """'1,207,360' -> [1, 207, 360], each checked to be a class of this model."""
    out = []
    for part in text.split(','):
        part = part.strip()
        try:
            c = int(part)
        except ValueError:
            raise ValueError(f"--classes takes comma-separated integer class ids, got {part!r} in {text!r}") from None
        if not 0 <= c < num_classes:
            raise ValueError(f"class id {c} is out of range: this model has {num_classes} "
                             f"classes, valid ids are 0..{num_classes - 1}")
        out.append(c)
    return out


# ---------------------------------------------------------------------------------------
# Sampling and decoding
# ---------------------------------------------------------------------------------------

def chunk_generator(seed, chunk):
    """The noise stream of chunk `chunk`: a CPU generator, so CPU and GPU runs draw the
    same noise (FlowAR.sample draws on the generator's device, then moves it)."""
    return torch.Generator('cpu').manual_seed(seed * SEED_STRIDE + chunk)


def _chunks(num_images, batch_size):
    """Images 0..N-1 cut into runs of batch_size -> [(chunk index c, start, stop)]."""
    return [(c, s, min(s + batch_size, num_images)) for c, s in enumerate(range(0, num_images, batch_size))]


@torch.no_grad()
def decode(vae, latents, scale_factor):
    """Latents in the scaled space the model works in -> uint8 (B, H, W, 3).
    The model was trained on z * scale_factor, so the decoder gets latents / scale_factor."""
    return to_uint8(vae.decode(latents / scale_factor)).cpu().numpy()


@torch.no_grad()
def generate(model, vae, scale_factor, labels, *, num_steps, cfg, guidance, cfg_ramp=True,
             generator=None, show_scales=False, scale_upsample='bicubic', scales=None):
    """Sample len(labels) images as one batch.

    labels: list or (B,) tensor of class ids. returns uint8 numpy (B, H, W, 3), or with
    show_scales=True (B, n, H, W, 3): the token map of every scale s^1..s^n upsampled to
    the final latent size with `scale_upsample` ('bicubic': the first half of the model's
    own Up(.), what the next scale is conditioned on; 'nearest': shows the token blocks)
    and decoded by the VAE. The last column is the final sample itself (s^n is already
    at full size, it is not interpolated).
    """
    device = model.class_emb.weight.device
    labels = torch.as_tensor(labels, dtype=torch.long).to(device)
    latents, details = model.sample(labels, num_steps=num_steps, cfg=cfg, guidance=guidance, cfg_ramp=cfg_ramp,
                                    generator=generator, return_details=True, scales=scales)  # (B, C, H, W)
    if not show_scales:
        return decode(vae, latents, scale_factor)  # (B, H, W, 3)
    if scale_upsample not in ('bicubic', 'nearest'):
        raise ValueError(f"scale_upsample must be 'bicubic' or 'nearest', got {scale_upsample!r}")
    full = tuple(latents.shape[-2:])
    cols = []
    for s in details['maps']:  # s^i: (B, C, h_i, w_i)
        if tuple(s.shape[-2:]) != full:
            kw = dict(align_corners=False) if scale_upsample == 'bicubic' else {}
            s = F.interpolate(s, size=full, mode=scale_upsample, **kw)  # (B, C, H, W)
        cols.append(decode(vae, s, scale_factor))  # one batch of B per scale, like the plain path
    return np.stack(cols, axis=1)  # (B, n, H, W, 3)


def make_grid(images, nrow, pad=2, pad_value=255):
    """uint8 (N, H, W, 3) -> one uint8 image (rows * (H + pad) + pad, nrow * (W + pad) + pad, 3),
    images placed left to right, top to bottom, `nrow` per row (torchvision's convention)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"make_grid wants uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), pad_value, np.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = images[k]
    return grid


def sample_images(model, vae, scale_factor, labels, *, seed, batch_size, num_steps, cfg,
                  guidance, cfg_ramp=True, show_scales=False, scale_upsample='bicubic', scales=None):
    """All `labels` in chunks of batch_size, chunk c seeded from (seed, c) as in sample_npz.
    returns uint8 (N, H, W, 3), or (N, n_scales, H, W, 3) with show_scales."""
    return np.concatenate([
        generate(model, vae, scale_factor, labels[start:stop], num_steps=num_steps, cfg=cfg,
                 guidance=guidance, cfg_ramp=cfg_ramp, generator=chunk_generator(seed, c),
                 show_scales=show_scales, scale_upsample=scale_upsample, scales=scales)
        for c, start, stop in _chunks(len(labels), batch_size)])


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description="Sample from FlowAR: a PNG grid, or an .npz for FID/IS.")
    src = p.add_argument_group("model (one of)")
    src.add_argument('--ckpt', help="training checkpoint written by train.py (OUT/ckpt.pt)")
    src.add_argument('--official', help="the authors' released FlowAR .pth (needs --model and --vae)")
    src.add_argument('--model', choices=['S', 'L', 'H'], help="preset of the --official weights")
    src.add_argument('--trust-pickle', action='store_true',
                     help="load --official with weights_only=False (only for files you trust)")
    p.add_argument('--vae', help="VAE checkpoint (vae.py's vae.pt or MAR's kl16.ckpt); default: "
                                 "the one stored in --ckpt")
    p.add_argument('--ema', action=argparse.BooleanOptionalAction, default=True,
                   help="sample the EMA weights of --ckpt (default) or the raw ones (--no-ema)")
    g = p.add_argument_group("sampling (defaults: flowar.SAMPLING_DEFAULTS of the model preset)")
    g.add_argument('--num-steps', type=parse_steps, help="the released time grid per scale (flowar.euler_time_grid): "
                   "n Euler steps for even n (50: uniform), n - 1 for odd n (25 -> 24, as released); "
                   "one n for every scale, or one per scale: 50,8")
    g.add_argument('--scales', type=parse_scales, help="sample with this scale list, e.g. 1,2,4,8 (a model "
                   "trained with --pos-embed scale-free; default: the training list)")
    g.add_argument('--cfg', type=float, help="classifier-free guidance weight at the last scale")
    g.add_argument('--guidance', type=float, help="guidance only while t <= this (the interval)")
    g.add_argument('--cfg-ramp', action=argparse.BooleanOptionalAction, default=None,
                   help="CFG weight rising from 1 at the first scale to --cfg at the last (released), "
                   "or --no-cfg-ramp: --cfg at every scale")
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--batch-size', type=int, default=64,
                   help="images per chunk; the .npz is reproducible for a fixed value")
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    o = p.add_argument_group("grid output (default mode)")
    o.add_argument('--classes', help="comma-separated class ids, one grid row each "
                                     "(default: the first 10 classes)")
    o.add_argument('--per-class', type=int, help="samples per class (default 8; 1 with --show-scales)")
    o.add_argument('--out', help="PNG path (default: next to --ckpt, or ./samples_<model>.png)")
    o.add_argument('--show-scales', action='store_true',
                   help="one row per sample, one column per scale (coarse to fine)")
    o.add_argument('--scale-upsample', choices=['bicubic', 'nearest'], default='bicubic',
                   help="how --show-scales brings each token map to the final latent size")
    e = p.add_argument_group("evaluation output")
    e.add_argument('--num-images', type=int, help="class-balanced set of this many images")
    e.add_argument('--npz', help="write the set here (arr_0 uint8 (N, H, W, 3), arr_1/labels int64)")
    e.add_argument('--keep-parts', action='store_true', help="keep NPZ.parts/ after assembling")
    return p


def _check_args(parser, args):
    if (args.ckpt is None) == (args.official is None):
        parser.error("give exactly one of --ckpt (a train.py checkpoint) or --official (a released .pth)")
    if args.official is not None and (args.model is None or args.vae is None):
        parser.error("--official needs --model S|L|H (which released model it is) and "
                     "--vae PATH/kl16.ckpt (MAR's KL-16 VAE)")
    if args.model is not None and args.official is None:
        parser.error("--model only applies to --official; a --ckpt knows its own model")
    if (args.num_images is None) != (args.npz is None):
        parser.error("--num-images and --npz go together")
    if args.npz is not None and (args.show_scales or args.classes or args.per_class or args.out):
        parser.error("--npz makes a class-balanced set; --classes/--per-class/--out/--show-scales are for grids")
    for name in ('batch_size', 'per_class', 'num_images'):
        v = getattr(args, name)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    distributed, rank, world_size, device = _init_distributed(parser, args)
    log = print if rank == 0 else (lambda *a, **k: None)

    try:
        model, preset, dataset, vae_path, trained_sf = _load_model(args, device, log)
        vae, scale_factor = load_vae(vae_path, device=device)
    except FileNotFoundError as err:  # a wrong path is a usage error: the loader's message, no traceback
        parser.error(str(err))
    check_vae(model, vae)
    if trained_sf is not None and abs(trained_sf - scale_factor) > 1e-6 * abs(trained_sf):
        raise ValueError(f"the model was trained on latents scaled by {trained_sf} but the VAE "
                         f"{vae_path!r} has scale factor {scale_factor}: not the VAE of training")
    log(f"vae: {vae_path} (scale factor {scale_factor})")
    try:
        st = sampling_settings(preset, args.num_steps, args.cfg, args.guidance, args.cfg_ramp, args.scales)
        model.layout(args.scales)                 # a list this model cannot take: a usage error
    except ValueError as err:
        parser.error(str(err))
    log(f"sampling: scales={args.scales or [h for h, _ in model.scales]} num_steps={st['num_steps']} "
        f"cfg={st['cfg']} cfg_ramp={st['cfg_ramp']} guidance={st['guidance']} "
        f"seed={args.seed} batch_size={args.batch_size} device={device}")

    if args.npz is None:
        return _sample_grid(parser, args, model, vae, scale_factor, st, CLASS_NAMES.get(dataset), log)
    try:
        sample_npz(model, vae, scale_factor, args.npz, num_images=args.num_images, seed=args.seed,
                   batch_size=args.batch_size, settings=st, rank=rank, world_size=world_size,
                   keep_parts=args.keep_parts, log=log,
                   run_info=dict(source=args.official or args.ckpt, ema=args.ema, vae=vae_path))
    finally:
        if distributed:
            dist.destroy_process_group()
    return args.npz


def _load_model(args, device, log):
    """--official or --ckpt -> (model, preset, dataset, VAE path, the VAE scale factor the
    model was trained with, or None where the file does not record it)."""
    if args.official is not None:
        model = load_official_model(args.official, args.model, device, args.trust_pickle)
        log(f"model: released FlowAR-{args.model} from {args.official}")
        return model, args.model, 'imagenet', args.vae, None
    model, cfg = load_model_from_checkpoint(args.ckpt, use_ema=args.ema, device=device)
    vae_path = args.vae if args.vae is not None else cfg.get('vae')
    if vae_path is None:
        raise ValueError(f"{args.ckpt!r} does not record its VAE (config['vae']); pass --vae PATH")
    if args.vae is None and not os.path.isfile(vae_path):
        raise FileNotFoundError(f"the VAE recorded in {args.ckpt!r}, {vae_path!r}, is not there "
                                f"(relative paths are relative to where train.py ran); pass --vae PATH")
    log(f"model: {args.ckpt} ({'EMA' if args.ema else 'raw'} weights, preset {cfg.get('model_preset')!r}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)")
    return model, cfg.get('model_preset'), cfg.get('dataset'), vae_path, cfg.get('vae_scale_factor')


def _sample_grid(parser, args, model, vae, scale_factor, st, names, log):
    """The default mode: --per-class samples of each of --classes, one row per class (with
    --show-scales one row per sample, one column per scale) -> the PNG's path."""
    classes = list(range(min(10, model.num_classes)))
    if args.classes is not None:
        try:
            classes = parse_classes(args.classes, model.num_classes)
        except ValueError as err:
            parser.error(str(err))
    per_class = args.per_class or (1 if args.show_scales else 8)
    log("classes: " + ", ".join(f"{c} ({names[c]})" if names else str(c) for c in classes)
        + f"; {per_class} per class")
    labels = [c for c in classes for _ in range(per_class)]
    t0 = time.time()
    imgs = sample_images(model, vae, scale_factor, labels, seed=args.seed, batch_size=args.batch_size,
                         show_scales=args.show_scales, scale_upsample=args.scale_upsample, **st)
    dt = time.time() - t0
    log(f"sampled {len(labels)} images in {dt:.1f}s ({len(labels) / dt:.2f} images/s)")
    if args.show_scales:  # (N, n, H, W, 3): one row per sample, one column per scale
        grid = make_grid(imgs.reshape(-1, *imgs.shape[2:]), nrow=imgs.shape[1])
        log(f"scales {[tuple(s) for s in model.scales]}, upsampled ({args.scale_upsample}) to "
            f"{tuple(model.scales[-1])} and decoded; the last column is the final sample")
    else:
        grid = make_grid(imgs, nrow=per_class)  # one row per class
    stem = 'samples_scales' if args.show_scales else 'samples'
    default = (os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), stem + '.png')
               if args.ckpt else f"{stem}_{args.model}.png")
    out = default if args.out is None else args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    Image.fromarray(grid).save(out)
    log(f"wrote {out} ({grid.shape[1]}x{grid.shape[0]})")
    return out


# ---------------------------------------------------------------------------------------
# At scale: the .npz evaluation set (class-balanced, resumable, rank-invariant) and torchrun
# ---------------------------------------------------------------------------------------

def npz_labels(num_images, num_classes):
    """Image i has label i // (N / num_classes): N / num_classes images per class, in class order."""
    if num_images % num_classes:
        raise ValueError(f"--num-images {num_images} is not divisible by the {num_classes} classes; "
                         f"a class-balanced set needs a multiple (e.g. "
                         f"{(num_images // num_classes + 1) * num_classes})")
    return np.arange(num_images, dtype=np.int64) // (num_images // num_classes)


def sample_npz(model, vae, scale_factor, out_path, *, num_images, seed, batch_size, settings,
               rank=0, world_size=1, keep_parts=False, run_info=None, log=print):
    """Sample a class-balanced set of num_images into `out_path` (.npz: arr_0 uint8 (N, H, W,
    3), arr_1 / labels int64) with the sampling settings `settings` (num_steps, cfg, guidance,
    cfg_ramp: sampling_settings). Every rank calls this with its rank and the world size.

    The reproducibility contract: chunk c (images c * batch_size ...) is one batch with the
    CPU generator chunk_generator(seed, c); the chunks to do are dealt to ranks round-robin.
    So image i depends on (seed, batch size, i) only, not on the ranks or on interruptions
    (up to float rounding across devices and thread counts; another batch size regroups the
    noise: a different, equally valid set). Resuming: each chunk is written atomically to
    OUT.npz.parts/ when done and a rerun skips those on disk; run_info (e.g. the checkpoint
    path) goes into the parts folder's meta.json, and a rerun with other settings is refused
    instead of mixing two sets. Rank 0 then streams the chunks into the .npz. Returns out_path.
    """
    labels = npz_labels(num_images, model.num_classes)                     # (N,)
    chunks = _chunks(num_images, batch_size)                               # (index, start, stop)
    parts = out_path + '.parts'
    chunk_path = lambda c: os.path.join(parts, f'chunk_{c:06d}.npy')
    if set(settings) - {'scales'} != {'num_steps', 'cfg', 'guidance', 'cfg_ramp'}:
        raise ValueError(f"settings needs num_steps, cfg, guidance and cfg_ramp, and may hold scales "
                         f"(sampling_settings), got {sorted(settings)}")
    used = model.layout(settings.get('scales'))[0]       # the scale list these images come from
    meta = dict(num_images=num_images, batch_size=batch_size, seed=seed,
                **{k: v for k, v in settings.items() if k != 'scales'},
                num_classes=model.num_classes, scales=[list(s) for s in used], **(run_info or {}))
    # 1. An existing parts folder must come from the same settings (every rank checks).
    _open_parts(parts, meta, rank)

    # 2. What is left: every rank lists the folder before anyone writes (barrier), and the
    # missing chunks are dealt out round-robin, so a resumed run stays balanced.
    todo = [ch for ch in chunks if not os.path.isfile(chunk_path(ch[0]))]
    _barrier()
    if rank == 0:
        done = len(chunks) - len(todo)
        log(f"npz: {num_images} images ({num_images // model.num_classes} per class), "
            f"{len(chunks)} chunks of {batch_size}, {world_size} rank(s)"
            + (f"; resuming: {done} chunk(s) already in {parts}" if done else ""))

    # 3. Sample my chunks, each as one batch with its own generator.
    t0, made, left = time.time(), 0, sum(stop - start for _, start, stop in todo)
    for c, start, stop in todo[rank::world_size]:
        imgs = generate(model, vae, scale_factor, labels[start:stop], generator=chunk_generator(seed, c),
                        **settings)  # (b, H, W, 3)
        with atomic_file(chunk_path(c)) as tmp, open(tmp, 'wb') as f:  # a file object: np.save would
            np.save(f, imgs)                                             # append '.npy' to a name
        made += stop - start
        if rank == 0:  # progress of rank 0, times world_size as an estimate of the whole
            rate = made * world_size / (time.time() - t0)
            eta = max(left - made * world_size, 0) / rate
            log(f"  chunk {c + 1}/{len(chunks)}: {rate:.2f} images/s (all ranks, est.), "
                f"ETA {datetime.timedelta(seconds=round(eta))}")

    # 4. Everyone done: rank 0 assembles the .npz and removes the parts.
    _barrier()
    if rank == 0:
        _assemble_npz(out_path, parts, [chunk_path(c) for c, _, _ in chunks], labels, keep_parts, log)
    return out_path


def _open_parts(parts, meta, rank):
    """Refuse a parts folder whose meta.json differs from `meta`; create it (rank 0) if new."""
    meta = json.loads(json.dumps(meta))  # what it reads back as
    meta_path = os.path.join(parts, 'meta.json')
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != meta:
            diff = {k: (old.get(k), meta.get(k)) for k in set(old) | set(meta) if old.get(k) != meta.get(k)}
            raise ValueError(f"{parts} holds chunks of a run with other settings "
                             f"(setting: (on disk, now)) {diff}; delete the folder or re-run with "
                             f"the same settings to resume")
    _barrier()
    if rank == 0 and not os.path.isfile(meta_path):
        os.makedirs(parts, exist_ok=True)
        with atomic_file(meta_path) as tmp, open(tmp, 'w') as f:
            json.dump(meta, f, indent=1)
    _barrier()


def _assemble_npz(out_path, parts, paths, labels, keep_parts, log):
    """Rank 0, every chunk on disk: write {'arr_0': uint8 (N, H, W, 3), 'arr_1': labels,
    'labels': labels} as an uncompressed .npz (a zip of .npy files, what np.load and the
    FID/IS evaluators read), copying the chunks in one at a time; atomic (data.atomic_file)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise RuntimeError(f"{len(missing)} chunk(s) missing after sampling, e.g. {missing[0]}")
    shape = (len(labels),) + np.load(paths[0], mmap_mode='r').shape[1:]  # (N, H, W, 3)
    with atomic_file(out_path) as tmp, zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open('arr_0.npy', 'w', force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                    'fortran_order': False, 'shape': tuple(shape)})
            n = 0
            for p in paths:
                a = np.load(p)
                if a.dtype != np.uint8 or a.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"{p}: expected uint8 (*, {shape[1:]}), got {a.dtype} {a.shape}")
                f.write(np.ascontiguousarray(a).tobytes())
                n += a.shape[0]
            if n != shape[0]:
                raise ValueError(f"the chunks hold {n} images, expected {shape[0]}")
        for name in ('arr_1', 'labels'):
            with zf.open(name + '.npy', 'w') as f:
                np.lib.format.write_array(f, labels)
    if not keep_parts:  # our files only (chunks, meta, temporaries of killed runs)
        for name in os.listdir(parts):
            if name.startswith(('chunk_', 'meta.json')):
                os.remove(os.path.join(parts, name))
        if os.listdir(parts):
            log(f"note: {parts} holds files sample.py did not write; left in place")
        else:
            os.rmdir(parts)
    log(f"wrote {out_path}: arr_0 uint8 {shape}, arr_1/labels int64 ({len(labels)},)")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _init_distributed(parser, args):
    """One switch decides single-process vs torchrun: is RANK in the environment? -> (distributed,
    rank, world_size, device); a torchrun rank samples on GPU LOCAL_RANK (nccl), or on the CPU (gloo)."""
    if not ('RANK' in os.environ and 'WORLD_SIZE' in os.environ):
        return False, 0, 1, args.device
    if args.npz is None:
        parser.error("under torchrun only --npz mode is supported (a grid is one process's job)")
    rank, world_size, device = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), args.device
    if torch.device(device).type == 'cuda':
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        torch.cuda.set_device(local_rank)
        device = f'cuda:{local_rank}'
        dist.init_process_group('nccl', device_id=torch.device(device))
    else:
        dist.init_process_group('gloo')
    return True, rank, world_size, device


if __name__ == '__main__':
    keep_freed_memory()  # CPU: reuse freed memory instead of page-faulting it back in
    main()
