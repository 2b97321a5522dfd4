"""
Speed and memory benchmark of flowar.py on the current device.

    python bench.py                                  # presets toy and S, default device
    python bench.py --quick --presets toy            # ~10 s on a 2-core CPU
    python bench.py --quick --presets toy,S          # ~1-2 minutes on a 2-core CPU
    python bench.py --device cuda --bf16 --json out/bench.json

For every preset it measures, on random data of the right shapes (the numbers do not depend
on what the tensors hold, only on their shapes):

  1. train   images/s of one optimisation step: forward (the flow-matching loss over all
             scales) + backward + AdamW step, model in train mode.
  2. sample  images/s of `model.sample` at the preset's released settings
             (flowar.SAMPLING_DEFAULTS: Euler steps, CFG weight, guidance interval), eval
             mode, no_grad. With CFG the model runs on 2x the batch (cond + uncond halves);
             the images/s count only the B images that come out.
  3. kv      the AR stage of sampling only (the per-scale calls of the scale Transformer,
             no flow head), (a) with the KV cache, as `model.sample` does it, and (b)
             without a cache, recomputing the whole prefix for every scale. Reported: the
             measured speed-up t_nocache / t_cache next to its ideal (see `ideal_kv_speedup`)
             and the max abs difference of the two results (a semantic sanity check: both
             must give the same s-hat of every scale).
  4. memory  on CUDA torch.cuda.max_memory_allocated, reset before each measurement; on CPU
             the peak resident set size (ru_maxrss) of a *fresh worker process* that builds
             the model and runs only that measurement. So a CPU peak includes the Python +
             torch baseline and the model's weights (the "model only" column shows the RSS
             just after the model was built, before the measurement). ru_maxrss is in KiB
             on Linux; the table shows MiB.

Each (preset, measurement) pair runs in its own subprocess (this file with the hidden
`--_worker` flag), so measurements do not share allocator state or peak counters, and one
that runs out of memory does not stop the others (`--inline` runs everything in this process
instead; then CPU peaks are "process peak so far" and are labelled that way).

Methodology: `--warmup` untimed iterations first (first calls pay for lazy initialisation,
allocator growth, oneDNN/cuBLAS kernel selection, CPU caches), then `--repeats` timed ones
with time.perf_counter (after torch.cuda.synchronize() on CUDA, since kernels run
asynchronously). We report the MEDIAN time: on a machine with other work, a few repeats get
preempted and come out much slower; the median ignores them while a mean would not. Min and
max are printed too: min ~ best case on a quiet machine, max - min ~ how noisy the run was.
Sampling is timed with fewer repeats (`--sample-repeats`, default 3) because one call is
long, and warmed up with 2 Euler steps (same shapes, see bench_sample). The two KV timings
are interleaved (cached, uncached, cached, ...) so that load changing over time hits both.
Defaults: 2 warm-up + 5 timed repeats; `--quick`: 1 + 2 (sampling 1) and smaller CPU batches.

Runtime deps: torch and the standard library (like flowar.py).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import flowar

# Latent shape (C, H, W) per preset: the last scale is the latent size.
LATENT_SHAPES = {'toy': (4, 8, 8), 'S': (16, 16, 16)}

# Default batch sizes: {device: {preset: (train batch, sample batch)}}; --quick on CPU uses
# the smaller ones so that `--quick --presets toy,S` takes ~1-2 minutes on 2 cores.
DEFAULT_BATCH = {
    'cpu': {'toy': (32, 16), 'S': (4, 4)},
    'cuda': {'toy': (256, 256), 'S': (64, 64)},
}
QUICK_BATCH = {
    'cpu': {'toy': (16, 8), 'S': (2, 1)},
    'cuda': {'toy': (256, 256), 'S': (64, 64)},
}
MEASUREMENTS = ('train', 'sample', 'kv')


# ---------------------------------------------------------------------------------------
# The ideal speed-up of the KV cache
# ---------------------------------------------------------------------------------------

def ideal_kv_speedup(slices):
    """Token-count ideal of the KV cache for the AR stage.

    With the cache, step i feeds only the N_i tokens of scale i (their queries attend to the
    cached keys of scales < i): over all scales every token is processed once, L tokens in
    all (341 for 1-2-4-8-16). Without a cache, step i recomputes the whole prefix, P_i =
    N_1 + ... + N_i tokens; over all steps that is sum_i P_i tokens (1 + 5 + 21 + 85 + 341 =
    453 for 1-2-4-8-16). If the cost were proportional to the number of tokens (true for the
    Linear layers, which dominate at these lengths), the speed-up would be sum_i P_i / L
    = 453 / 341 = 1.33x. It is small because the last scale alone holds 75% of the tokens:
    the cache only saves recomputing the (short) prefix.

    The measured ratio can differ from it either way:
      * higher: attention is quadratic in length. Without a cache the last step runs dense
        masked attention over 341 x 341 (SDPA with a boolean mask does not skip the masked
        blocks), the cached step 256 x 341 queries x keys; see `flop_kv_speedup`.
      * lower: every call has a fixed cost that does not shrink with the number of tokens:
        Python and kernel launches, and above all reading every weight of the Transformer
        once per call. At a few tokens the Linear layers are memory-bound (matrix-vector
        products): for S that is ~130M parameters = 0.5 GB of fp32 per call, including the
        adaLN Linear (6 D^2 per block) that runs once per sample whatever the length; on one
        CPU core the 1-token scale-0 call costs about as much as a ~20-token one. Both ways
        make the same 5 calls, so these costs add the same amount to both times and pull
        the ratio towards 1: small inputs (toy preset, small batches, fast GPUs) show less
        than the ideal. The cache also pays for torch.cat of the keys and values.
    Neither ideal includes the flow head, which dominates sampling time (25 Euler steps
    per scale), so the end-to-end effect of the cache on sampling is much smaller still.
    returns (sum_i P_i, L, ratio).
    """
    prefix = [sl.stop for sl in slices]       # P_i: tokens of scales 0..i
    total = slices[-1].stop                   # L
    return sum(prefix), total, sum(prefix) / total


def flop_kv_speedup(model):
    """The same ratio from a multiply-add count of the AR Transformer as it executes:
    per block and token the Linear layers (qkv 3D^2, proj D^2, gated MLP 3 D hidden) plus
    attention 2 D per (query, key) pair; with the cache, step i has N_i queries x P_i keys;
    without, P_i x P_i (dense masked attention). Embeddings and norms are left out."""
    cfg = model.config
    D = cfg['ar_dim']
    hidden = int(D * cfg['mlp_ratio'] * 2 / 3)
    lin = 3 * D * D + D * D + 3 * D * hidden
    cached = nocache = 0
    for sl in model.slices:
        n, p = sl.stop - sl.start, sl.stop
        cached += n * lin + n * p * 2 * D
        nocache += p * lin + p * p * 2 * D
    return nocache / cached


def _check_ideal_formula():
    """The brief's number: scales 1-2-4-8-16 give 453 / 341 = 1.33x."""
    s, L, r = ideal_kv_speedup(flowar.scale_slices((1, 2, 4, 8, 16)))
    assert (s, L) == (453, 341) and abs(r - 453 / 341) < 1e-12, (s, L, r)
    return r


# ---------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------

def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Wall-clock seconds of one call of fn (synchronised before and after on CUDA)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_repeats(fn, device, warmup, repeats, warmup_fn=None):
    """Runs (warmup_fn or fn) `warmup` times untimed, then fn `repeats` times; returns the
    list of wall-clock seconds of the timed calls."""
    for _ in range(warmup):
        (warmup_fn or fn)()
    return [timed(fn, device) for _ in range(repeats)]


def time_interleaved(fns, device, warmup, repeats):
    """Like time_repeats for several functions, run in turn (a, b, a, b, ...) so that a slow
    spell of a shared machine hits all of them alike; returns one list of seconds per fn.
    Used for the two ways of the KV measurement, whose *ratio* we report."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            ts.append(timed(fn, device))
    return times


def summarize(times):
    return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                times_s=times)


def rss_kib():
    """Peak RSS of this process so far, KiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == 'darwin' else r


def autocast(device, bf16):
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def random_batch(preset, batch, device, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((batch,) + LATENT_SHAPES[preset], generator=g).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return latents, labels


# ---------------------------------------------------------------------------------------
# The three measurements (each returns a dict of numbers)
# ---------------------------------------------------------------------------------------

def bench_train(model, preset, batch, device, args):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    latents, labels = random_batch(preset, batch, device, model.num_classes)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, args.bf16):
            loss, _ = model(latents, labels)
        loss.backward()
        opt.step()

    r = summarize(time_repeats(step, device, args.warmup, args.repeats))
    r['images_per_s'] = batch / r['median_s']
    return r


def bench_sample(model, preset, batch, device, args):
    model.eval()
    settings = dict(flowar.SAMPLING_DEFAULTS[preset])
    _, labels = random_batch(preset, batch, device, model.num_classes)
    gen = torch.Generator(device=device)

    def run(num_steps):
        gen.manual_seed(0)
        with torch.no_grad(), autocast(device, args.bf16):
            model.sample(labels, num_steps=num_steps, cfg=settings['cfg'],
                         guidance=settings['guidance'], cfg_ramp=settings.get('cfg_ramp', True),
                         generator=gen)

    # Warm-up with 2 Euler steps (the minimum): it runs every shape of the real call (all
    # scales, AR step, flow head with and without guidance), which is what warming up is
    # for; more Euler steps would only repeat the same shapes and cost minutes on a CPU.
    r = summarize(time_repeats(lambda: run(settings['num_steps']), device, args.warmup,
                               args.sample_repeats, warmup_fn=lambda: run(2)))
    r['images_per_s'] = batch / r['median_s']
    r.update(settings)
    return r


def bench_kv(model, preset, batch, device, args):
    """AR stage of sampling with and without the KV cache (see ideal_kv_speedup)."""
    model.eval()
    C = model.latent_channels
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, model.num_classes + 1, (batch,), generator=g).to(device)
    # Stand-ins for the generated token maps s^1 .. s^{n-1} (s^n is never an AR input).
    maps = [torch.randn(batch, C, h, w, generator=g).to(device) for h, w in model.scales[:-1]]
    n_blocks = len(model.encoder_blocks) + len(model.decoder_blocks)

    def with_cache():
        # Exactly the AR step of model.sample: scale i's own input tokens, cached keys.
        caches = [dict() for _ in range(n_blocks)]
        outs = []
        for i, (hw, sl) in enumerate(zip(model.scales, model.slices)):
            if i == 0:
                x_in = model.class_emb(labels)[:, None].expand(-1, sl.stop, -1)
            else:
                up = flowar.upsample_to_next(maps[i - 1], model.scales[-1], hw)
                x_in = model.z_proj(flowar.tokens_from_map(up))
            outs.append(model.transformer(x_in, labels, start=sl.start, caches=caches))
        return outs

    def without_cache():
        # Recompute the whole prefix (scales 0..i, block-causal mask) for every scale i and
        # keep the last scale's slice.
        outs = []
        for i, sl in enumerate(model.slices):
            x_in = model.ar_input_tokens(maps[:i], labels)          # (B, P_i, D)
            outs.append(model.transformer(x_in, labels)[:, sl])
        return outs

    with torch.no_grad(), autocast(device, args.bf16):
        a, b = with_cache(), without_cache()
        max_diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
        max_abs = max(y.float().abs().max().item() for y in b)
        tc, tn = time_interleaved([with_cache, without_cache], device, args.warmup, args.repeats)
    t_cache, t_nocache = summarize(tc), summarize(tn)
    tok_sum, L, ideal = ideal_kv_speedup(model.slices)
    # Both ways compute the same function; they differ only by rounding (different GEMM
    # shapes and summation orders), ~1e-6 in fp32, up to a few % of the values in bf16.
    tol = (5e-2 if args.bf16 else 1e-4) * max(1.0, max_abs)
    return dict(cache=t_cache, nocache=t_nocache,
                speedup=t_nocache['median_s'] / t_cache['median_s'],
                # ratio within each (cached, uncached) pair of neighbouring runs: less
                # sensitive to load that changes over time than the ratio of medians
                speedup_paired_median=statistics.median(n / c for n, c in zip(tn, tc)),
                ideal_tokens=ideal, ideal_tokens_frac=f"{tok_sum}/{L}",
                ideal_flops=flop_kv_speedup(model),
                max_abs_diff=max_diff, max_abs_value=max_abs, tol=tol, same=max_diff <= tol)


BENCHES = {'train': bench_train, 'sample': bench_sample, 'kv': bench_kv}


def run_measurement(preset, what, args, inline=False):
    """Builds the model and runs one measurement; returns a dict (numbers + memory)."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = flowar.FlowAR.from_preset(preset).to(device)
    train_b, sample_b = args.batches[preset]
    cfg = flowar.SAMPLING_DEFAULTS[preset]['cfg']
    # The AR batch of sampling is 2B with CFG (cond + uncond halves): time it at that size.
    batch = {'train': train_b, 'sample': sample_b,
             'kv': args.kv_batch or sample_b * (2 if cfg != 1.0 else 1)}[what]
    out = dict(preset=preset, what=what, batch=batch,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6,
               threads=torch.get_num_threads())
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        out['model_mem_mib'] = torch.cuda.memory_allocated(device) / 2 ** 20
    else:
        out['model_rss_mib'] = rss_kib() / 1024
    out.update(BENCHES[what](model, preset, batch, device, args))
    if device.type == 'cuda':
        out['peak_mem_mib'] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        out['peak_mem_kind'] = 'cuda max_memory_allocated'
    else:
        out['peak_mem_mib'] = rss_kib() / 1024
        out['peak_mem_kind'] = 'process peak RSS so far' if inline else 'peak RSS of a fresh worker'
    return out


# ---------------------------------------------------------------------------------------
# Orchestration and the table
# ---------------------------------------------------------------------------------------

def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_batches(text, presets):
    """'8' -> every preset; 'toy=32,S=4' -> per preset; None -> {}."""
    if not text:
        return {}
    if '=' not in text:
        return {p: int(text) for p in presets}
    out = {}
    for part in text.split(','):
        k, v = part.split('=')
        out[k.strip()] = int(v)
    return out


def worker_cmd(args, preset, what, out_path):
    cmd = [sys.executable, os.path.abspath(__file__), '--_worker', f'{preset}:{what}',
           '--_out', out_path, '--device', args.device, '--presets', args.presets,
           '--repeats', str(args.repeats), '--sample-repeats', str(args.sample_repeats),
           '--warmup', str(args.warmup),
           '--train-batch', ','.join(f'{p}={b[0]}' for p, b in args.batches.items()),
           '--sample-batch', ','.join(f'{p}={b[1]}' for p, b in args.batches.items())]
    if args.kv_batch:
        cmd += ['--kv-batch', str(args.kv_batch)]
    if args.threads:
        cmd += ['--threads', str(args.threads)]
    if args.bf16:
        cmd.append('--bf16')
    return cmd


def base_mem(r):
    """Memory just after building the model, before the measurement: RSS on CPU (Python +
    torch + weights), memory_allocated on CUDA (weights)."""
    v = r.get('model_rss_mib', r.get('model_mem_mib'))
    return '' if v is None else f"{v:.0f}"


def fmt_t(r):
    return f"{r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f})"


def print_tables(results, args):
    mem_kind = next((r['peak_mem_kind'] for r in results if 'peak_mem_kind' in r), '-')
    print(f"Throughput. Time per call in s: median (min-max) of the timed repeats; images/s = "
          f"batch / median. Peak memory = {mem_kind}; 'model only' = the same just after "
          f"building the model.")
    print()
    base_col = 'model only (MiB)'
    print(f"| preset | params | measurement | batch | s per call: median (min-max) | images/s | "
          f"peak mem (MiB) | {base_col} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if r['what'] == 'kv':
            continue
        if 'error' in r:
            print(f"| {r['preset']} | | {r['what']} | {r.get('batch', '')} | error: {r['error']} | | | |")
            continue
        what = r['what']
        if what == 'sample':
            what = f"sample ({r['num_steps']} steps, cfg {r['cfg']}, guidance {r['guidance']})"
        else:
            what = 'train (fwd+bwd+AdamW)'
        print(f"| {r['preset']} | {r['params_m']:.1f}M | {what} | {r['batch']} | {fmt_t(r)} | "
              f"{r['images_per_s']:.2f} | {r['peak_mem_mib']:.0f} | {base_mem(r)} |")
    print()
    print("KV cache, AR stage of sampling only (per-scale Transformer calls, no flow head). "
          "Batch = the AR batch of sampling (2x with CFG). Ideal (tokens) = sum_i P_i / L; "
          "ideal (FLOPs) adds dense attention cost; speed-up = ratio of medians (paired = median of "
          "the ratios of neighbouring runs); diff = max |cached - recomputed| s-hat.")
    print()
    print("| preset | batch | cached s: median (min-max) | no cache s: median (min-max) | speed-up "
          "(paired) | ideal (tokens) | ideal (FLOPs) | max abs diff | peak mem (MiB) | model only (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r['what'] != 'kv':
            continue
        if 'error' in r:
            print(f"| {r['preset']} | {r.get('batch', '')} | error: {r['error']} | | | | | | | |")
            continue
        same = '' if r['same'] else ' MISMATCH'
        print(f"| {r['preset']} | {r['batch']} | {fmt_t(r['cache'])} | {fmt_t(r['nocache'])} | "
              f"{r['speedup']:.2f}x ({r['speedup_paired_median']:.2f}x) | "
              f"{r['ideal_tokens']:.2f}x ({r['ideal_tokens_frac']}) | {r['ideal_flops']:.2f}x | "
              f"{r['max_abs_diff']:.1e}{same} | {r['peak_mem_mib']:.0f} | {base_mem(r)} |")
    print()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   choices=['cpu', 'cuda'])
    p.add_argument('--presets', default='toy,S', help="comma-separated, of: toy, S")
    p.add_argument('--measure', default=','.join(MEASUREMENTS),
                   help="comma-separated subset of train,sample,kv")
    p.add_argument('--train-batch', default=None, help="N for all presets, or toy=32,S=4")
    p.add_argument('--sample-batch', default=None, help="N for all presets, or toy=16,S=4")
    p.add_argument('--kv-batch', type=int, default=None,
                   help="AR batch of the KV measurement (default: sample batch x2 with CFG)")
    p.add_argument('--repeats', type=int, default=None, help="timed repeats (default 5, quick 2)")
    p.add_argument('--sample-repeats', type=int, default=None,
                   help="timed repeats of sampling (default 3, quick 1): one call is long")
    p.add_argument('--warmup', type=int, default=None, help="untimed iterations (default 2, quick 1)")
    p.add_argument('--quick', action='store_true', help="fewer repeats, smaller CPU batches")
    p.add_argument('--bf16', action='store_true', help="bf16 autocast (CUDA only)")
    p.add_argument('--threads', type=int, default=None, help="torch.set_num_threads in the workers")
    p.add_argument('--inline', action='store_true',
                   help="run in this process, no worker subprocesses (CPU peak = process peak so far)")
    p.add_argument('--json', default=None, help="also write all numbers to this JSON file")
    p.add_argument('--_worker', default=None, help=argparse.SUPPRESS)
    p.add_argument('--_out', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    presets = [s.strip() for s in args.presets.split(',') if s.strip()]
    for name in presets:
        if name not in LATENT_SHAPES:
            p.error(f"unknown preset {name!r}; this benchmark knows {sorted(LATENT_SHAPES)}")
    measures = [s.strip() for s in args.measure.split(',') if s.strip()]
    if not set(measures) <= set(MEASUREMENTS):
        p.error(f"--measure: choose from {MEASUREMENTS}")
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.bf16 and args.device != 'cuda':
        p.error("--bf16 is for CUDA only")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.sample_repeats is None:
        args.sample_repeats = 1 if args.quick else 3
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    base = (QUICK_BATCH if args.quick else DEFAULT_BATCH)[args.device]
    tb, sb = parse_batches(args.train_batch, presets), parse_batches(args.sample_batch, presets)
    args.batches = {name: (tb.get(name, base[name][0]), sb.get(name, base[name][1])) for name in presets}

    if args._worker:  # hidden: one measurement in this (fresh) process, result to --_out
        preset, what = args._worker.split(':')
        res = run_measurement(preset, what, args)
        with open(args._out, 'w') as f:
            json.dump(res, f)
        return 0

    ideal_ref = _check_ideal_formula()
    device = torch.device(args.device)
    threads = args.threads or torch.get_num_threads()
    header = "\n".join([
        "FlowAR benchmark (bench.py)",
        f"device: {args.device} = {device_name(device)}"
        + (f"; torch threads {threads} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
           f"{os.cpu_count()} logical CPUs" if device.type == 'cpu' else
           f"; CUDA {torch.version.cuda}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}"),
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.platform()}",
        f"settings: presets {presets}, measurements {measures}, "
        f"batches (train, sample) {args.batches}, kv batch {args.kv_batch or 'sample x2 with CFG'}, "
        f"warmup {args.warmup}, repeats {args.repeats} (sampling {args.sample_repeats}), "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, quick={args.quick}, "
        f"{'inline' if args.inline else 'one fresh worker process per measurement'}",
        f"sampling settings (flowar.SAMPLING_DEFAULTS): "
        + ", ".join(f"{n} {flowar.SAMPLING_DEFAULTS[n]}" for n in presets),
        f"KV ideal check: scales 1-2-4-8-16 -> 453/341 = {ideal_ref:.4f}x",
    ])
    print(header, flush=True)

    results = []
    t_all = time.perf_counter()
    for preset in presets:
        for what in measures:
            t0 = time.perf_counter()
            print(f"... {preset} {what}", end='', flush=True)
            if args.inline:
                try:
                    res = run_measurement(preset, what, args, inline=True)
                except Exception as e:  # e.g. out of memory: report it, go on
                    res = dict(preset=preset, what=what, error=f"{type(e).__name__}: {e}"[:200])
            else:
                fd, path = tempfile.mkstemp(suffix='.json', prefix='flowar_bench_')
                os.close(fd)
                try:
                    proc = subprocess.run(worker_cmd(args, preset, what, path),
                                          capture_output=True, text=True)
                    if proc.returncode == 0:
                        with open(path) as f:
                            res = json.load(f)
                    else:
                        last = (proc.stderr.strip().splitlines() or ['?'])[-1]
                        res = dict(preset=preset, what=what, error=f"worker rc {proc.returncode}: {last}"[:200])
                        sys.stderr.write(proc.stderr)
                finally:
                    os.unlink(path)
            print(f" {time.perf_counter() - t0:.1f}s", flush=True)
            results.append(res)
    print(f"total {time.perf_counter() - t_all:.1f}s\n")
    print_tables(results, args)

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(dict(device=args.device, device_name=device_name(device),
                           torch=torch.__version__, threads=threads, settings=dict(
                               presets=presets, measures=measures, batches=args.batches,
                               kv_batch=args.kv_batch, warmup=args.warmup, repeats=args.repeats,
                               sample_repeats=args.sample_repeats, bf16=args.bf16,
                               quick=args.quick, inline=args.inline),
                           results=results), f, indent=2)
        print(f"wrote {args.json}")
    bad = [r for r in results if 'error' in r or (r['what'] == 'kv' and not r['same'])]
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
