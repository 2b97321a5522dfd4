"""
The course kit: assignments made from the reference itself, its tests as the autograder.

An exercise is a piece of the paper (an equation or a step of the method), the functions of
this repository that implement it, and the tests that pin them. A student copy is this
repository with those functions' bodies replaced by their docstrings and a
`raise NotImplementedError`, found with `ast` (no markers in the reading code); everything
else is byte-identical, so the exercise cannot drift from the code it came from.

    python course.py list                                  the exercises, in the paper's order
    python course.py make scale-pyramid,cfg --out ../hw    a student copy (or --all)
    python course.py grade ../hw                           score each exercise in a copy
    python course.py grade ../hw --smoke                   ... and train a short run in it,
                                                           against the reference's curve
    python course.py grade .                               the reference: every exercise passes

Exercises build on earlier ones (`needs`): an exercise's tests run the functions of the
exercises it needs, so in a copy where one of those is still blank its tests fail too;
`grade` names it ("blocked by ..."). The tests of an exercise that does not need a blanked
one pass in the copy (tests/test_course.py checks this for every exercise, and that each
exercise's tests catch its typical wrong answers: the planted mistakes listed there).

Standard library only at import; `grade` runs pytest in a subprocess.
"""

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TF, TT = 'test_flowar.py', 'tests/test_train.py'

# id, the paper's place, the functions a student writes (file:qualified.name), the tests that
# grade it (pytest node ids; a parametrized test counts each case), the exercises it needs.
EXERCISES = [
    dict(id='scale-pyramid', paper='Eq. 5: the scale pyramid, every scale Down(F) of the full latent',
         functions=['flowar.py:build_scale_pyramid'],
         tests=[f'{TF}::TestScalePyramid::test_scale_pyramid_is_area_downsampling_of_the_full_latent',
                f'{TF}::TestScalePyramid::test_scale_pyramid_flexible_and_non_square_scales'],
         needs=[]),
    dict(id='upsample', paper='Eq. 6: Up(s^i), the input of scale i+1',
         functions=['flowar.py:upsample_to_next'],
         tests=[f'{TF}::TestUpsample::test_upsample_to_next_is_bicubic_to_full_then_area_down'],
         needs=[]),
    dict(id='causal-mask', paper='Sec. 3.2: the block-causal mask and the RoPE positions of every scale',
         functions=['flowar.py:block_causal_mask', 'flowar.py:token_positions'],
         tests=[f'{TF}::TestCausalTransformer::test_sequence_layout_mask_and_rope_positions'],
         needs=[]),
    dict(id='rope-2d', paper='Sec. 3.2: 2D rotary position embedding (rows, then columns)',
         functions=['flowar.py:RoPE2D.forward'],
         tests=[f'{TF}::TestCausalTransformer::test_rope_rotates_pairs_and_preserves_relative_positions'],
         needs=[]),
    dict(id='attention-kv-cache', paper='Eq. 6: attention of the scale Transformer, and its KV cache',
         functions=['flowar.py:attention', 'flowar.py:Attention.forward'],
         tests=[f'{TF}::TestCausalTransformer::test_attention_equals_torch_sdpa_with_and_without_a_mask',
                f'{TF}::TestCausalTransformer::test_attention_module_is_rope_on_queries_and_keys_then_attention',
                f'{TF}::TestCausalTransformer::test_block_causal_mask_changing_scale_k_plus_1_leaves_scales_up_to_k_unchanged',
                f'{TF}::TestCausalTransformer::test_kv_cache_scale_by_scale_equals_the_masked_forward'],
         needs=['scale-pyramid', 'upsample', 'causal-mask', 'rope-2d']),
    dict(id='interpolation', paper='Eq. 7-8: the interpolation F_t and the velocity target',
         functions=['flowar.py:FlowAR.interpolate'],
         tests=[f'{TF}::TestFlowMatchingLoss::test_interpolation_and_velocity_target_are_the_released_ones'],
         needs=[]),
    dict(id='loss', paper='Eq. 9: the flow-matching loss over all scales',
         functions=['flowar.py:FlowAR.forward'],
         tests=[f'{TF}::TestFlowMatchingLoss::test_loss_uses_released_interpolation_target_and_scale_weights',
                f'{TF}::TestFlowMatchingLoss::test_loss_gives_the_head_each_scales_own_semantics_time_and_positions',
                f'{TF}::TestFlowMatchingLoss::test_uniform_scale_weighting_is_the_plain_sum_of_eq9'],
         needs=['scale-pyramid', 'upsample', 'causal-mask', 'rope-2d', 'attention-kv-cache', 'interpolation']),
    dict(id='spatial-adaln', paper='Eq. 10: Spatial-adaLN, the modulation and the block',
         functions=['flowar.py:SpatialAdaLNBlock.modulation', 'flowar.py:SpatialAdaLNBlock.forward'],
         tests=[f'{TF}::TestSpatialAdaLN::test_spatial_adaln_reduces_to_adaln_for_constant_semantics_and_is_local',
                f'{TF}::TestSpatialAdaLN::test_spatial_adaln_block_is_eq10_written_out',
                f'{TF}::TestSpatialAdaLN::test_flow_head_uses_semantics_position_by_position'],
         needs=['rope-2d', 'attention-kv-cache']),
    dict(id='euler', paper='Sec. 3.2 inference: the Euler integrator and the released time grid',
         functions=['flowar.py:FlowAR.integrate', 'flowar.py:euler_time_grid'],
         tests=[f'{TF}::TestSampler::test_euler_moves_noise_to_a_gaussian_target_with_the_exact_velocity_field',
                f'{TF}::TestSampler::test_time_grids_are_the_released_ones'],
         needs=[]),
    dict(id='cfg', paper='Sec. 3.2 inference: CFG, its guidance interval and its ramp over scales',
         functions=['flowar.py:cfg_schedule', 'flowar.py:cfg_velocity'],
         tests=[f'{TF}::TestSampler::test_cfg_schedule_rises_linearly',
                f'{TF}::TestSampler::test_cfg_velocity_combines_the_halves_inside_the_guidance_interval',
                f'{TF}::TestSampler::test_cfg_combination_guidance_interval_and_euler_direction',
                f'{TF}::TestSampler::test_cfg_one_is_the_conditional_sample_and_guidance_outside_interval_is_off',
                f'{TF}::TestSampler::test_guided_steps_evaluate_both_halves_at_the_conditional_state'],
         needs=['upsample', 'causal-mask', 'rope-2d', 'attention-kv-cache', 'spatial-adaln', 'euler']),
    dict(id='randomness', paper='Sec. 4 training: t, the noise and the label drop of every sample',
         functions=['train.py:sample_randomness'],
         tests=[f'{TT}::test_sample_randomness_is_one_generator_per_seed_step_and_sample',
                f'{TT}::test_logit_normal_t_is_sigmoid_of_a_standard_normal',
                f'{TT}::test_label_dropout_uses_the_null_class'],
         needs=[]),
]
BY_ID = {ex['id']: ex for ex in EXERCISES}
POINTS = 10                       # per exercise, in proportion to its tests passed
BLANK = 'course exercise'         # how a blanked body's NotImplementedError message starts
SKIP = {'.git', 'out', 'runs', 'data', '__pycache__', '.pytest_cache'}  # never copied
STAFF_ONLY = {'tests/test_course.py'}                                     # not in a student copy


# ==== Finding and blanking functions with ast ==========================================

def find_function(tree, qualname):
    """The FunctionDef of 'name' or 'Class.name' at the top level of a module."""
    node, parts = tree, qualname.split('.')
    for part in parts:
        hits = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part]
        if not hits:
            raise KeyError(f"no {qualname!r}")
        node = hits[0]
    if not isinstance(node, ast.FunctionDef):
        raise KeyError(f"{qualname!r} is not a function")
    return node


def _split_body(fn):
    """(docstring node or None, the statements after it)."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], 'value', None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0], body[1:]
    return None, body


def body_lines(source, qualname):
    """How many source lines the reference body has, docstring and blank lines left out:
    an estimate of what a student writes."""
    fn = find_function(ast.parse(source), qualname)
    doc, rest = _split_body(fn)
    lines = source.splitlines()[rest[0].lineno - 1:fn.end_lineno] if rest else []
    return sum(1 for line in lines if line.strip() and not line.strip().startswith('#'))


def is_blank(source, qualname):
    """True when the function's body is still the kit's `raise NotImplementedError`."""
    doc, rest = _split_body(find_function(ast.parse(source), qualname))
    if len(rest) != 1 or not isinstance(rest[0], ast.Raise) or not isinstance(rest[0].exc, ast.Call):
        return False
    args = rest[0].exc.args
    return (getattr(rest[0].exc.func, 'id', '') == 'NotImplementedError' and bool(args)
            and isinstance(args[0], ast.Constant) and str(args[0].value).startswith(BLANK))


def blank_functions(source, qualnames, message):
    """`source` with each function's body (after its docstring) replaced by a raise of
    NotImplementedError(message); every other line unchanged."""
    lines = source.splitlines(keepends=True)
    spans = []
    for q in qualnames:
        fn = find_function(ast.parse(source), q)
        doc, rest = _split_body(fn)
        if not rest:
            raise ValueError(f"{q} has no body to blank")
        start = rest[0].lineno - 1                              # first line after the docstring
        indent = lines[start][:len(lines[start]) - len(lines[start].lstrip())]
        spans.append((start, fn.end_lineno, f"{indent}raise NotImplementedError({message!r})\n"))
    for start, end, new in sorted(spans, reverse=True):        # bottom up: line numbers stay valid
        lines[start:end] = [new]
    return ''.join(lines)


# ==== The commands =====================================================================

def exercise_table(root=ROOT):
    rows = []
    for n, ex in enumerate(EXERCISES, 1):
        lines = sum(body_lines((root / f).read_text(), q) for f, q in (s.split(':') for s in ex['functions']))
        rows.append((n, ex, lines))
    return rows


def cmd_list(args):
    print(f"{'#':>2}  {'exercise':<19} {'lines':>5}  paper / functions / tests / needs")
    for n, ex, lines in exercise_table():
        print(f"{n:>2}  {ex['id']:<19} {lines:>5}  {ex['paper']}")
        for f in ex['functions']:
            print(f"{'':29}writes  {f}")
        for t in ex['tests']:
            print(f"{'':29}graded  {t}")
        if ex['needs']:
            print(f"{'':29}needs   {', '.join(ex['needs'])}")
    print(f"\n{len(EXERCISES)} exercises, {POINTS} points each. `lines`: the reference's lines "
          f"(docstrings, comments and blank lines not counted).")


def repo_files(root):
    """The files of a repository that a copy holds: git's tracked and untracked-but-not-
    ignored files where it is a git checkout, else every file outside SKIP."""
    try:
        out = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'],
                             cwd=root, capture_output=True, text=True, check=True).stdout
        files = [f for f in out.splitlines() if (root / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(root)) for p in root.rglob('*')
                 if p.is_file() and not SKIP & set(p.relative_to(root).parts)]
    return sorted(f for f in files if not SKIP & set(Path(f).parts))


def make_copy(chosen, out, root=ROOT):
    """Write a student copy of `root` into `out` with the chosen exercises blanked."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new folder (or delete it)")
    by_file = {}
    for ex_id in chosen:
        ex = BY_ID[ex_id]
        for spec in ex['functions']:
            f, q = spec.split(':')
            by_file.setdefault(f, []).append((q, f"{BLANK} {ex_id} ({ex['paper'].split(':')[0]}): "
                                                 f"write {q}; python course.py grade . {ex_id}"))
    for f in repo_files(root):
        if f in STAFF_ONLY:
            continue
        dst = out / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        if f in by_file:
            src = (root / f).read_text()
            for q, msg in by_file[f]:
                src = blank_functions(src, [q], msg)
            dst.write_text(src)
        else:
            shutil.copy2(root / f, dst)
    (out / 'ASSIGNMENT.md').write_text(
        "# Assignment\n\nWrite the bodies of these functions (each keeps its docstring), in this order:\n\n"
        + ''.join(f"- **{e}** ({BY_ID[e]['paper']}): " + ', '.join(f"`{s}`" for s in BY_ID[e]['functions']) + "\n"
                  for e in [x['id'] for x in EXERCISES if x['id'] in chosen])
        + "\nCheck your work with `python course.py grade .` (one exercise: `python course.py grade . ID`;"
          " `--smoke` also trains a short run and compares its loss curve with the reference's).\n"
          "`python course.py list` shows which tests grade each exercise.\n")
    return out


def cmd_make(args):
    chosen = [e['id'] for e in EXERCISES] if args.all else args.exercises
    out = make_copy(chosen, args.out)
    print(f"wrote a student copy to {out} with {len(chosen)} exercise(s) blanked: {', '.join(chosen)}")
    print(f"hand it out; grade it with: python course.py grade {out}")


def run_tests(root, nodeids, timeout=1800):
    """Run pytest on nodeids in root; returns {nodeid-without-parameters: [passed bools]}."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, 'junit.xml')
        cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', f'--junitxml={xml}', *nodeids]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
        if not os.path.exists(xml):
            raise RuntimeError(f"pytest did not run in {root}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        results = {}
        for case in ET.parse(xml).getroot().iter('testcase'):
            # classname 'test_flowar.TestSampler' or 'tests.test_train'; name 'test_x[params]'
            key = case.get('classname') + '.' + case.get('name').split('[')[0]
            bad = [c for c in case if c.tag in ('failure', 'error')]
            if any(c.tag == 'skipped' for c in case):
                continue
            results.setdefault(key, []).append((not bad, bad[0].get('message', '') if bad else ''))
    return results


def _key(nodeid):
    """'test_flowar.py::TestSampler::test_x' -> 'test_flowar.TestSampler.test_x' (junit's names)."""
    path, *rest = nodeid.split('::')
    return '.'.join([path[:-3].replace('/', '.'), *rest])


def grade(root, chosen=None):
    """Score the chosen exercises (default: all) in the repository `root`: a list of rows
    (exercise, passed, total, points, status)."""
    root = Path(root)
    chosen = chosen or [e['id'] for e in EXERCISES]
    nodeids = sorted({t for e in chosen for t in BY_ID[e]['tests']})
    results = run_tests(root, nodeids)
    blank = {e['id'] for e in EXERCISES
             if any(is_blank((root / f).read_text(), q) for f, q in (s.split(':') for s in e['functions']))}
    rows = []
    for ex_id in chosen:
        ex = BY_ID[ex_id]
        outcomes = []
        for t in ex['tests']:
            got = results.get(_key(t))
            outcomes += got if got else [(False, 'not collected: is this a copy of the kit?')]
        passed, total = sum(ok for ok, _ in outcomes), len(outcomes)
        if passed == total:
            status = 'pass'
        elif ex_id in blank:
            status = 'not done (NotImplementedError)'
        elif blank & set(ex['needs']):
            status = 'blocked by ' + ', '.join(e for e in ex['needs'] if e in blank)
        else:
            first = next(msg for ok, msg in outcomes if not ok)
            status = 'fails: ' + (first.splitlines()[0][:70] if first else 'see pytest')
        rows.append(dict(exercise=ex_id, passed=passed, total=total,
                         points=round(POINTS * passed / total, 1), status=status))
    return rows


def print_grades(rows):
    print(f"| exercise | tests passed | points | status |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['exercise']} | {r['passed']} / {r['total']} | {r['points']:g} / {POINTS} | {r['status']} |")
    print(f"| **total** | {sum(r['passed'] for r in rows)} / {sum(r['total'] for r in rows)} | "
          f"{sum(r['points'] for r in rows):g} / {POINTS * len(rows)} | |")


# ==== --smoke: a short run in the copy against the reference's, same seed ================

# The shapes data set (no download) and a VAE trained once by the reference, then the same
# FlowAR run (seed, steps, batch) in the reference and in the copy: equal code gives an
# equal loss curve; a model that does not learn shows it.
SMOKE_ARGS = ['--preset', 'cifar-smoke', '--dataset', 'shapes', '--subset', '2000', '--max-steps', '300',
              '--log-every', '25', '--num-sample-classes', '4', '--seed', '0']
SMOKE_VAE_STEPS = '150'


def _train(name, root, out, extra, log):
    t0 = time.time()
    proc = subprocess.run([sys.executable, 'train.py', *SMOKE_ARGS, '--out', str(out), *extra],
                          cwd=root, capture_output=True, text=True)
    log_path = Path(out) / 'log.jsonl'
    curve = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    err = '' if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ['(no output)'])[-1]
    log(f"[smoke] {name} ({root}): {len(curve)} loss points in {time.time() - t0:.0f}s" + (f"; failed: {err}" if err else ''))
    return [(r['step'], r['loss']) for r in curve], err


def compare_curves(ref, got):
    """A verdict on a copy's loss curve against the reference's (lists of (step, loss))."""
    if not got:
        return 'no loss curve: the run failed before its first log line'
    steps = dict(ref)
    common = [(s, steps[s], l) for s, l in got if s in steps]
    if not common:
        return 'no loss points at the reference steps'
    rel = max(abs(l - r) / abs(r) for s, r, l in common)
    last_ref, last = common[-1][1], common[-1][2]
    if len(common) < len(ref):
        return f"stopped at step {common[-1][0]} of {ref[-1][0]}"
    if rel < 1e-3:
        return f"the reference's curve (largest relative difference {rel:.1e})"
    ratio = last / last_ref
    if ratio > 1.05:
        return f"learns worse than the reference: final loss {last:.4f} vs {last_ref:.4f} ({ratio:.2f}x)"
    if ratio < 0.9:
        return f"final loss {last:.4f} well below the reference's {last_ref:.4f} ({ratio:.2f}x): a leak (mask?)"
    return f"learns like the reference (final loss {last:.4f} vs {last_ref:.4f}, {ratio:.2f}x), not the same curve"


def smoke(root, log=print, workdir=None):
    """Train the smoke run in the reference and in `root`; print both curves and a verdict."""
    work = Path(workdir or tempfile.mkdtemp(prefix='course-smoke-'))
    ref, err = _train('reference', ROOT, work / 'reference', ['--vae-max-steps', SMOKE_VAE_STEPS], log)
    if err:
        raise RuntimeError(f"the reference's smoke run failed: {err}")
    got, _ = _train('this copy', Path(root).resolve(), work / 'copy', ['--vae', str(work / 'reference' / 'vae.pt')], log)
    print("| step | reference loss | this copy's loss |\n|---|---|---|")
    mine = dict(got)
    for s, l in ref:
        print(f"| {s} | {l:.4f} | {mine[s]:.4f} |" if s in mine else f"| {s} | {l:.4f} | - |")
    verdict = compare_curves(ref, got)
    print(f"[smoke] {verdict}")
    return ref, got, verdict


def cmd_grade(args):
    import importlib.util
    if importlib.util.find_spec('pytest') is None:
        sys.exit("course.py grade runs the tests with pytest, which is not installed: pip install pytest")
    root = Path(args.dir)
    if not (root / 'flowar.py').is_file() or not (root / TF).is_file():
        sys.exit(f"{root} is not a copy of this repository (no flowar.py / {TF}); "
                 f"make one with: python course.py make --all --out DIR")
    rows = grade(root, args.exercises or None)
    print_grades(rows)
    ok = all(r['passed'] == r['total'] for r in rows)
    if args.smoke:
        smoke(root)
    sys.exit(0 if ok else 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    sub.add_parser('list', help='the exercises: paper, functions, tests, lines, needs')
    m = sub.add_parser('make', help='write a student copy with exercises blanked')
    m.add_argument('exercises', nargs='?', default='', help='comma-separated exercise ids (see list)')
    m.add_argument('--all', action='store_true', help='blank every exercise')
    m.add_argument('--out', required=True, help='a new (or empty) folder for the copy')
    g = sub.add_parser('grade', help='score the exercises in a copy (exit 0 only if all pass)')
    g.add_argument('dir', help='the copy (. for this repository)')
    g.add_argument('exercises', nargs='*', help='exercise ids (default: all)')
    g.add_argument('--smoke', action='store_true',
                   help='also train a short run in the copy against the reference (a few minutes)')
    args = p.parse_args(argv)
    known = ', '.join(BY_ID)
    if args.cmd == 'make':
        args.exercises = [e for e in args.exercises.split(',') if e]
        if args.all == bool(args.exercises):
            p.error("make: name the exercises (comma-separated) or --all, not both")
    if args.cmd in ('make', 'grade'):
        bad = [e for e in args.exercises if e not in BY_ID]
        if bad:
            p.error(f"unknown exercise(s) {', '.join(bad)}; the exercises: {known}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.cmd == 'make':
        try:
            cmd_make(args)
        except FileExistsError as e:
            sys.exit(str(e))
    else:
        {'list': cmd_list, 'grade': cmd_grade}[args.cmd](args)


if __name__ == '__main__':
    main()
