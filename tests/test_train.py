"""Tests of train.py: the lr schedule, weight-decay groups and optimizers, the batches'
randomness (label dropout, logit-normal t), the EMA, and whole runs of train.main (smoke run,
precision (bf16, auto), resume, gradient accumulation, config checks, CLI errors, two gloo
ranks)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import flowar
import train
import vae
from flowar import FlowAR

from conftest import ROOT, _FakeMoments
from test_flowar import fm_inputs, tiny_model


# ---------------------------------------------------------------------------------------
# lr schedule, weight decay, optimizers
# ---------------------------------------------------------------------------------------

def test_lr_schedule_warmup_and_cosine_values():
    # paper recipe: 4e-4 peak, 100 warm-up epochs, cosine to 1e-5 at epoch 400
    lr = lambda e: train.lr_at(e, 4e-4, 1e-5, 100, 400)
    assert lr(0) == 0 and math.isclose(lr(50), 2e-4) and math.isclose(lr(100), 4e-4)
    assert math.isclose(lr(250), 1e-5 + (4e-4 - 1e-5) * 0.5)          # half-way down the cosine
    assert math.isclose(lr(400), 1e-5) and math.isclose(lr(500), 1e-5)
    assert lr(150) > lr(200) > lr(300) > lr(399)


def test_param_groups_exclude_biases_and_1d_params_from_weight_decay():
    model = tiny_model()
    decay, no_decay = train.param_groups(model.named_parameters(), 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay['params'])
    assert all(p.ndim < 2 or names[id(p)].endswith('.bias') for p in no_decay['params'])
    assert any(names[id(p)] == 'z_proj_ln.weight' for p in no_decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))


def test_make_optimizers_splits_the_parameters_once():
    model = tiny_model()
    cfg = dict(train.PRESETS['cifar-toy'])
    names = {id(p): n for n, p in model.named_parameters()}
    (adamw,) = train.make_optimizers(model, dict(cfg, optimizer='adamw'), 1e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    muon, adamw = train.make_optimizers(model, dict(cfg, optimizer='muon'), 1e-3)
    assert isinstance(muon, train.Muon) and isinstance(adamw, torch.optim.AdamW)
    on_muon = {names[id(p)] for g in muon.param_groups for p in g['params']}
    on_adamw = {names[id(p)] for g in adamw.param_groups for p in g['params']}
    assert not on_muon & on_adamw and on_muon | on_adamw == set(names.values())  # every parameter exactly once
    assert 'encoder_blocks.0.attn.qkv.weight' in on_muon and 'flownet.res_blocks.0.mlp.fc2.weight' in on_muon
    for kept_on_adamw in ('class_emb.weight', 'z_proj.weight', 'flownet.final_layer.linear.weight',
                          'encoder_blocks.0.attn.qkv.bias'):
        assert kept_on_adamw in on_adamw
    # one step moves a Muon matrix by lr * 0.2 * sqrt(max(A, B)) * (an orthogonalised update, RMS ~ 1/sqrt(max(A, B)))
    w = model.encoder_blocks[0].attn.qkv.weight
    before = w.detach().clone()
    w.grad = torch.randn_like(w)
    muon.step()
    rms = (w.detach() - before * (1 - 1e-3 * cfg['weight_decay'])).pow(2).mean().sqrt().item()
    assert 0.15e-3 < rms < 0.3e-3, rms


def test_muon_is_torchs_in_bf16_and_close_to_it_in_fp32(monkeypatch):
    # train.Muon computes torch.optim.Muon's steps (match_rms_adamw, weight decay, Nesterov)
    # bit for bit with the Newton-Schulz steps in bf16, for a stack of same-shape weights too
    torch.manual_seed(0)
    shapes = [(64, 64), (192, 64), (64, 192), (192, 64)]
    def run(make, steps=3):
        torch.manual_seed(0)
        ws = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
        opt = make(ws)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            for w in ws:
                w.grad = torch.randn(w.shape, generator=g)
            opt.step()
        return ws
    ref = run(lambda ws: torch.optim.Muon(ws, lr=0.01, weight_decay=0.1, adjust_lr_fn='match_rms_adamw'))
    ours = run(lambda ws: train.Muon(ws, lr=0.01, weight_decay=0.1, ns_dtype=torch.bfloat16))
    assert all(torch.equal(a, b) for a, b in zip(ref, ours))
    fp32 = run(lambda ws: train.Muon(ws, lr=0.01, weight_decay=0.1, ns_dtype=torch.float32))
    for a, b in zip(ref, fp32):   # fp32 Newton-Schulz: the same step up to bf16's rounding
        assert 0 < (a - b).abs().max() < 0.02 * a.detach().abs().max()
    # Newton-Schulz maps random matrices (tall or wide, any scale) to singular values near 1,
    # each matrix of a stack on its own
    gs = torch.randn(3, 64, 288) * torch.tensor([1.0, 100.0, 0.01])[:, None, None]
    for dtype in (torch.bfloat16, torch.float32):
        for g in (gs, gs.mT):
            o = train.Muon.orthogonalize(g, dtype)
            sv = torch.linalg.svdvals(o.float())
            assert sv.min() > 0.5 and sv.max() < 1.5, (dtype, sv.min(), sv.max())
            assert torch.allclose(o[1].float(), train.Muon.orthogonalize(g[1:2], dtype)[0].float(), atol=2e-3)
    # the default precision of the Newton-Schulz steps: bf16 only where it is native
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(train, 'native_bf16', lambda device, native=native: native)
        assert train.Muon([torch.nn.Parameter(torch.zeros(4, 4))], lr=1.0).ns_dtype == want


# ---------------------------------------------------------------------------------------
# the randomness of a batch: label dropout, t
# ---------------------------------------------------------------------------------------

def test_label_dropout_uses_the_null_class():
    # CFG training (Sec. 4): train.make_batch replaces a label by the null class
    # (index num_classes) with probability label_drop (the draw: train.sample_randomness).
    ds = _FakeMoments(torch.randn(64, 1, 8, 8, 8), torch.arange(64) % 10)
    mcfg = dict(scales=[[1, 1], [2, 2], [4, 4], [8, 8]], latent_channels=4, num_classes=10)
    ys = [train.make_batch(ds, list(range(64)), 0, dict(seed=0, label_drop=p), 3, mcfg, 'cpu')[1]
          for p in (0.0, 0.5, 1.0)]
    assert torch.equal(ys[0], torch.arange(64) % 10) and torch.all(ys[2] == 10)
    dropped = ys[1] == 10
    assert 16 < int(dropped.sum()) < 48 and torch.equal(ys[1][~dropped], ys[0][~dropped])


def test_the_null_class_changes_the_loss():
    # ...and the model sees the difference
    model = tiny_model()
    z = torch.randn(3, 4, 8, 8)
    noise, t = fm_inputs(z)
    a, _ = model(z, torch.tensor([1, 2, 3]), noise, t)
    c, _ = model(z, torch.full((3,), 10), noise, t)
    assert not torch.allclose(a, c)


def test_sample_randomness_is_one_generator_per_seed_step_and_sample():
    # Everything random about sample j at step k comes from its own generator, seeded by
    # (seed, step, global index): the same draws for any split over ranks and accumulation
    # steps, fresh draws for another sample, step or seed
    draw = lambda seed, step, i: train.sample_randomness(seed, step, i, (4, 8, 8), 3, [(1, 1), (2, 2), (8, 8)])
    flip, eps, t, noise, drop = draw(0, 5, 3)
    assert flip in (0, 1) and eps.shape == (4, 8, 8) and t.shape == (3,)
    assert [tuple(n.shape) for n in noise] == [(4, 1, 1), (4, 2, 2), (4, 8, 8)] and 0.0 <= drop < 1.0
    again = draw(0, 5, 3)
    assert again[0] == flip and torch.equal(again[1], eps) and torch.equal(again[2], t) and again[4] == drop
    assert all(torch.equal(a, b) for a, b in zip(again[3], noise))
    for other in (draw(1, 5, 3), draw(0, 6, 3), draw(0, 5, 4)):              # seed, step, sample
        assert not torch.equal(other[1], eps) and not torch.equal(other[2], t) and other[4] != drop
        assert not torch.equal(other[3][2], noise[2])
    draws = [draw(0, 0, i) for i in range(2000)]                            # the distributions
    flips = torch.tensor([float(d[0]) for d in draws])
    drops = torch.tensor([d[4] for d in draws])
    eps_all = torch.stack([d[1] for d in draws])
    noise_all = torch.stack([d[3][2] for d in draws])
    ts = torch.stack([d[2] for d in draws])
    assert abs(flips.mean().item() - 0.5) < 0.04 and abs(drops.mean().item() - 0.5) < 0.03
    assert abs((drops < 0.1).float().mean().item() - 0.1) < 0.02           # uniform on [0, 1)
    for z in (eps_all, noise_all):                                          # standard normal
        assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert ts.min() >= 0 and ts.max() <= 1 and abs(ts.mean().item() - 0.5) < 0.02 and abs(ts.std().item() - 0.2887) < 0.01
    assert not torch.equal(ts[:, 0], ts[:, 1])                               # an independent t per scale


def test_random_scale_lists_always_hold_1_and_the_latent_size():
    lists = [train.draw_scale_list(0, step, (8, 8)) for step in range(2000)]
    assert all(l[0] == (1, 1) and l[-1] == (8, 8) for l in lists)
    assert all(all(a[0] < b[0] for a, b in zip(l, l[1:])) for l in lists)         # increasing
    assert train.draw_scale_list(0, 7, (8, 8)) == lists[7]                          # seeded by (seed, step)
    assert any(train.draw_scale_list(1, s, (8, 8)) != lists[s] for s in range(20))
    for k in range(2, 8):                                                            # each size kept 25%
        share = sum((k, k) in l for l in lists) / len(lists)
        assert abs(share - 0.25) < 0.04, (k, share)
    assert abs(sum(len(l) == 2 for l in lists) / len(lists) - 0.75 ** 6) < 0.03     # {1, 8} alone
    assert len({tuple(l) for l in lists[:50]}) > 10 and train.draw_scale_list(3, 0, (2, 2)) == [(1, 1), (2, 2)]


def test_logit_normal_t_is_sigmoid_of_a_standard_normal():
    # The toy's t distribution (train.sample_randomness, t_sampling='logit-normal', SD3):
    # logit(t) must be N(0, 1), so 72.7% of the draws fall in [0.25, 0.75] (uniform: 50%).
    import train
    draw = lambda i, mode: train.sample_randomness(0, 0, i, (4, 8, 8), 2, [(1, 1), (8, 8)], mode)[2]
    t = torch.stack([draw(i, 'logit-normal') for i in range(4000)]).flatten()
    z = torch.log(t / (1 - t))                                     # logit
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    middle = ((t > 0.25) & (t < 0.75)).float().mean().item()
    assert abs(middle - 0.727) < 0.02, middle
    u = torch.stack([draw(i, 'uniform') for i in range(4000)]).flatten()
    assert abs(((u > 0.25) & (u < 0.75)).float().mean().item() - 0.5) < 0.03
    assert torch.equal(draw(7, 'logit-normal'), draw(7, 'logit-normal'))  # one generator per sample


# ---------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------

def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.clone()
    train.update_ema(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)


def test_ema_decay_warms_up_and_forgets_the_initial_weights():
    # The weights jump from w0 (the random init the EMA starts from) to w1 and stay there.
    # After 60 steps the EMA must be within 2% of w1: a constant decay of 0.999 would still
    # hold 0.999^60 = 94% of w0 (the toy-run bug: 0.999^1405 = 25% of the init was sampled).
    torch.manual_seed(0)
    ema, model = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    w0, w1 = ema.weight.detach().clone(), model.weight.detach().clone()
    for step in range(60):
        train.update_ema(ema, model, train.ema_decay(0.999, step))
    assert (ema.weight - w1).norm() <= 0.02 * (w1 - w0).norm()
    # The schedule: (1 + t) / (10 + t), capped at the configured decay.
    assert train.ema_decay(0.999, 0) == pytest.approx(0.1)
    assert train.ema_decay(0.999, 90) == pytest.approx(0.91)
    assert train.ema_decay(0.9999, 250_000) == 0.9999 and train.ema_decay(0.999, 9_000) == 0.999


# ---------------------------------------------------------------------------------------
# train.main: runs, precision, resume, accumulation, checkpoints, CLI, DDP
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def toy_setup(tmp_path_factory):
    """A tiny shapes run folder with a random-init cifar VAE (so no VAE training)."""
    import vae as vae_lib
    root = tmp_path_factory.mktemp('train')
    torch.manual_seed(0)
    v = vae_lib.AutoencoderKL.from_preset('cifar')
    vae_path = root / 'vae.pt'
    vae_lib.save_vae(str(vae_path), v, 1.0)
    return root, vae_path


def _train_args(out, vae_path, *extra):
    return ['--dataset', 'shapes', '--subset', '64', '--out', str(out), '--vae', str(vae_path),
            '--batch-size', '16', '--log-every', '1', '--ckpt-every', '1000', '--num-sample-classes', '2',
            '--cache-batch-size', '32', '--device', 'cpu', '--precision', 'fp32', *extra]


def _run_train(out, vae_path, *extra):
    """train.main in this process; returns the checkpoint."""
    train.main(_train_args(out, vae_path, *extra))
    return torch.load(out / 'ckpt.pt', map_location='cpu', weights_only=True)


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _first_log(run_dir):
    return json.loads((run_dir / 'log.jsonl').read_text().splitlines()[0])


def test_smoke_run_writes_checkpoint_grid_and_log(toy_setup, tmp_path):
    _, vae_path = toy_setup
    ck = _run_train(tmp_path / 'run', vae_path, '--max-steps', '3')
    assert ck['step'] == 3 and set(ck) >= {'model', 'ema', 'optimizers', 'step', 'epoch', 'config', 'rng'}
    assert ck['config']['model']['latent_channels'] == 4 and ck['config']['model_preset'] == 'toy'
    from PIL import Image
    grid = Image.open(tmp_path / 'run' / 'samples.png')
    assert grid.size[1] > grid.size[0] / 8 * 1.5      # two rows (classes) of 8 samples
    lines = (tmp_path / 'run' / 'log.jsonl').read_text().splitlines()
    assert len(lines) == 3 and {'loss', 'scale_losses', 'lr', 'grad_norm', 'img_per_s', 'eta_s'} <= set(json.loads(lines[-1]))
    assert not list((tmp_path / 'run').glob('*.tmp*'))        # no temporary file left behind


def test_random_scale_lists_train_a_scale_free_model_that_samples_any_list(toy_setup, tmp_path):
    _, vae_path = toy_setup
    ck = _run_train(tmp_path / 'flex', vae_path, '--max-steps', '4', '--pos-embed', 'scale-free',
                    '--scale-lists', 'random', '--model', 'toy')
    assert ck['config']['model']['pos_embed'] == 'scale-free' and ck['step'] == 4
    logs = [json.loads(l) for l in (tmp_path / 'flex' / 'log.jsonl').read_text().splitlines()]
    assert len(logs) == 4 and all(len(r['scale_losses']) == 2 for r in logs)     # first and last scale
    model = FlowAR(**ck['config']['model'])
    model.load_state_dict(ck['ema'])
    assert model.sample(torch.tensor([0]), num_steps=4, scales=[1, 2, 4, 8]).shape == (1, 4, 8, 8)
    with pytest.raises(SystemExit):                                               # learned + random
        train.parse_args(['--scale-lists', 'random'])


def test_ema_of_a_short_training_run_is_close_to_the_trained_weights(toy_setup, tmp_path):
    # Through train.main: after 30 steps with --ema 0.999 the EMA is near the trained
    # weights, not near the initialisation (with a constant 0.999 it would be 97% init).
    _, vae_path = toy_setup
    ck = _run_train(tmp_path / 'ema', vae_path, '--max-steps', '30', '--ema', '0.999')
    torch.manual_seed(0)  # train.main's initialisation
    init = FlowAR(**ck['config']['model']).state_dict()
    num = sum((ck['ema'][k] - ck['model'][k]).float().norm() ** 2 for k in init) ** 0.5
    den = sum((ck['model'][k] - init[k]).float().norm() ** 2 for k in init) ** 0.5
    assert den > 0 and num / den < 0.5, (num / den).item()


def test_precision_bf16_trains_flowar_under_autocast(toy_setup, tmp_path, monkeypatch):
    # --precision bf16: every training forward runs in bf16 autocast; fp32: none does
    _, vae_path = toy_setup
    seen, forward = [], flowar.FlowAR.forward
    def spy(self, *a, **k):
        seen.append(torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16)
        return forward(self, *a, **k)
    monkeypatch.setattr(flowar.FlowAR, 'forward', spy)
    ck = _run_train(tmp_path / 'bf16', vae_path, '--max-steps', '2', '--precision', 'bf16')
    assert seen == [True, True] and all(v.dtype == torch.float32 for v in ck['model'].values())
    seen.clear()
    _run_train(tmp_path / 'fp32', vae_path, '--max-steps', '2')
    assert seen == [False, False]


def test_resolve_precision_auto_follows_the_hardware(monkeypatch):
    assert [train.resolve_precision(p, 'cpu') for p in ('fp32', 'bf16')] == ['fp32', 'bf16']
    for avx, amx, want in ((True, False, 'bf16'), (False, True, 'bf16'), (False, False, 'fp32')):
        monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx)
        monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
        assert train.resolve_precision('auto', 'cpu') == want
    monkeypatch.delattr(torch.cpu, '_is_avx512_bf16_supported')   # a torch without the probes
    monkeypatch.delattr(torch.cpu, '_is_amx_tile_supported')
    assert train.resolve_precision('auto', 'cpu') == 'fp32'
    with pytest.raises(ValueError, match='fp32, bf16 or auto'):
        train.resolve_precision('fp16', 'cpu')


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(toy_setup, tmp_path):
    _, vae_path = toy_setup
    straight = _run_train(tmp_path / 'a', vae_path, '--max-steps', '4')
    _run_train(tmp_path / 'b', vae_path, '--max-steps', '2')
    resumed = _run_train(tmp_path / 'b', vae_path, '--max-steps', '4')
    assert resumed['step'] == 4
    assert _max_diff(straight['model'], resumed['model']) == 0
    assert _max_diff(straight['ema'], resumed['ema']) == 0


def test_gradient_accumulation_equals_one_big_batch(toy_setup, tmp_path):
    _, vae_path = toy_setup
    big = _run_train(tmp_path / 'big', vae_path, '--max-steps', '1')
    acc = _run_train(tmp_path / 'acc', vae_path, '--max-steps', '1', '--micro-batch', '8')
    assert _max_diff(big['model'], acc['model']) <= 1e-5
    # AdamW and clipping hide a gradient that is off by a constant factor; the logged loss
    # and the (pre-clipping) gradient norm do not.
    a, b = _first_log(tmp_path / 'big'), _first_log(tmp_path / 'acc')
    assert abs(a['loss'] - b['loss']) <= 1e-5
    assert abs(a['grad_norm'] - b['grad_norm']) <= 1e-4 * a['grad_norm']


def test_checkpoint_from_another_config_is_refused_naming_the_fields(toy_setup, tmp_path):
    _, vae_path = toy_setup
    _run_train(tmp_path / 'c', vae_path, '--max-steps', '1')
    with pytest.raises(SystemExit, match=r'(?s)different configuration.*seed'):
        _run_train(tmp_path / 'c', vae_path, '--max-steps', '2', '--seed', '5')
    # a checkpoint of an older version that recorded class_dropout in the model config
    # still resumes (the value is --label-drop now), any other model field is refused
    m = dict(flowar.FlowAR.from_preset('toy').config)
    saved = dict(model=dict(m, class_dropout=0.1), dataset='cifar10', batch_size=64, seed=0, vae_fingerprint='f')
    train.check_resume_config(saved, dict(saved), m, 'ck.pt')
    with pytest.raises(SystemExit, match='model.head_depth'):
        train.check_resume_config(saved, dict(saved), dict(m, head_depth=3), 'ck.pt')
    with pytest.raises(SystemExit, match="optimizer: checkpoint 'adamw', now 'muon'"):  # its state would not fit
        train.check_resume_config(dict(saved, optimizer='adamw'), dict(saved, optimizer='muon'), m, 'ck.pt')


def test_the_smoke_preset_is_the_toy_with_a_smaller_budget():
    # cifar-smoke runs the toy's recipe (model, VAE, optimizers, precision, t, scales) on
    # fewer images and steps: only its budget differs, so it checks the toy's own pipeline
    toy, smoke = train.PRESETS['cifar-toy'], train.PRESETS['cifar-smoke']
    assert set(smoke) == set(toy)
    assert {k for k in toy if toy[k] != smoke[k]} == {'out', 'subset', 'vae_max_steps', 'batch_size', 'epochs',
                                                      'log_every'}
    cfg = train.parse_args(['--preset', 'cifar-smoke', '--dataset', 'shapes'])
    assert (cfg['subset'], cfg['vae_max_steps'], cfg['batch_size'], cfg['dataset']) == (4000, 700, 16, 'shapes')
    assert int(cfg['epochs'] * (cfg['subset'] // cfg['batch_size'])) == 600       # FlowAR steps


def test_bad_cli_values_are_refused(capsys):
    for argv, msg in ((['--batch-size', '0'], '--batch-size must be > 0'),
                      (['--preset', 'imagenet-XL'], 'unknown --preset'),
                      (['--preset', 'imagenet-S'], '--data-dir'),
                      (['--vae-optimizer', 'sgd'], '--vae-optimizer must be adam or muon'),
                      (['--vae', 'nope.pt'], "--vae 'nope.pt': no such file")):
        with pytest.raises(SystemExit):  # a parser error, not a traceback
            train.parse_args(argv)
        assert msg in capsys.readouterr().err, argv
    cfg = train.parse_args(['--preset', 'imagenet-L', '--data-dir', 'x', '--vae', __file__])
    assert cfg['grad_ckpt'] and cfg['batch_size'] == 2048 and cfg['blr'] * 2048 / 256 == 4e-4


def test_two_gloo_ranks_match_one_process_on_the_same_global_batch(toy_setup, tmp_path):
    _, vae_path = toy_setup
    one = _run_train(tmp_path / 'one', vae_path, '--max-steps', '1')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    import socket
    with socket.socket() as sock:          # a free local port for the rendezvous
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
           str(ROOT / 'train.py'), *_train_args(tmp_path / 'two', vae_path, '--max-steps', '1')]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    two = torch.load(tmp_path / 'two' / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert len(two['rng']) == 2
    assert _max_diff(one['model'], two['model']) <= 1e-5
    a, b = _first_log(tmp_path / 'one'), _first_log(tmp_path / 'two')
    assert abs(a['loss'] - b['loss']) <= 1e-5                       # losses averaged over ranks
    assert abs(a['grad_norm'] - b['grad_norm']) <= 1e-4 * a['grad_norm']  # gradients averaged, not summed
