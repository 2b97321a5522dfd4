"""Tests of course.py, the course kit: the exercise table points at real functions and tests;
a student copy blanks exactly the chosen functions; every exercise's blanked copy fails its own
tests and passes those of the exercises that do not need it; the reference passes every
exercise; and each exercise's tests catch the typical wrong answers, the planted mistakes below
(the paper's own variant among them wherever the released code differs from the paper).

Staff: `python tests/test_course.py` prints which test caught each planted mistake. This file
is the staff's: `course.py make` leaves it out of a student copy (its mistakes show the answers)."""

import ast
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
import course  # noqa: E402

# exercise -> [(a plausible wrong answer, file, [(reference text, wrong text), ...])]
MISTAKES = {
    'scale-pyramid': [
        ('bilinear instead of area downsampling', 'flowar.py',
         [("F.interpolate(latent, size=hw, mode='area')", "F.interpolate(latent, size=hw, mode='bilinear')")]),
        ('nearest (one latent of each block) instead of the block mean', 'flowar.py',
         [("F.interpolate(latent, size=hw, mode='area')", "F.interpolate(latent, size=hw, mode='nearest')")]),
        ('each scale from the one before it, not from the full latent', 'flowar.py',
         [("    return [latent if hw == scales[-1] else F.interpolate(latent, size=hw, mode='area')\n"
           "            for hw in scales]",
           "    out = [latent]\n    for hw in reversed(scales[:-1]):\n"
           "        out.insert(0, F.interpolate(out[0], size=hw, mode='area'))\n    return out")]),
    ],
    'upsample': [
        ("the paper's Up: bicubic 2x straight to the next scale", 'flowar.py',
         [("    x = F.interpolate(s, size=full_hw, mode='bicubic', align_corners=False)\n"
           "    return F.interpolate(x, size=next_hw, mode='area')",
           "    return F.interpolate(s, size=next_hw, mode='bicubic', align_corners=False)")]),
        ('bilinear to the full size', 'flowar.py',
         [("F.interpolate(s, size=full_hw, mode='bicubic', align_corners=False)",
           "F.interpolate(s, size=full_hw, mode='bilinear', align_corners=False)")]),
        ('nearest down from the full size', 'flowar.py',
         [("F.interpolate(x, size=next_hw, mode='area')", "F.interpolate(x, size=next_hw, mode='nearest')")]),
    ],
    'causal-mask': [
        ('the mask transposed (a scale sees the later ones)', 'flowar.py',
         [("return scale_id[None, :] <= scale_id[:, None]", "return scale_id[:, None] <= scale_id[None, :]")]),
        ("a GPT's token-causal mask (no bidirectional attention inside a scale)", 'flowar.py',
         [("return scale_id[None, :] <= scale_id[:, None]",
           "return torch.ones(len(scale_id), len(scale_id), dtype=torch.bool).tril()")]),
        ("positions in each scale's own grid, not mapped onto the finest", 'flowar.py',
         [("rows = torch.arange(h, dtype=torch.float64) / h * H", "rows = torch.arange(h, dtype=torch.float64)"),
          ("cols = torch.arange(w, dtype=torch.float64) / w * W", "cols = torch.arange(w, dtype=torch.float64)")]),
        ('(col, row) instead of (row, col)', 'flowar.py', [("indexing='ij'", "indexing='xy'")]),
    ],
    'rope-2d': [
        ('rotation in the opposite direction', 'flowar.py',
         [("rot = torch.polar(torch.ones_like(ang), ang)", "rot = torch.polar(torch.ones_like(ang), -ang)")]),
        ("the rotate-half layout (pairs j, j + d/2) instead of the released interleaved pairs", 'flowar.py',
         [("pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))",
           "pairs = torch.complex(*x.float().chunk(2, -1))"),
          ("return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)",
           "return torch.cat([(pairs * rot).real, (pairs * rot).imag], -1).type_as(x)")]),
        ('the row for both halves', 'flowar.py',
         [("pos[:, 1:2] * self.freqs], -1)", "pos[:, 0:1] * self.freqs], -1)")]),
    ],
    'attention-kv-cache': [
        ('no 1 / sqrt(d) scaling', 'flowar.py',
         [("s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])", "s = q @ k.transpose(-2, -1)")]),
        ('the mask inverted (True = blocked)', 'flowar.py',
         [("s.masked_fill(~mask, float('-inf'))", "s.masked_fill(mask, float('-inf'))")]),
        ('the cache keeps only the first scale', 'flowar.py',
         [("            cache['k'], cache['v'] = k, v",
           "            cache.setdefault('k', k)\n            cache.setdefault('v', v)")]),
        ('RoPE on the values too', 'flowar.py',
         [("q, k = self.rope(q, pos), self.rope(k, pos)\n        if cache",
           "q, k, v = self.rope(q, pos), self.rope(k, pos), self.rope(v, pos)\n        if cache")]),
    ],
    'interpolation': [
        ("the paper's direction: F_t = t s + (1 - t) F_0 (t = 1 is data), velocity s - F_0", 'flowar.py',
         [("return (1 - t) * x + t * eps, eps - x", "return t * x + (1 - t) * eps, x - eps")]),
        ('the target with the wrong sign', 'flowar.py',
         [("return (1 - t) * x + t * eps, eps - x", "return (1 - t) * x + t * eps, x - eps")]),
        ('the noise as the target (epsilon prediction)', 'flowar.py',
         [("return (1 - t) * x + t * eps, eps - x", "return (1 - t) * x + t * eps, eps")]),
    ],
    'loss': [
        ("Eq. 9's plain sum as the default (the paper; released: token-share weights)", 'flowar.py',
         [("weight = (s.shape[-2] * s.shape[-1]) / (H * W) if self.scale_weighting == 'tokens' else 1.0",
           "weight = 1.0")]),
        ('weights by side, not by area', 'flowar.py',
         [("weight = (s.shape[-2] * s.shape[-1]) / (H * W)", "weight = s.shape[-1] / W")]),
        ('a sum over tokens instead of the mean', 'flowar.py',
         [(".mean(dim=(1, 2)).mean()", ".sum(dim=(1, 2)).mean()")]),
        ('the semantics of the whole sequence pooled for every scale', 'flowar.py',
         [("s_hat[:, sl], positions[sl])", "s_hat[:, sl].mean(1, keepdim=True).expand_as(s_hat[:, sl]), positions[sl])")]),
    ],
    'spatial-adaln': [
        ('shift and scale swapped', 'flowar.py',
         [("self.attn(modulate(self.norm1(x), beta1, gamma1), pos) * alpha1      # Eq. 10, line 2",
           "self.attn(modulate(self.norm1(x), gamma1, beta1), pos) * alpha1      # Eq. 10, line 2")]),
        ("the paper's gamma * LN(F) (released: LN(F) * (1 + gamma))", 'flowar.py',
         [("self.attn(modulate(self.norm1(x), beta1, gamma1), pos) * alpha1      # Eq. 10, line 2",
           "self.attn(self.norm1(x) * gamma1 + beta1, pos) * alpha1      # Eq. 10, line 2")]),
        ("the paper's Eq. 10 as printed: no residual", 'flowar.py',
         [("x = x + self.attn(modulate(self.norm1(x), beta1, gamma1), pos) * alpha1      # Eq. 10, line 2",
           "x = self.attn(modulate(self.norm1(x), beta1, gamma1), pos) * alpha1      # Eq. 10, line 2")]),
        ("plain adaLN: the semantics pooled over positions", 'flowar.py',
         [("return self.ada_lin(F.silu(t_emb + c)).chunk(6, dim=-1)",
           "return [m.expand(-1, c.shape[1], -1) for m in self.ada_lin(F.silu(t_emb + c.mean(1, keepdim=True))).chunk(6, dim=-1)]")]),
    ],
    'euler': [
        ('Euler steps backwards in time', 'flowar.py',
         [("x = x + (t_next - t) * velocity(x, t).double()", "x = x + (t - t_next) * velocity(x, t).double()")]),
        ('a uniform grid for every number of steps', 'flowar.py', [("if num_steps == 50:", "if True:")]),
        ('the fine part of the grid starting at 0.3, not 0.25', 'flowar.py',
         [("torch.linspace(0.25, 0, n + 1,", "torch.linspace(0.3, 0, n + 1,")]),
    ],
    'cfg': [
        ('the CFG combination with the wrong sign', 'flowar.py',
         [("return v_u + w * (v_c - v_u)", "return v_c + w * (v_u - v_c)")]),
        ('the guidance interval reversed (t >= guidance)', 'flowar.py',
         [("w != 1.0 and t <= guidance:", "w != 1.0 and t >= guidance:")]),
        ('the halves swapped (conditional read as unconditional)', 'flowar.py',
         [("v_c, v_u = head(torch.cat([x, x]), tb, s_hat, pos).chunk(2)",
           "v_u, v_c = head(torch.cat([x, x]), tb, s_hat, pos).chunk(2)")]),
        ('the ramp from 0, not from 1', 'flowar.py',
         [("return [1.0 + (cfg - 1.0) * i / (num_scales - 1) for i in range(num_scales)]",
           "return [cfg * i / (num_scales - 1) for i in range(num_scales)]")]),
        ("no ramp by default (the paper describes none; released: the ramp)", 'flowar.py',
         [("if not ramp or num_scales == 1:", "if ramp or num_scales == 1:")]),
    ],
    'randomness': [
        ('one generator for every sample of a step (the index left out of the seed)', 'train.py',
         [("manual_seed((seed * 1_000_003 + step) * 1_000_003 + global_index)",
           "manual_seed(seed * 1_000_003 + step)")]),
        ('logit-normal t as the sigmoid of a uniform draw', 'train.py',
         [("torch.sigmoid(torch.randn(num_scales, generator=g))", "torch.sigmoid(torch.rand(num_scales, generator=g))")]),
        ('one t shared by all scales', 'train.py',
         [("t = torch.rand(num_scales, generator=g) if", "t = torch.rand(1, generator=g).expand(num_scales) if")]),
        ('noise at the latent size for every scale', 'train.py',
         [("noise = [torch.randn(C, h, w, generator=g) for h, w in scales]",
           "noise = [torch.randn(C, H, W, generator=g) for h, w in scales]")]),
    ],
}


# The paper's side of the RELEASED vs PAPER marks in code no exercise blanks (the others are
# planted mistakes above): (what, file, edits, the test that must fail)
PAPER_VARIANTS = [
    ("the paper's continuous t in the time embedding (released: the integer step int(1000 t))", 'flowar.py',
     [("timestep_embedding((t * 1000).long(), self.freq_dim)", "timestep_embedding(t * 1000, self.freq_dim)")],
     'test_flowar.py::TestSpatialAdaLN::test_time_embedding_is_the_released_integer_step'),
    ("the paper's LN in Eq. 10 as a LayerNorm (released: an RMSNorm without weight)", 'flowar.py',
     [("        self.norm1 = RMSNorm(width)\n        self.attn = Attention(width, heads, qkv_bias=False, rope_theta=rope_theta)\n"
       "        self.norm2 = RMSNorm(width)\n        self.mlp = GatedMLP(width, mlp_ratio)\n        self.ada_lin = nn.Linear(width, 6 * width)",
       "        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)\n        self.attn = Attention(width, heads, qkv_bias=False, rope_theta=rope_theta)\n"
       "        self.norm2 = RMSNorm(width)\n        self.mlp = GatedMLP(width, mlp_ratio)\n        self.ada_lin = nn.Linear(width, 6 * width)")],
     'test_flowar.py::TestSpatialAdaLN::test_spatial_adaln_block_is_eq10_written_out'),
]


def apply_mistake(root, file, edits):
    path = Path(root) / file
    src = path.read_text()
    for old, new in edits:
        assert src.count(old) == 1, f"planted mistake out of date: {old!r} is not once in {file}"
        src = src.replace(old, new)
    path.write_text(src)


def test_every_exercise_names_real_functions_and_tests_in_the_papers_order():
    ids = [e['id'] for e in course.EXERCISES]
    assert ids == ['scale-pyramid', 'upsample', 'causal-mask', 'rope-2d', 'attention-kv-cache', 'interpolation',
                   'loss', 'spatial-adaln', 'euler', 'cfg', 'randomness']
    assert set(MISTAKES) == set(ids) and all(len(m) >= 3 for m in MISTAKES.values())
    for ex in course.EXERCISES:
        assert set(ex['needs']) <= set(ids[:ids.index(ex['id'])])        # only earlier exercises
        for spec in ex['functions']:
            f, q = spec.split(':')
            course.find_function(ast.parse((ROOT / f).read_text()), q)  # raises if missing
        for t in ex['tests']:
            path, *names = t.split('::')
            tree = ast.parse((ROOT / path).read_text())
            node = tree
            for name in names:
                node = next(n for n in node.body if getattr(n, 'name', None) == name)
    rows = course.exercise_table()
    assert all(lines >= 1 for _, _, lines in rows)


def test_blanking_keeps_the_docstring_and_everything_else(tmp_path):
    out = course.make_copy(['spatial-adaln', 'randomness'], tmp_path / 'hw')
    files = course.repo_files(ROOT)
    assert 'tests/test_course.py' not in course.repo_files(out)        # the staff's file stays home
    for f in files:
        if f in course.STAFF_ONLY:
            continue
        a, b = (ROOT / f).read_bytes(), (out / f).read_bytes()
        if f not in ('flowar.py', 'train.py'):
            assert a == b, f
    src, ref = (out / 'flowar.py').read_text(), (ROOT / 'flowar.py').read_text()
    for q in ('SpatialAdaLNBlock.modulation', 'SpatialAdaLNBlock.forward'):
        assert course.is_blank(src, q) and not course.is_blank(ref, q)
        fn, fr = course.find_function(ast.parse(src), q), course.find_function(ast.parse(ref), q)
        assert ast.get_docstring(fn) == ast.get_docstring(fr)
    # outside the two bodies, every line is the reference's
    fr = [course.find_function(ast.parse(ref), q) for q in ('SpatialAdaLNBlock.modulation', 'SpatialAdaLNBlock.forward')]
    ref_lines, out_lines = ref.splitlines(), src.splitlines()
    cut = sum(f.end_lineno - course._split_body(f)[1][0].lineno for f in fr)  # lines removed
    assert len(ref_lines) - len(out_lines) == cut
    start = course._split_body(fr[0])[1][0].lineno - 1
    assert ref_lines[:start] == out_lines[:start] and ref_lines[fr[1].end_lineno:] == out_lines[-len(ref_lines[fr[1].end_lineno:]):]
    assert course.is_blank((out / 'train.py').read_text(), 'sample_randomness')
    assert 'randomness' in (out / 'ASSIGNMENT.md').read_text()
    with pytest.raises(FileExistsError):
        course.make_copy(['loss'], out)


def test_the_reference_passes_every_exercise():
    rows = course.grade(ROOT)
    assert [r['exercise'] for r in rows] == [e['id'] for e in course.EXERCISES]
    assert all(r['passed'] == r['total'] > 0 and r['status'] == 'pass' for r in rows), rows


@pytest.mark.parametrize('ex_id', [e['id'] for e in course.EXERCISES])
def test_a_blanked_exercise_fails_its_tests_and_only_those_that_need_it(ex_id, tmp_path):
    out = course.make_copy([ex_id], tmp_path / 'hw')
    for r in course.grade(out):
        needs = ex_id in course.BY_ID[r['exercise']]['needs']
        if r['exercise'] == ex_id:
            assert r['passed'] == 0 and r['status'].startswith('not done'), r
        elif needs:       # a need that does not show is a stale line of the table
            assert r['passed'] < r['total'] and r['status'] == f'blocked by {ex_id}', r
        else:
            assert r['passed'] == r['total'], r


def test_a_wrong_exercise_is_reported_alone(tmp_path):
    # shift and scale swapped in Spatial-adaLN: that exercise fails, every other passes
    out = course.make_copy([], tmp_path / 'hw')
    apply_mistake(out, *MISTAKES['spatial-adaln'][0][1:])
    rows = {r['exercise']: r for r in course.grade(out)}
    assert rows['spatial-adaln']['passed'] < rows['spatial-adaln']['total']
    assert rows['spatial-adaln']['status'].startswith('fails: ')
    assert all(r['passed'] == r['total'] for e, r in rows.items() if e != 'spatial-adaln'), rows


def caught_by(ex_id, mistake, root):
    """The tests of the exercise that fail with the mistake planted (a fresh copy)."""
    apply_mistake(root, *mistake[1:])
    results = course.run_tests(root, course.BY_ID[ex_id]['tests'])
    return sorted(k.split('.')[-1] for k, outs in results.items() if not all(ok for ok, _ in outs))


@pytest.mark.parametrize('ex_id, k', [(e, k) for e, ms in MISTAKES.items() for k in range(len(ms))])
def test_planted_mistakes_fail_the_exercises_tests(ex_id, k, tmp_path):
    out = course.make_copy([], tmp_path / 'hw')
    assert caught_by(ex_id, MISTAKES[ex_id][k], out), f"survives: {MISTAKES[ex_id][k][0]}"


@pytest.mark.parametrize('k', range(len(PAPER_VARIANTS)))
def test_the_papers_side_of_each_released_difference_fails_a_test(k, tmp_path):
    what, file, edits, test = PAPER_VARIANTS[k]
    out = course.make_copy([], tmp_path / 'hw')
    apply_mistake(out, file, edits)
    outs = course.run_tests(out, [test])[course._key(test)]
    assert not all(ok for ok, _ in outs), f"survives: {what}"


def test_smoke_verdicts():
    ref = [(25, 2.0), (50, 1.5), (75, 1.2)]
    assert course.compare_curves(ref, list(ref)).startswith("the reference's curve")
    assert 'worse' in course.compare_curves(ref, [(25, 2.0), (50, 1.7), (75, 1.5)])
    assert 'leak' in course.compare_curves(ref, [(25, 1.0), (50, 0.6), (75, 0.5)])
    assert 'learns like' in course.compare_curves(ref, [(25, 2.01), (50, 1.49), (75, 1.21)])
    assert 'stopped' in course.compare_curves(ref, ref[:2])
    assert 'failed' in course.compare_curves(ref, [])


def test_cli_errors_are_parser_errors(capsys, tmp_path, monkeypatch):
    for argv, msg in ((['make', 'nope', '--out', str(tmp_path / 'a')], 'unknown exercise'),
                      (['make', '--out', str(tmp_path / 'a')], 'or --all'),
                      (['make', 'loss', '--all', '--out', str(tmp_path / 'a')], 'or --all'),
                      (['grade', '.', 'nope'], 'unknown exercise')):
        with pytest.raises(SystemExit) as e:
            course.parse_args(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit, match='not a copy'):
        course.main(['grade', str(tmp_path)])
    import importlib.util
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(SystemExit, match='pip install pytest'):
        course.main(['grade', str(ROOT)])


if __name__ == '__main__':                      # staff: which test caught each planted mistake
    import tempfile
    for ex_id, mistakes in MISTAKES.items():
        for mistake in mistakes:
            with tempfile.TemporaryDirectory() as tmp:
                tests = caught_by(ex_id, mistake, course.make_copy([], Path(tmp) / 'hw'))
            print(f"| {ex_id} | {mistake[0]} | {', '.join(tests) or 'SURVIVES'} |")
