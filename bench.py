"""
Speed of flowar.py on this machine, as a share of the machine's own matmul rate.

    python bench.py                          # presets toy and S
    python bench.py --presets toy --quick    # a quick check
    python bench.py --device cuda --bf16     # on a GPU, bf16 autocast
    python bench.py --device cuda --bf16 --compile --presets S   # and torch.compile

Per preset, on random data: `train` (Eq. 9 + backward + AdamW), `sample` (model.sample at
flowar.SAMPLING_DEFAULTS), the AR stage of sampling with and without the KV cache. Per row:
median seconds per call after --warmup calls (min-max), images/s, FLOPs per image (products
and attention), GFLOP/s and its *share of the matmul rate* (2048^3, measured first: optimise
the share, times drift; --compile: FLOPs counted eager). On a CPU a profiled call gives the
share its products reach alone (the ceiling at these shapes) and their part of the time.
Peak memory: CUDA's, or the process RSS so far (it includes the rows above).
Run times of these commands and the results: docs/speed.md.

In file order: the FLOP and timing helpers, measure (one row), bench_preset (the rows of one
preset), print_table, main.
"""

import argparse
import json
import resource
import statistics
import time

import torch
from torch.utils import flop_counter

import data
import flowar

LATENT_SHAPES = {'toy': (4, 8, 8), 'S': (16, 16, 16)}          # (C, H, W): the last scale
BATCH = {'cpu': {'toy': (64, 100), 'S': (4, 2)}, 'cuda': {'toy': (256, 256), 'S': (64, 64)}}  # (train, sample)

# FlopCounterMode has no formula for the CPU attention kernel: torch's own SDPA formulas
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, **kw: flop_counter.sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, **kw: flop_counter.sdpa_backward_flop_count(g, q, k, v),
}
PRODUCT_OPS = {'aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm',  # the ops of the counted FLOPs
               *(f'aten::{op.__name__}' for op in CPU_SDPA_FLOPS)}


def products_seconds(fn):
    """One call of fn under torch.profiler (CPU): (self seconds of PRODUCT_OPS, seconds in all)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in PRODUCT_OPS) / 1e6, total


def time_calls(fn, device, warmup, repeats):
    """fn() `warmup` times untimed, then `repeats` times -> list of seconds."""
    times = []
    for _ in range(warmup + repeats):    # each call ends synchronised, so the next starts clean
        t0 = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times[warmup:]


def matmul_rate(device, dtype, n=2048, repeats=10):
    """FLOP/s of n x n x n matrix products on this device (2 n^3 FLOPs each), median."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / statistics.median(time_calls(lambda: a @ b, device, 3, repeats))


def measure(name, fn, images, device, args, rate, repeats=None, compile_modules=()):
    """Count fn's FLOPs (eager), compile `compile_modules` if --compile, time fn: one row."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as fc:
        fn()
    flops = fc.get_total_flops()
    products_s, profiled_s = products_seconds(fn) if device.type == 'cpu' else (float('nan'),) * 2
    if args.compile:
        for m in compile_modules:
            m.compile()  # in place: the module keeps its parameters and names
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    times = time_calls(fn, device, args.warmup, repeats or args.repeats)
    med = statistics.median(times)
    peak_mib = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == 'cuda'
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
    return dict(work=name, batch=images, median_s=med, min_s=min(times), max_s=max(times),
                images_per_s=images / med, gflop_per_image=flops / images / 1e9,
                gflop_per_s=flops / med / 1e9, share=flops / med / rate, peak_mib=peak_mib,
                products_share=flops / products_s / rate, products_part=products_s / profiled_s)


def bench_preset(preset, device, args, rate):
    torch.manual_seed(0)
    model = flowar.FlowAR.from_preset(preset).to(device)
    div = 4 if args.quick else 1                                      # --quick: 1/4 of the batches
    train_b, sample_b = (max(1, b // div) for b in BATCH[device.type][preset])
    latents = torch.randn((train_b,) + LATENT_SHAPES[preset], device=device)
    noise = [torch.randn(train_b, model.latent_channels, h, w, device=device) for h, w in model.scales]
    t, rows = torch.rand(train_b, len(model.scales), device=device), []
    labels = torch.randint(0, model.num_classes, (max(train_b, sample_b),), device=device)

    # train: forward (Eq. 9) + backward + AdamW
    opt, _ = torch.optim.AdamW(model.parameters(), lr=1e-4), model.train()

    def train_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            loss, _ = model(latents, labels[:train_b], noise, t)   # Eq. 9
        loss.backward()
        opt.step()
    rows.append(measure('train (fwd+bwd+AdamW)', train_step, train_b, device, args, rate, compile_modules=[model]))

    # sample: the preset's sampling defaults, one call = sample_b images
    sd, gen, _ = flowar.SAMPLING_DEFAULTS[preset], torch.Generator(device=device), model.eval()

    def sample():
        gen.manual_seed(0)
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            model.sample(labels[:sample_b], generator=gen, **sd)
    name = f"sample ({sd['num_steps']} steps, cfg {sd['cfg']}{' ramp' if sd['cfg_ramp'] else ''})"
    blocks = [*model.encoder_blocks, *model.decoder_blocks, model.flownet]   # what sampling calls (compiled)
    rows.append(measure(name, sample, sample_b, device, args, rate, args.sample_repeats, blocks))

    # kv: the AR stage with and without the cache, on the CFG batch of sampling
    y = torch.cat([labels[:sample_b], torch.full((sample_b,), model.num_classes, device=device)])
    maps = [torch.randn(len(y), model.latent_channels, h, w, device=device) for h, w in model.scales[:-1]]

    def with_cache():
        caches = [dict() for _ in range(len(model.encoder_blocks) + len(model.decoder_blocks))]
        return [model.transformer(model.scale_input(i, y, maps[i - 1] if i else None), y,
                                  start=sl.start, caches=caches) for i, sl in enumerate(model.slices)]

    def without_cache():
        return [model.transformer(model.ar_input_tokens(maps[:i], y), y)[:, sl]
                for i, sl in enumerate(model.slices)]
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
        diff = max((a - b).abs().max().item() for a, b in zip(with_cache(), without_cache()))
        kv = [measure(n, f, len(y), device, args, rate) for n, f in
              (('AR stage, KV cache', with_cache), ('AR stage, no cache', without_cache))]
    for r in rows + kv:
        r.update(preset=preset, params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    kv[0].update(max_abs_diff=diff, tokens=model.seq_len, token_passes=sum(s.stop for s in model.slices))
    return rows, kv


def print_table(rows, kv, rate, device, args):
    print(f"\nmatmul rate (2048^3, {'bf16' if args.bf16 else 'fp32'}){' --compile' if args.compile else ''}: {rate / 1e9:.0f} GFLOP/s on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| preset | params | work | batch | s per call: median (min-max) | images/s | GFLOP/image "
          "| GFLOP/s | share of matmul rate | its products: share, part of the time | peak MiB |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows + kv:
        print(f"| {r['preset']} | {r['params_m']:.1f}M | {r['work']} | {r['batch']} | {r['median_s']:.3f} "
              f"({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['images_per_s']:.2f} | {r['gflop_per_image']:.3g} "
              f"| {r['gflop_per_s']:.1f} | {100 * r['share']:.0f}% | {100 * r['products_share']:.0f}%, "
              f"{100 * r['products_part']:.0f}% | {r['peak_mib']:.0f} |")
    print("\nKV cache (AR stage only): speed-up = no-cache / cached median time; ideal = token passes "
          "without / with the cache (sum_i P_i / L); diff = max |cached - recomputed| s-hat.\n")
    print("| preset | speed-up | ideal (tokens) | FLOPs ratio | max abs diff |\n|---|---|---|---|---|")
    for c, n in zip(kv[0::2], kv[1::2]):
        passes, L = c['token_passes'], c['tokens']
        print(f"| {c['preset']} | {n['median_s'] / c['median_s']:.2f}x | {passes / L:.2f}x ({passes}/{L}) "
              f"| {n['gflop_per_image'] / c['gflop_per_image']:.2f}x | {c['max_abs_diff']:.1e} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--presets', default='toy,S', help="comma-separated: toy, S")
    p.add_argument('--repeats', type=int, default=5, help="timed calls (train, kv)")
    p.add_argument('--sample-repeats', type=int, default=3, help="timed sampling calls")
    p.add_argument('--warmup', type=int, default=2, help="untimed calls first")
    p.add_argument('--quick', action='store_true', help="1 warm-up, 2 repeats, 1/4 of the batches")
    p.add_argument('--bf16', action='store_true', help="bf16 autocast (and a bf16 matmul rate)")
    p.add_argument('--compile', action='store_true', help="torch.compile the model (train) and its blocks (sample)")
    p.add_argument('--json', help="also write every number to this file")
    args = p.parse_args(argv)
    presets = args.presets.split(',')
    if any(s not in LATENT_SHAPES for s in presets):
        p.error(f"--presets: choose from {', '.join(LATENT_SHAPES)}, got {args.presets!r}")
    if min(args.repeats, args.sample_repeats) < 1 or args.warmup < 0:
        p.error("--repeats and --sample-repeats must be >= 1, --warmup >= 0")
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU")
    if args.quick:
        args.warmup, args.repeats, args.sample_repeats = 1, 2, 1
    device = torch.device(args.device)
    rate = matmul_rate(device, torch.bfloat16 if args.bf16 else torch.float32)
    results = [bench_preset(preset, device, args, rate) for preset in presets]
    rows, kv = [r for rs, _ in results for r in rs], [k for _, ks in results for k in ks]
    print_table(rows, kv, rate, device, args)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(matmul_gflop_per_s=rate / 1e9, rows=rows + kv, args=vars(args)), f, indent=1)


if __name__ == '__main__':
    data.keep_freed_memory()  # CPU: reuse freed memory instead of page-faulting it back in
    main()
