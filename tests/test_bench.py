"The benchmark: tiny runs of every task end to end, the JSON they produce, the comparison with plain fastai's schedules, the command line and the data cache."
import json, math, re, statistics, sys
import numpy as np
import pytest
import torch
from fastai.losses import CrossEntropyLossFlat
from fastai_hardmine.data import digits_data
from fastai_hardmine.bench.data import TASKS, bench_config, budget_epochs, mnist1d_data
from fastai_hardmine.bench.tasks import Arm, budget_arms, bench_task
from fastai_hardmine.bench.models import mlp
from fastai_hardmine.bench.compare import (time_to_accuracy, fastest_plain, equal_accuracy, rotated, median_spread,
                                           min_epoch_durations, steady_times)
from fastai_hardmine.bench.run import run_task, train_arm, Progress
from fastai_hardmine.bench.report import format_task_table, format_noise_note, plot_task, loss_histogram
from fastai_hardmine.bench.cli import main

SEEDS, EPOCHS, N_SAMPLES = 2, 2, 1000
N_TRAIN = int(N_SAMPLES * 0.8)
OHEM_NK = [(64, 64), (128, 64), (64, 48), (128, 16)]
SB_ARMS = [dict(beta=1), dict(beta=3, staleness=1), dict(beta=2, fill_batch=True, staleness=1)]

# plain fastai at 2 epochs and at 50% (1 epoch); the rules at 100% and 50% (ohem), 150% and 100% (filter), 100% (selective)
def tiny_configs():
    return dict(
        ohem=bench_config('ohem', num_samples=N_SAMPLES, epochs=EPOCHS, hidden=32, nk=OHEM_NK, plain_budgets=[.5],
                          mining_budgets=[1, .5]),
        filter=bench_config('filter', num_samples=N_SAMPLES, epochs=EPOCHS, channels=8, bs=64, plain_budgets=[.5],
                            mining_budgets=[1.5, 1]),
        selective=bench_config('selective', num_samples=N_SAMPLES, epochs=EPOCHS, channels=8, bs=64, noise=[0., .2],
                               arms=SB_ARMS, valid_per_epoch=2, plain_budgets=[.5], mining_budgets=[1], info_batch=0))

@pytest.fixture(scope='module')
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    res = {t: run_task(t, cfg, seeds=SEEDS, device='cpu', cache_dir=out, show_bar=False, log=lambda *a: None)
           for t, cfg in tiny_configs().items()}
    # what results.json holds must survive a strict JSON round trip (no NaN, no tuples as keys)
    return json.loads(json.dumps(res, allow_nan=False)), out

RUN_FIELDS = {'seed', 'repeat', 'epochs', 'equal_accuracy', 'steady', 'final_accuracy', 'final_valid_loss', 'train_time_s', 'epoch_train_s', 'curve', 'samples',
              'kept_share', 'kept_share_end', 'kept_share_curve', 'train_loss_curve', 'target', 'target_99',
              'time_to_target_s', 'time_to_target_99_s', 'base_time_to_target_s', 'base_time_to_target_99_s',
              'speed_up', 'speed_up_99', 'load_1min'}
SUMMARY_FIELDS = {'final_accuracy', 'final_error', 'final_valid_loss', 'train_time_s', 'kept_share', 'kept_share_end',
                  'samples', 'time_to_target_s', 'speed_up', 'target_reached_seeds', 'time_to_target_99_s',
                  'speed_up_99', 'target_99_reached_seeds', 'train_time', 'equal_accuracy'}
EQUAL_FIELDS = {'level', 'time_s', 'full_plain_time_s', 'fastest_plain', 'fastest_plain_time_s', 'speed_up_vs_full_plain',
                'speed_up_vs_fastest_plain'}

def expected_arms(task):
    "Each arm's name and epochs, in the listed order"
    if task == 'ohem':
        return [('64:64 (plain fastai)', 2), ('64:64 (plain fastai) 50%', 1), ('128:64', 2), ('128:64 50%', 1),
                ('64:48', 2), ('64:48 50%', 1), ('128:16', 2), ('128:16 50%', 1)]
    if task == 'filter':
        return [('plain fastai', 2), ('plain fastai 50%', 1), ('batch_loss_filter(0.9) 150%', 3), ('batch_loss_filter(0.9)', 2),
                ('info_batch(0.5) 150%', 3), ('info_batch(0.5)', 2)]
    return [('plain fastai', 2), ('plain fastai 50%', 1), ('selective_backprop(beta=1)', 2),
            ('selective_backprop(beta=3, staleness=1)', 2), ('selective_backprop(beta=2, fill_batch, staleness=1)', 2),
            ('rho_loss(0.1)', 2)]

def names(task): return [n for n, _ in expected_arms(task)]

def all_runs(res):
    for g in res['groups']:
        base = g['arms'][res['baseline']]['runs']
        for name, arm in g['arms'].items():
            for run, b in zip(arm['runs'], base): yield g, name, run, b

def finite_pos(x): return isinstance(x, float) and math.isfinite(x) and x > 0

@pytest.mark.parametrize('task', TASKS)
def test_structure(results, task):
    res = results[0][task]
    assert res['seeds'] == SEEDS and res['n_train'] == N_TRAIN and res['n_valid'] == N_SAMPLES - N_TRAIN
    assert [g['noise'] for g in res['groups']] == ([0., .2] if task == 'selective' else [0.])
    assert res['baseline'] == names(task)[0] and res['plain_arms'] == names(task)[:2]
    for g in res['groups']:
        assert [(n, a['epochs']) for n, a in g['arms'].items()] == expected_arms(task)
        assert [a['plain'] for a in g['arms'].values()] == [True, True] + [False] * (len(g['arms']) - 2)
        for arm in g['arms'].values():
            assert set(arm['summary']) == SUMMARY_FIELDS
            assert [r['seed'] for r in arm['runs']] == list(range(SEEDS)) == [r['repeat'] for r in arm['runs']]
            for run in arm['runs']:
                assert set(run) == RUN_FIELDS and set(run['equal_accuracy']) == set(run['steady']) == EQUAL_FIELDS

@pytest.mark.parametrize('task', TASKS)
def test_the_frontier_headline_follows_the_arms(results, task):
    "Each method's fastest budget reaching the mean full plain accuracy, against plain's fastest, recomputed here"
    res = results[0][task]
    for g in res['groups']:
        arms = g['arms']
        def time_of(n): return sum(min(ts) for ts in zip(*(r['epoch_train_s'] for r in arms[n]['runs'])))
        def mean_acc(n): return statistics.fmean(r['final_accuracy'] for r in arms[n]['runs'])
        target = mean_acc(res['baseline'])
        plain = min((time_of(n), n) for n, a in arms.items() if a['plain'] and mean_acc(n) >= target)
        methods = list(dict.fromkeys(a['method'] for a in arms.values() if not a['plain']))
        assert list(g['frontier']) == methods
        for m in methods:
            f = g['frontier'][m]
            hits = [(time_of(n), n) for n, a in arms.items() if a['method'] == m and mean_acc(n) >= target]
            assert (f['plain_arm'], f['plain_time_s']) == (plain[1], pytest.approx(plain[0]))
            if hits:
                assert f['arm'] == min(hits)[1] and f['speed_up'] == pytest.approx(plain[0] / min(hits)[0])
            else: assert f['arm'] is None and f['speed_up'] == 'never'
            assert len(f['seed_speed_ups']) == SEEDS and f['verdict'] == 'inside seed noise'  # 2 seeds cannot decide

@pytest.mark.parametrize('task', TASKS)
def test_times_and_accuracies_are_measured(results, task):
    res = results[0][task]
    per_epoch = res['config']['valid_per_epoch']
    for g, name, run, base in all_runs(res):
        epochs = run['epochs']
        assert epochs == dict(expected_arms(task))[name] == g['arms'][name]['epochs']
        assert finite_pos(run['train_time_s']) and len(run['epoch_train_s']) == epochs
        assert all(finite_pos(t) for t in run['epoch_train_s'])
        assert math.isclose(sum(run['epoch_train_s']), run['train_time_s'], rel_tol=1e-9)
        c = run['curve']
        assert c['epoch'] == pytest.approx([(i + 1) / per_epoch for i in range(epochs * per_epoch)], abs=0.05)
        assert c['train_time_s'] == sorted(c['train_time_s']) and all(finite_pos(t) for t in c['train_time_s'])
        assert c['train_time_s'][-1] == run['train_time_s']
        # accuracies are counts of correct validation samples, losses real losses
        for a in c['valid_accuracy']:
            assert 0 <= a <= 1 and math.isclose(a * res['n_valid'], round(a * res['n_valid']), abs_tol=1e-6)
        assert all(finite_pos(l) for l in c['valid_loss'])
        assert run['final_accuracy'] == c['valid_accuracy'][-1] and run['final_valid_loss'] == c['valid_loss'][-1]
        assert len(run['train_loss_curve']['value']) > 0 and all(finite_pos(l) for l in run['train_loss_curve']['value'])

@pytest.mark.parametrize('task', TASKS)
def test_time_to_target_follows_the_curve(results, task):
    res = results[0][task]
    for g, name, run, base in all_runs(res):
        assert run['target'] == base['final_accuracy'] and math.isclose(run['target_99'], .99 * base['final_accuracy'])
        for tag in ('', '_99'):
            t = run['time_to_target' + tag + '_s']
            c = run['curve']
            reached = [tt for tt, a in zip(c['train_time_s'], c['valid_accuracy']) if a >= run['target' + tag]]
            if reached: assert t == reached[0] and finite_pos(t)
            else: assert t == 'never' and run['speed_up' + tag] == 'never'
            if t != 'never': assert math.isclose(run['speed_up' + tag], run['base_time_to_target' + tag + '_s'] / t)
        if name == res['baseline']:
            # the plain arm always reaches its own final accuracy
            assert run['speed_up'] == 1. and run['time_to_target_s'] <= run['train_time_s']
    for g in res['groups']:
        for arm in g['arms'].values():
            s, runs = arm['summary'], arm['runs']
            assert math.isclose(s['final_accuracy']['mean'], sum(r['final_accuracy'] for r in runs) / SEEDS)
            assert s['final_accuracy']['std'] >= 0 and math.isclose(s['final_error']['mean'], 1 - s['final_accuracy']['mean'])
            assert s['target_reached_seeds'] == sum(r['time_to_target_s'] != 'never' for r in runs)
            assert (s['time_to_target_s'] == 'never') == (s['target_reached_seeds'] < SEEDS)

def top_k_trained(n, k):
    "Samples the top-k arm trains per epoch: k of each full batch of n, all of a last partial batch of at most k"
    sizes = [n] * (N_TRAIN // n) + ([N_TRAIN % n] if N_TRAIN % n else [])
    return sum(min(k, b) for b in sizes)

@pytest.mark.parametrize('task', TASKS)
def test_kept_shares_and_sample_counts(results, task):
    res = results[0][task]
    for g, name, run, base in all_runs(res):
        # a RHO-LOSS arm holds 10% of the training samples out for its reference model
        n_train = N_TRAIN - round(.1 * N_TRAIN) if name.startswith('rho_loss') else N_TRAIN
        s, seen = run['samples'], n_train * run['epochs']
        assert s['seen'] == seen
        if g['arms'][name]['plain']:
            assert run['kept_share'] == 1 and run['kept_share_end'] == 1 and set(run['kept_share_curve']['value']) == {1.}
            assert s == dict(seen=seen, scored=0, trained=seen)
            continue
        if name.startswith('info_batch'):
            # epoch-level pruning: no scoring forward; the first and the last epoch train every sample, the others fewer
            assert s['scored'] == 0 and N_TRAIN * 2 <= s['trained'] <= seen and run['kept_share'] == s['trained'] / seen
            # 3 epochs: the middle one prunes (2 epochs are the first and the final phase, both full)
            assert (s['trained'] < seen) == (run['epochs'] >= 3)
            continue
        assert 0 < run['kept_share'] < 1 and 0 < run['kept_share_end'] <= 1
        assert all(0 < v <= 1 for v in run['kept_share_curve']['value'])
        # every kept sample is trained once, fill_batch or not
        assert s['trained'] == round(run['kept_share'] * seen)
        if 'staleness' in name:
            # staleness=1: scored in the first epoch, reused in the second
            assert s['scored'] == N_TRAIN
        elif task == 'ohem':
            n, k = map(int, name.split()[0].split(':'))
            assert s['trained'] == run['epochs'] * top_k_trained(n, k)
            # a last batch no larger than k is trained whole, without scoring
            assert s['scored'] == seen - (run['epochs'] * (N_TRAIN % n) if N_TRAIN % n <= k else 0)
        else: assert s['scored'] == seen

def test_ohem_loss_histogram(results):
    "Each rule's histograms of repeat 0: the losses of its last epoch that it chose from, and those it kept"
    res = results[0]['ohem']
    hist = res['loss_histogram']
    # the rules at their full budget
    assert list(hist) == ['128:64', '64:48', '128:16']
    for name, h in hist.items():
        n, k = map(int, name.split(':'))
        run = res['groups'][0]['arms'][name]['runs'][0]
        # every batch the rule scored, k kept of each; a last batch of at most k trains whole, unscored and unrecorded
        whole = N_TRAIN % n if N_TRAIN % n <= k else 0
        assert (h['n'], h['k']) == (N_TRAIN - whole, top_k_trained(n, k) - whole)
        assert h['n'] * run['epochs'] == run['samples']['scored']
        assert sum(h['forwarded']) == h['n'] and sum(h['kept']) == h['k']
        assert len(h['edges']) == len(h['forwarded']) + 1 == len(h['kept']) + 1 and h['edges'][0] == 0
        assert all(0 <= kept <= fwd for kept, fwd in zip(h['kept'], h['forwarded']))
        # the epoch's highest loss is its batch's highest, so it is kept: the last bin, which holds it, keeps at least one
        assert h['kept'][-1] >= 1

def test_loss_histogram_reads_what_the_rule_kept():
    "The histograms come from the miner's record of the last epoch, in which each batch kept its k highest losses"
    data = digits_data()
    _, learn = train_arm(data, lambda: mlp(64, 16, act='relu'), mlp(64, 16, act='relu').state_dict(), CrossEntropyLossFlat(),
                         bs=128, epochs=2, lr=1e-2, seed=0, add_rule=lambda l: l.top_k(32, mode='subset'), device='cpu',
                         show_bar=False)
    losses, kept = learn.hard_miner.records.epoch_losses[-1]
    # 1,438 training samples: 11 batches of 128, and one of 30 (at most k) trained whole, unrecorded
    assert len(losses) == 11 * 128 and int(kept.sum()) == 11 * 32
    for batch_losses, batch_kept in zip(losses.split(128), kept.split(128)):
        assert set(torch.topk(batch_losses, 32).indices.tolist()) == set(batch_kept.nonzero().flatten().tolist())
    h = loss_histogram(losses, kept, bins=20)
    assert (h['n'], h['k'], len(h['edges'])) == (11 * 128, 11 * 32, 21)
    assert h['edges'][-1] == pytest.approx(losses.max().item())
    assert h['forwarded'] == np.histogram(losses.numpy(), h['edges'])[0].tolist()
    assert h['kept'] == np.histogram(losses[kept].numpy(), h['edges'])[0].tolist()

def test_tables_and_plots(results, tmp_path):
    for task in TASKS:
        res = results[0][task]
        table = format_task_table(res)
        assert table.count('\n') == 1 + sum(len(g['arms']) for g in res['groups'])
        for col in ('| epochs |', '| vs full plain |', '| vs fastest plain |', '| fastest plain |', '| steady vs fastest |'):
            assert col in table
        # the medians with their spread over 2 repeats, and the plain schedule that was fastest
        assert table.count('x [') >= 3 * sum(len(g['arms']) for g in res['groups']) and '| full |' in table
        note = format_noise_note(res)
        assert note.startswith('Timing noise of this run: ±') and f'over {SEEDS} repeats of the same work' in note
        pngs = sorted(p.name for p in plot_task(res, tmp_path))
        for png in ('accuracy_vs_time', 'frontier', 'kept_share'): assert f'{task}_{png}.png' in pngs
    for p in tmp_path.glob('*.png'): assert p.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

def test_final_accuracy_matches_fastai_validation():
    "The recorded accuracy and loss are those fastai's own `get_preds` gives for the trained model"
    data = digits_data()
    rec, learn = train_arm(data, lambda: mlp(64, 16, act='relu'), mlp(64, 16, act='relu').state_dict(),
                           CrossEntropyLossFlat(), bs=128, epochs=2, lr=1e-2, seed=0,
                           add_rule=lambda l: l.top_k(0.5, mode='subset'), device='cpu', show_bar=False)
    preds, targs, loss = learn.get_preds(with_loss=True)
    assert math.isclose(rec['final_accuracy'], (preds.argmax(1) == targs).float().mean().item(), abs_tol=1e-6)
    assert math.isclose(rec['final_valid_loss'], loss.mean().item(), rel_tol=1e-4)

def test_same_start_same_order():
    "Two plain arms from the same init and seed train identically: the comparison is paired"
    data = digits_data()
    init = mlp(64, 16, act='relu').state_dict()
    runs = [train_arm(data, lambda: mlp(64, 16, act='relu'), init, CrossEntropyLossFlat(), bs=128, epochs=1, lr=1e-2,
                      seed=3, device='cpu', show_bar=False) for _ in range(2)]
    assert runs[0][0]['curve']['valid_loss'] == runs[1][0]['curve']['valid_loss']
    for p, q in zip(runs[0][1].model.parameters(), runs[1][1].model.parameters()): assert torch.equal(p, q)

def test_time_to_accuracy():
    assert time_to_accuracy([1., 2.], [.5, .8], .8) == 2. and time_to_accuracy([1., 2.], [.5, .8], .81) == 'never'

def test_cli_writes_results_and_reuses_the_cache(tmp_path, monkeypatch, capsys):
    out = tmp_path/'out'
    args = ['--quick', '--num-samples', '600', '--epochs', '2', '--plain-budgets', '50', '--mining-budgets', '50',
            '--device', 'cpu', '--out', str(out)]
    # show_bar left at its default: captured output is no terminal, so fastai's bars and epoch tables stay hidden
    main(args)
    printed = capsys.readouterr().out
    assert '█' not in printed and 'train_loss' not in printed
    res = json.loads((out/'results.json').read_text())
    assert list(res['tasks']) == list(TASKS) and res['meta']['quick'] and res['meta']['seeds'] == 1
    # one progress line per run: ohem 2 plain + 3 rules, filter 2 + the filter + InfoBatch, selective 2 noise levels x
    # (2 plain + 3 Selective-Backprop + RHO-LOSS)
    n_runs = 5 + 4 + 12
    progress = [l for l in printed.splitlines() if l.startswith('[')]
    assert len(progress) == n_runs and progress[0].startswith(f'[1/{n_runs}] ohem · seed 0 · 512:512 (plain fastai): ')
    assert all(' left' in l for l in progress[:-1]) and progress[-1].endswith(', done')
    # the run's own timing noise, measured, and the terminal's compact table (the markdown keeps every column)
    assert re.search(r'Timing noise of this run: ±\d+%, (the largest of|from) (epochs|load)', printed) and 'One repeat only' in printed
    tables = [l for l in printed.splitlines() if l.startswith(('arm ', 'noise ')) and 'vs fastest' in l]
    assert len(tables) == 3 and max(len(l) for l in printed.splitlines() if l.startswith(('512:', 'plain', '0%', '20%'))) <= 105
    assert '| vs fastest plain |' not in printed and 'scored / trained' not in printed
    for task in TASKS:
        md = (out/f'{task}.md').read_text()
        assert f'## {task}:' in printed and '| vs fastest plain |' in md and 'One repeat only' in md
        assert 'Timing noise of this run' in md and ' ± ' not in md.split('**Every arm**')[1].split('\n')[4]
        noise = res['tasks'][task]['timing_noise']
        assert noise['level'] is not None and noise['sources']['repeats'] is None
        # the headline table, and what the quick run left out of the full one
        assert '| speed-up | vs full plain | per seed |' in md and 'Left out of the full benchmark' in md
        assert ('| 512:512 (plain fastai) 50% |' if task == 'ohem' else '| plain fastai 50% |') in md
        for png in (f'{task}_accuracy_vs_time.png', f'{task}_frontier.png', f'{task}_kept_share.png'):
            assert (out/png).read_bytes()[:4] == b'\x89PNG'
        arms = res['tasks'][task]['groups'][0]['arms']
        assert [a['epochs'] for a in arms.values()][:2] == [2, 1]
        for a in arms.values(): assert set(a['summary']['equal_accuracy']) >= {'speed_up_vs_fastest_plain', 'fastest_plain'}
    assert (out/'ohem_loss_histogram.png').exists() and (out/'ohem_train_loss.png').exists()
    assert (out/'mnist1d_600.npz').exists()

    import mnist1d.data
    def no_generation(*a, **k): raise AssertionError('MNIST-1D generated again instead of read from the cache')
    monkeypatch.setattr(mnist1d.data, 'make_dataset', no_generation)
    main(['--task', 'ohem'] + args, show_bar=False)
    assert json.loads((out/'results.json').read_text())['tasks']['ohem']['n_train'] == 480
    with pytest.raises(AssertionError, match='generated again'): mnist1d_data(700, out)

def test_mnist1d_missing_says_what_to_install(tmp_path, monkeypatch):
    cached = mnist1d_data(300, tmp_path)[0]
    monkeypatch.setitem(sys.modules, 'mnist1d', None)
    monkeypatch.setitem(sys.modules, 'mnist1d.data', None)
    with pytest.raises(ImportError, match=r'pip install "fastai_hardmine\[bench\]"'): mnist1d_data(400, tmp_path)
    # data already cached needs no package
    assert torch.equal(mnist1d_data(300, tmp_path)[0], cached)

@pytest.mark.parametrize('argv, message', [
    (['--task', 'nope'], "invalid choice: 'nope'"), (['--seeds', '0'], '--seeds must be >= 1'),
    (['--plain-budgets', '40,x'], 'comma-separated percentages'), (['--plain-budgets', '100'], 'plain_budgets'),
    (['--mining-budgets', '-70'], 'above 0'), (['--mining-budgets', 'none'], 'mining_budgets'),
    (['--num-samples', '0'], '--num-samples must be >= 1')])
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e: main(argv + ['--out', str(tmp_path/'out')])
    assert e.value.code == 2 and message in capsys.readouterr().err
    # rejected before anything is written
    assert not (tmp_path/'out').exists()

# The pure functions, against values computed by hand

def test_shorter_schedules_and_budgets():
    # 12 epochs: 40% = 4.8 -> 5, 55% = 6.6 -> 7, 70% = 8.4 -> 8, 85% = 10.2 -> 10; halves round up (10 x 55% = 5.5 -> 6)
    assert [budget_epochs(12, b) for b in (1, .4, .55, .7, .85)] == [12, 5, 7, 8, 10]
    assert budget_epochs(10, .55) == 6 and budget_epochs(3, .1) == 1
    arms = bench_task('filter').arms(0)
    assert [(a.name, a.epochs, a.plain) for a in arms] == [
        ('plain fastai', 12, True), ('plain fastai 40%', 5, True), ('plain fastai 55%', 7, True),
        ('plain fastai 70%', 8, True), ('plain fastai 85%', 10, True),
        *[(f"{m}{p}", e, False) for m in ('batch_loss_filter(0.9)', 'info_batch(0.5)')
          for p, e in (('', 12), (' 85%', 10), (' 70%', 8), (' 55%', 7), (' 40%', 5))]]
    assert {a.bs for a in arms} == {128} and {a.method for a in arms} == {'plain fastai', 'batch_loss_filter(0.9)', 'info_batch(0.5)'}
    # 4 epochs: 40% -> 2, 55% -> 2 (runs once), 70% -> 3, 85% -> 3 (runs once)
    assert [(a.name, a.epochs) for a in budget_arms(Arm('p', 32, 4), [1, .4, .55, .7, .85])] == [
        ('p', 4), ('p 40%', 2), ('p 70%', 3)]

def test_speed_up_against_the_fastest_plain_schedule():
    full = ([2., 4., 6., 8., 10.], [.60, .80, .88, .91, .92])
    short = ([2., 4., 6.], [.62, .86, .90])      # 60% of the epochs
    shorter = ([1.5, 3.], [.70, .84])            # 40%
    plain = {'full': full, 'short': short, 'shorter': shorter}
    # ends at 0.89 < target 0.92: compared at 0.89; full gets there at 8 s, short at 6 s, shorter never; the arm at 5 s
    r = equal_accuracy([1., 3., 5., 7.], [.5, .8, .89, .89], .92, plain, 'full')
    assert (r['level'], r['time_s'], r['full_plain_time_s'], r['fastest_plain'], r['fastest_plain_time_s']) == (.89, 5., 8., 'short', 6.)
    assert r['speed_up_vs_full_plain'] == pytest.approx(1.6) and r['speed_up_vs_fastest_plain'] == pytest.approx(1.2)
    # at 0.85: short (4 s) beats full (6 s), shorter never gets there; at 0.84 shorter is first (3 s)
    assert fastest_plain(plain, .85) == ('short', 4.) and fastest_plain(plain, .84) == ('shorter', 3.)
    assert fastest_plain(plain, .95) == (None, 'never')
    # passes the target: compared at the target, 0.92, which only the full schedule reaches (10 s); the arm at 9 s
    r = equal_accuracy([3., 6., 9.], [.7, .9, .93], .92, plain, 'full')
    assert (r['level'], r['time_s'], r['fastest_plain']) == (.92, 9., 'full')
    assert r['speed_up_vs_full_plain'] == pytest.approx(10 / 9) == r['speed_up_vs_fastest_plain']

def test_median_and_spread_of_per_repeat_ratios():
    assert median_spread([1.1, .8, 1.4]) == dict(median=1.1, min=.8, max=1.4, n=3, reached=3)
    assert median_spread([1.0, 2.0, .5, 1.5]) == dict(median=1.25, min=.5, max=2.0, n=4, reached=4)
    assert median_spread([1.1, 'never', 1.4])['median'] == 'never'
    assert median_spread(['never', 'never'])['reached'] == 0

def test_arm_order_rotates_over_repeats():
    arms = ['p', 'p40', 'p55', 'p70', 'p85', 'r', 'r70']
    # 7 arms, 3 repeats: shifted by 0, 7 // 3 = 2 and 14 // 3 = 4
    assert [rotated(arms, r, 3)[0] for r in range(3)] == ['p', 'p55', 'p85']
    assert rotated(arms, 2, 3) == ['p85', 'r', 'r70', 'p', 'p40', 'p55', 'p70']
    assert [rotated(arms, r, 2)[0] for r in range(2)] == ['p', 'p70']

def test_steady_times():
    runs = [dict(epoch_train_s=[2., 3., 4.]), dict(epoch_train_s=[2.5, 2., 6.])]
    assert min_epoch_durations(runs) == [2., 2., 4.]
    assert steady_times([1., 2., 3.], [2., 2., 4.]) == [2., 4., 8.]
    assert steady_times([.5, 1., 2.5], [2., 2., 4.]) == pytest.approx([1., 2., 6.])

def test_progress_estimates_the_time_left():
    lines = []
    p = Progress([('ohem', 2.), ('filter', 10.), ('filter', 10.), ('filter', 5.)], lines.append)
    p.done('a', 4.)    # ohem took twice its estimate, which says nothing about filter: 25 s
    p.done('b', 5.)    # filter took half its estimate: 0.5 x 15 s
    assert lines == ['[1/4] a: 4.0 s, about 25 s left', '[2/4] b: 5.0 s, about 8 s left']

def test_steady_and_equal_accuracy_follow_the_runs(results):
    "Each run's comparisons, recomputed here from the recorded curves and epoch durations"
    for task in TASKS:
        res = results[0][task]
        for g in res['groups']:
            arms = g['arms']
            fastest = {n: [min(ts) for ts in zip(*(r['epoch_train_s'] for r in a['runs']))] for n, a in arms.items()}
            for r in range(SEEDS):
                target = arms[res['baseline']]['runs'][r]['final_accuracy']
                def curve(n, steady):
                    c = arms[n]['runs'][r]['curve']
                    if not steady: return c['train_time_s'], c['valid_accuracy']
                    # a point at epoch e: the fastest durations of the epochs before it, and its share of the next
                    ts = [sum(fastest[n][:int(e)]) + (e - int(e)) * (fastest[n][int(e)] if int(e) < len(fastest[n]) else 0)
                          for e in c['epoch']]
                    return ts, c['valid_accuracy']
                for n, a in arms.items():
                    for key, steady in (('equal_accuracy', False), ('steady', True)):
                        got, (ts, accs) = a['runs'][r][key], curve(n, steady)
                        level = min(accs[-1], target)
                        assert got['level'] == level
                        t = next(t for t, acc in zip(ts, accs) if acc >= level)
                        assert got['time_s'] == pytest.approx(t)
                        plain_t = {p: next((t for t, acc in zip(*curve(p, steady)) if acc >= level), math.inf)
                                   for p in res['plain_arms']}
                        best = min(plain_t.values())
                        assert got['fastest_plain_time_s'] == pytest.approx(best) and plain_t[got['fastest_plain']] == best
                        assert got['speed_up_vs_fastest_plain'] == pytest.approx(best / t)
                        assert got['speed_up_vs_full_plain'] == pytest.approx(plain_t[res['baseline']] / t)
                        assert got['speed_up_vs_fastest_plain'] <= got['speed_up_vs_full_plain'] + 1e-12
            for n, a in arms.items():
                s = a['summary']['equal_accuracy']
                ratios = [run['equal_accuracy']['speed_up_vs_fastest_plain'] for run in a['runs']]
                assert s['speed_up_vs_fastest_plain']['median'] == pytest.approx(statistics.median(ratios))
                assert (s['speed_up_vs_fastest_plain']['min'], s['speed_up_vs_fastest_plain']['max']) == (min(ratios), max(ratios))
