"The benchmark: tiny runs of every task end to end, the JSON they produce, the command line and the data cache."
import json, math
import pytest
import torch
from fastai.losses import CrossEntropyLossFlat
from fastai_hardmine.data import digits_data
from fastai_hardmine.bench_data import TASKS, bench_config, mnist1d_data
from fastai_hardmine.bench_models import mlp
from fastai_hardmine.bench_run import run_task, train_arm, time_to_accuracy
from fastai_hardmine.bench_report import format_task_table, plot_task
from fastai_hardmine.bench import main

SEEDS, EPOCHS, N_SAMPLES = 2, 2, 1000
N_TRAIN = int(N_SAMPLES * 0.8)
OHEM_NK = [(64, 64), (128, 64), (64, 48), (128, 16)]
SB_ARMS = [dict(beta=1), dict(beta=3, staleness=1), dict(beta=2, fill_batch=True, staleness=1)]

def tiny_configs():
    return dict(
        ohem=bench_config('ohem', num_samples=N_SAMPLES, epochs=EPOCHS, hidden=32, nk=OHEM_NK),
        filter=bench_config('filter', num_samples=N_SAMPLES, epochs=EPOCHS, channels=8, bs=64, mining_epochs=EPOCHS + 1),
        selective=bench_config('selective', num_samples=N_SAMPLES, epochs=EPOCHS, channels=8, bs=64, noise=[0., .2],
                               arms=SB_ARMS, valid_per_epoch=2))

@pytest.fixture(scope='module')
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    res = {t: run_task(t, cfg, seeds=SEEDS, device='cpu', cache_dir=out, show_bar=False, log=lambda *a: None)
           for t, cfg in tiny_configs().items()}
    # what results.json holds must survive a strict JSON round trip (no NaN, no tuples as keys)
    return json.loads(json.dumps(res, allow_nan=False)), out

RUN_FIELDS = {'seed', 'epochs', 'final_accuracy', 'final_valid_loss', 'train_time_s', 'epoch_train_s', 'curve', 'samples',
              'kept_share', 'kept_share_end', 'kept_share_curve', 'train_loss_curve', 'target', 'target_99',
              'time_to_target_s', 'time_to_target_99_s', 'base_time_to_target_s', 'base_time_to_target_99_s',
              'speed_up', 'speed_up_99'}
SUMMARY_FIELDS = {'final_accuracy', 'final_error', 'final_valid_loss', 'train_time_s', 'kept_share', 'kept_share_end',
                  'samples', 'time_to_target_s', 'speed_up', 'target_reached_seeds', 'time_to_target_99_s',
                  'speed_up_99', 'target_99_reached_seeds'}

def expected_arms(task):
    if task == 'ohem': return ['64:64 (plain fastai)', '128:64', '64:48', '128:16']
    if task == 'filter': return ['plain fastai', 'batch_loss_filter(0.9)']
    return ['plain fastai', 'selective_backprop(beta=1)', 'selective_backprop(beta=3, staleness=1)',
            'selective_backprop(beta=2, fill_batch, staleness=1)']

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
    assert res['baseline'] == expected_arms(task)[0]
    for g in res['groups']:
        assert list(g['arms']) == expected_arms(task)
        for arm in g['arms'].values():
            assert set(arm['summary']) == SUMMARY_FIELDS
            assert [r['seed'] for r in arm['runs']] == list(range(SEEDS))
            for run in arm['runs']: assert set(run) == RUN_FIELDS

@pytest.mark.parametrize('task', TASKS)
def test_times_and_accuracies_are_measured(results, task):
    res = results[0][task]
    per_epoch = res['config']['valid_per_epoch']
    for g, name, run, base in all_runs(res):
        epochs = run['epochs']
        assert epochs == (EPOCHS + 1 if task == 'filter' and name != res['baseline'] else EPOCHS)
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
        s, seen = run['samples'], N_TRAIN * run['epochs']
        assert s['seen'] == seen
        if name == res['baseline']:
            assert run['kept_share'] == 1 and run['kept_share_end'] == 1 and set(run['kept_share_curve']['value']) == {1.}
            assert s == dict(seen=seen, scored=0, trained=seen)
            continue
        assert 0 < run['kept_share'] < 1 and 0 < run['kept_share_end'] <= 1
        assert all(0 < v <= 1 for v in run['kept_share_curve']['value'])
        # every kept sample is trained once, fill_batch or not
        assert s['trained'] == round(run['kept_share'] * seen)
        if 'staleness' in name:
            # staleness=1: scored in the first epoch, reused in the second
            assert s['scored'] == N_TRAIN
        elif task == 'ohem':
            n, k = map(int, name.split(':'))
            assert s['trained'] == EPOCHS * top_k_trained(n, k)
            # a last batch no larger than k is trained whole, without scoring
            assert s['scored'] == seen - (EPOCHS * (N_TRAIN % n) if N_TRAIN % n <= k else 0)
        else: assert s['scored'] == seen

def test_ohem_loss_histogram(results):
    hist = results[0]['ohem']['loss_histogram']
    assert list(hist) == expected_arms('ohem')[1:]
    for name, h in hist.items():
        n, k = map(int, name.split(':'))
        assert (h['n'], h['k']) == (n, k) and sum(h['forwarded']) == n and sum(h['kept']) == k
        assert len(h['edges']) == len(h['forwarded']) + 1
        # the kept samples are the highest-loss ones: no forwarded sample above the smallest kept loss is left out
        cut = next(i for i, e in enumerate(h['edges'][1:]) if e >= h['kept_min_loss'])
        assert h['kept'][cut + 1:] == h['forwarded'][cut + 1:]

def test_tables_and_plots(results, tmp_path):
    for task in TASKS:
        res = results[0][task]
        table = format_task_table(res)
        assert table.count('\n') == 1 + sum(len(g['arms']) for g in res['groups'])
        names = sorted(p.name for p in plot_task(task, res, tmp_path))
        assert f'{task}_accuracy_vs_time.png' in names and f'{task}_kept_share.png' in names
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
    args = ['--quick', '--num-samples', '600', '--epochs', '1', '--device', 'cpu', '--out', str(out)]
    main(args, show_bar=False)
    printed = capsys.readouterr().out
    res = json.loads((out/'results.json').read_text())
    assert list(res['tasks']) == list(TASKS) and res['meta']['quick'] and res['meta']['seeds'] == 1
    for task in TASKS:
        assert f'## {task}:' in printed and 'plain fastai' in (out/f'{task}.md').read_text()
        for png in (f'{task}_accuracy_vs_time.png', f'{task}_kept_share.png'):
            assert (out/png).read_bytes()[:4] == b'\x89PNG'
    assert (out/'ohem_loss_histogram.png').exists() and (out/'ohem_train_loss.png').exists()
    assert (out/'mnist1d_600.npz').exists()

    import mnist1d.data
    def no_generation(*a, **k): raise AssertionError('MNIST-1D generated again instead of read from the cache')
    monkeypatch.setattr(mnist1d.data, 'make_dataset', no_generation)
    main(['--task', 'ohem'] + args, show_bar=False)
    assert json.loads((out/'results.json').read_text())['tasks']['ohem']['n_train'] == 480
    with pytest.raises(AssertionError, match='generated again'): mnist1d_data(700, out)

def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit): main(['--task', 'nope', '--out', str(tmp_path)])
    with pytest.raises(SystemExit): main(['--seeds', '0', '--out', str(tmp_path)])
