"""
Zero-shot editing with a trained FlowAR: in-painting, out-painting, refinement and expansion,
no fine-tuning (FlexVAR's idea, on FlowAR's scales).

Why it works: every scale s^i is the ground-truth latent at its size (Eq. 5), not a residual,
so the known part of an image *is* a part of every token map: area-downsample the image's
latent (and the mask) to the scale and it is there. The sampler (FlowAR.sample, `known=`)
forces the known region at every scale, so every later scale is conditioned on it, and
optionally inside each scale's Euler integration as well (the two mechanisms, compared in
docs/flexible.md):

    between   after scale i's integration: s^i <- m s^i_gt + (1 - m) s^i
    inside    also at every Euler step: the head sees x_t <- m ((1 - t) s^i_gt + t eps) + (1 - m) x_t,
              the known region on its own straight path (Eq. 7, released direction), same eps

m is the known mask area-downsampled to the scale: soft (between 0 and 1) where a coarse token
covers both regions, which blends the two in proportion to the known share of its area.

    in-painting   regenerate a region (default: the central 16x16 pixels of a 32x32 image)
    out-painting  keep a region (the central 16x16), generate the rest
    refinement    keep the coarse scales of the image up to scale k, generate the finer ones
    expansion     a scale list ending beyond the training latent (scale-free models): the image's
                  scales up to the latent size kept, the larger ones generated

    python edit.py --ckpt out/cifar-toy-flex/ckpt.pt --task inpaint --images 0,1,2,3 --data-dir data
    python edit.py --ckpt ... --task inpaint --images 0,1 --target-class 8      # class-guided
    python edit.py --ckpt ... --task refine --k 2 --scales 1,2,4,8 --images 0,1
    python edit.py --ckpt ... --task expand --scales 1,2,4,8,16 --images 0,1
    python edit.py --ckpt ... --task inpaint --npz out/inpaint1k.npz --num-images 1000   # measured

A picture: one row per image: the original, the masked input (grey where unknown), three
completions. --npz: one completion per CIFAR-10 test image (the first N), for metrics.py score,
and the error of the known region against the VAE's own reconstruction there.
"""

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import flowar
from data import load_cifar10, to_float
from sample import chunk_generator, decode, load_model_from_checkpoint, make_grid, sampling_settings
from vae import load_vae

TASKS = ('inpaint', 'outpaint', 'refine', 'expand')


def pixel_mask(task, size=32, box=16):
    """The known mask of a task in pixels, (1, 1, size, size) float, 1 = known: in-painting
    knows everything but the central box x box square, out-painting only that square."""
    m = torch.zeros(1, 1, size, size)
    lo = (size - box) // 2
    m[..., lo:lo + box, lo:lo + box] = 1.0
    return 1.0 - m if task == 'inpaint' else m


def known_for(task, latents, scales_hw, mask=None, k=None):
    """FlowAR.sample's `known` for a task: (ground-truth maps, masks), one per scale of the list.
    latents: (B, C, H, W) the image's scaled latent; mask: (1, 1, h_px, w_px) pixel mask (in- and
    out-painting), area-downsampled to every scale; k: refinement keeps scales 1..k."""
    H, W = latents.shape[-2:]
    inside = [hw for hw in scales_hw if hw[0] <= H and hw[1] <= W]       # scales the image has
    gt = flowar.build_scale_pyramid(latents, inside) if inside[-1] == (H, W) else None
    if gt is None:
        raise ValueError(f"the scale list {scales_hw} must contain the latent size {(H, W)}")
    maps = gt + [torch.zeros(latents.shape[0], latents.shape[1], *hw) for hw in scales_hw[len(gt):]]
    if task in ('inpaint', 'outpaint'):
        if len(gt) != len(scales_hw):
            raise ValueError("in- and out-painting keep the latent size as the last scale")
        masks = [F.interpolate(mask, size=hw, mode='area') for hw in scales_hw]   # soft at coarse scales
    elif task == 'refine':
        if not 1 <= k < len(scales_hw):
            raise ValueError(f"--k must be between 1 and {len(scales_hw) - 1} (scales kept), got {k}")
        masks = [torch.ones(1, 1, *hw) if i < k else None for i, hw in enumerate(scales_hw)]
    elif task == 'expand':
        if len(gt) == len(scales_hw):
            raise ValueError(f"expansion needs a scale list ending beyond the latent size {(H, W)}, "
                             f"e.g. 1,2,4,{H},{2 * H}")
        masks = [torch.ones(1, 1, *hw) for hw in inside] + [None] * (len(scales_hw) - len(gt))
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return maps, masks


@torch.no_grad()
def encode(vae, images_uint8, scale_factor, device='cpu'):
    """uint8 (B, H, W, 3) -> the scaled posterior means (B, C, h, w): the image's latent F."""
    return vae.encode(to_float(torch.as_tensor(images_uint8)).to(device)).mean * scale_factor


@torch.no_grad()
def edit(model, vae, scale_factor, images_uint8, labels, *, task, settings, generator=None,
         mask=None, k=None, inside=True, device='cpu'):
    """Completions of a batch of images -> uint8 (B, H', W', 3). labels: the class to generate
    (the image's own, or another: class-guided editing); settings: sampling_settings (its
    'scales' the list in use, None = the model's)."""
    latents = encode(vae, images_uint8, scale_factor, device)
    hws = model.layout(settings.get('scales'))[0]
    known = known_for(task, latents, hws, mask, k)
    st = {key: v for key, v in settings.items() if key != 'scales'}
    z = model.sample(torch.as_tensor(labels, dtype=torch.long, device=device), generator=generator,
                     scales=settings.get('scales'), known=known, known_inside=inside, **st)
    return decode(vae, z, scale_factor)


def known_region_error(originals, completions, recons, mask, margin=0):
    """Mean squared pixel error (0-255 scale) inside the known region: of the completions and
    of the VAE's reconstructions, both against the originals -> (completion, reconstruction).
    margin: only known pixels farther than this from the unknown region (the decoder's
    convolutions carry the generated region a few pixels into the known one)."""
    unknown = (mask < 0.5).float()
    if margin:
        unknown = F.max_pool2d(unknown, 2 * margin + 1, stride=1, padding=margin)
    m = unknown[0, 0].numpy() < 0.5                                     # (H, W) known pixels kept
    err = lambda x: float(((x.astype(np.float64) - originals.astype(np.float64)) ** 2)[:, m].mean())
    return err(completions), err(recons)


def build_parser():
    p = argparse.ArgumentParser(description="Zero-shot editing with a trained FlowAR (no fine-tuning).")
    p.add_argument('--ckpt', required=True, help="train.py checkpoint (OUT/ckpt.pt)")
    p.add_argument('--vae', help="VAE checkpoint (default: the one recorded in --ckpt)")
    p.add_argument('--task', choices=TASKS, required=True)
    p.add_argument('--data-dir', default='data', help="folder holding cifar-10-batches-py/ (the test images)")
    p.add_argument('--images', default='0,1,2,3', help="CIFAR-10 test indices, comma-separated")
    p.add_argument('--png', help="edit this image instead (resized to 32x32); needs --target-class")
    p.add_argument('--target-class', type=int, help="generate this class (default: the image's own)")
    p.add_argument('--mechanism', choices=['inside', 'between'], default='inside',
                   help="force the known region at every Euler step and after each scale (inside), "
                        "or after each scale only (between)")
    p.add_argument('--k', type=int, default=1, help="refine: keep the image's scales 1..k")
    p.add_argument('--scales', type=_scales, help="the scale list (scale-free models), e.g. 1,2,4,8,16")
    p.add_argument('--num-steps', type=_steps, help="Euler steps, one value or one per scale")
    p.add_argument('--cfg', type=float)
    p.add_argument('--per-image', type=int, default=3, help="completions per image in the picture")
    p.add_argument('--out', help="PNG path (default: next to --ckpt, edit_<task>.png)")
    p.add_argument('--npz', help="measure: one completion for each of the first --num-images test images")
    p.add_argument('--num-images', type=int, default=1000)
    p.add_argument('--batch-size', type=int, default=100)
    p.add_argument('--seed', type=int, default=0)
    return p


def _scales(text):
    from sample import parse_scales
    return parse_scales(text)


def _steps(text):
    from sample import parse_steps
    return parse_steps(text)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.png and args.target_class is None:
        parser.error("--png needs --target-class (a PNG has no CIFAR-10 label)")
    if args.npz and args.png:
        parser.error("--npz measures on CIFAR-10 test images; --png is for a picture")
    for name in ('per_image', 'num_images', 'batch_size'):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        model, cfg = load_model_from_checkpoint(args.ckpt)
        vae, scale_factor = load_vae(args.vae or cfg['vae'])
    except FileNotFoundError as err:
        parser.error(str(err))
    if args.target_class is not None and not 0 <= args.target_class < model.num_classes:
        parser.error(f"--target-class must be in [0, {model.num_classes})")
    try:
        settings = sampling_settings(cfg.get('model_preset'), args.num_steps, args.cfg, None, None, args.scales)
        hws = model.layout(args.scales)[0]
    except ValueError as err:
        parser.error(str(err))
    if args.task in ('inpaint', 'outpaint') and hws[-1] != model.scales[-1]:
        parser.error("in- and out-painting keep the latent size as the last scale")
    if args.task == 'refine' and not 1 <= args.k < len(hws):
        parser.error(f"--k must be between 1 and {len(hws) - 1} (the scales kept), got {args.k}")
    if args.task == 'expand' and hws[-1] == model.scales[-1]:
        parser.error("--task expand needs --scales ending beyond the latent size, e.g. 1,2,4,8,16 "
                     "(a model trained with --pos-embed scale-free)")
    mask = pixel_mask(args.task, 32) if args.task in ('inpaint', 'outpaint') else None

    if args.png:
        images = np.asarray(Image.open(args.png).convert('RGB').resize((32, 32), Image.BICUBIC))[None]
        own = np.array([args.target_class])
    else:
        try:
            test_images, test_labels = load_cifar10(args.data_dir, train=False)
        except FileNotFoundError as err:
            parser.error(str(err))
        if args.npz:
            idx = np.arange(args.num_images)
        else:
            try:
                idx = np.array([int(i) for i in args.images.split(',')])
            except ValueError:
                parser.error(f"--images: comma-separated test indices, got {args.images!r}")
        if idx.min() < 0 or idx.max() >= len(test_images):
            parser.error(f"--images / --num-images must be within the {len(test_images)} test images")
        images, own = test_images[idx], test_labels[idx]
    labels = own if args.target_class is None else np.full_like(own, args.target_class)
    run = lambda imgs, ys, g: edit(model, vae, scale_factor, imgs, ys, task=args.task, settings=settings,
                                   generator=g, mask=mask, k=args.k, inside=args.mechanism == 'inside')
    if args.npz:
        return measure(args, run, vae, scale_factor, images, labels, mask)
    rows = []
    for j in range(len(images)):
        x = np.repeat(images[j:j + 1], args.per_image, 0)
        outs = run(x, np.repeat(labels[j:j + 1], args.per_image), chunk_generator(args.seed, j))
        shown = images[j].copy()
        if mask is not None:                                   # the input: unknown pixels grey
            shown[mask[0, 0].numpy() < 0.5] = 128
        big = lambda im: np.asarray(Image.fromarray(im).resize(outs.shape[1:3], Image.NEAREST))
        rows += [big(images[j]), big(shown)] + list(outs)
    grid = make_grid(np.stack(rows), nrow=args.per_image + 2)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f'edit_{args.task}.png')
    Image.fromarray(grid).save(out)
    print(f"wrote {out}: per row the original, the input, {args.per_image} completions ({args.task}, "
          f"{args.mechanism}, scales {[h for h, _ in hws]})")
    return out


def measure(args, run, vae, scale_factor, images, labels, mask):
    """One completion per image, in batches, -> args.npz (arr_0 images, labels) for metrics.py."""
    outs, t0 = [], time.time()
    for c, start in enumerate(range(0, len(images), args.batch_size)):
        stop = min(start + args.batch_size, len(images))
        outs.append(run(images[start:stop], labels[start:stop], chunk_generator(args.seed, c)))
        rate = stop / (time.time() - t0)
        print(f"[edit] {stop}/{len(images)} images, {rate:.1f} img/s, ETA {(len(images) - stop) / rate:.0f}s")
    outs = np.concatenate(outs)
    np.savez(args.npz, arr_0=outs, labels=labels)
    print(f"wrote {args.npz}: {len(outs)} completions; score: python metrics.py score {args.npz} --data-dir {args.data_dir}")
    if mask is not None:
        with torch.no_grad():
            recons = np.concatenate([decode(vae, encode(vae, images[s:s + 500], scale_factor), scale_factor)
                                     for s in range(0, len(images), 500)])
        for margin in (0, 4):
            comp, rec = known_region_error(images, outs, recons, mask, margin)
            print(f"[edit] known region{f' farther than {margin} px from the unknown' if margin else ''}, "
                  f"mean squared error vs the originals (0-255): completions {comp:.1f}, the VAE's "
                  f"reconstructions {rec:.1f} (ratio {comp / rec:.2f})")
    return args.npz


if __name__ == '__main__':
    main()
