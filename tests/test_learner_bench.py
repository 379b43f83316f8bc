"`hardmine-bench --learner`: the comparison on a Learner factory, its recommendation against its own figures, bad factories, Ctrl-C."
import json, re, sys, textwrap
import pytest
from torch import nn
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai_hardmine.data import digits_data, tensor_dls
from fastai_hardmine.bench.learner import compare_learner
from fastai_hardmine.bench.cli import main
from test_subset import one_thread  # noqa: F401 (fixture)

X, Y, XV, YV = digits_data()

def make_learner():
    set_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return Learner(tensor_dls(X, Y, XV, YV, bs=128), model, CrossEntropyLossFlat(), metrics=accuracy)

def test_the_recommendation_says_what_the_figures_say():
    res = compare_learner(make_learner, epochs=3, lr=1e-2, methods=['top_k', 'selective_backprop'], plain_budgets=[.7],
                          mining_budgets=[1., .7], seeds=2, log=lambda *a: None)
    g = res['groups'][0]
    assert [len(a['runs']) for a in g['arms'].values()] == [2] * 6
    front = g['frontier']
    plain, t = next(iter(front.values()))['plain_arm'], next(iter(front.values()))['plain_time_s']
    rec = res['recommendation']
    assert f"({t:.1f} s)" in rec and ('the full schedule' in rec) == (plain == 'plain fastai')
    wins = {m: f for m, f in front.items() if f['speed_up'] != 'never' and f['speed_up'] > 1}
    if wins:
        m = max(wins, key=lambda m: wins[m]['speed_up'])
        assert f"`{m}`" in rec and f"{wins[m]['speed_up']:.2f}x" in rec
    else: assert rec.endswith('No rule beat it here.')
    # the table prints the same figures
    for m, f in front.items():
        row = next(l for l in res['table'].splitlines() if l.startswith(f'| {m} |'))
        assert (f"{f['speed_up']:.2f}x" if f['speed_up'] != 'never' else 'never') in row
    # the target is the full plain arm's accuracy, averaged over the repeats
    target = sum(r['metric'][-1] for r in g['arms']['plain fastai']['runs']) / 2
    assert f"accuracy {100 * target:.2f}%" in rec

def write_module(tmp_path, body):
    (tmp_path/'my_task.py').write_text(textwrap.dedent(f"""
        from torch import nn
        from fastai.learner import Learner
        from fastai.losses import CrossEntropyLossFlat
        from fastai.metrics import accuracy
        from fastai.torch_core import set_seed
        from fastai_hardmine.data import digits_data, tensor_dls
        X, Y, XV, YV = digits_data()
        {body}
    """))

def test_cli_runs_a_factory_from_the_current_directory(tmp_path, monkeypatch, capsys):
    write_module(tmp_path, """
        def make():
            set_seed(0)
            return Learner(tensor_dls(X, Y, XV, YV, bs=256), nn.Linear(64, 10), CrossEntropyLossFlat(), metrics=accuracy)
        def unseeded(): return Learner(tensor_dls(X, Y, XV, YV), nn.Linear(64, 10), CrossEntropyLossFlat())
        def not_a_learner(): return 3
    """)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'path', list(sys.path))
    sys.modules.pop('my_task', None)
    main(['--learner', 'my_task:make', '--epochs', '2', '--lr', '1e-2', '--arms', 'top_k', '--plain-budgets', '50',
                '--mining-budgets', '100', '--seeds', '1', '--out', str(tmp_path/'out')])
    printed = capsys.readouterr().out
    res = json.loads((tmp_path/'out'/'learner.json').read_text())
    assert res['recommendation'] in printed and (tmp_path/'out'/'learner.md').exists() and res['metric'] == 'accuracy'
    assert all(0 <= v <= 1 for a in res['groups'][0]['arms'].values() for r in a['runs'] for v in r['metric'])
    assert re.search(r'\[\d+/3\] seed 0 · plain fastai', printed)
    for spec, msg in (('my_task:unseeded', 'different initial weights'), ('my_task:not_a_learner', 'returned int'),
                      ('nowhere:make', "cannot import module 'nowhere'")):
        with pytest.raises(SystemExit) as e: main(['--learner', spec, '--epochs', '2', '--lr', '1e-2', '--out', str(tmp_path/'o2')])
        assert e.value.code != 0
        assert msg in (str(e.value.code) + capsys.readouterr().err)
    with pytest.raises(SystemExit): main(['--learner', 'my_task:make', '--epochs', '2', '--out', str(tmp_path/'o3')])
    assert '--learner needs --epochs and --lr' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(['--learner', 'my_task:make', '--epochs', '2', '--lr', '1e-2', '--metric', 'f1', '--out', str(tmp_path/'o4')])
    assert "it has 'valid_loss', 'accuracy'" in str(e.value.code)

def test_ctrl_c_keeps_the_finished_repeats():
    calls = []
    class Interrupt(Callback):
        def after_batch(self): raise KeyboardInterrupt()
    def factory():
        calls.append(None)
        learn = make_learner()
        # the two checking calls, then 4 arms of the first repeat; the second repeat's second arm is interrupted
        if len(calls) == 2 + 4 + 2: learn.add_cb(Interrupt())
        return learn
    lines = []
    res = compare_learner(factory, epochs=2, lr=1e-2, methods=['top_k'], plain_budgets=[.5], mining_budgets=[1., .5],
                          seeds=2, log=lines.append)
    assert res['interrupted'] and res['seeds_done'] == 1 and any('Interrupted' in l for l in lines)
    assert all(len(a['runs']) == 1 for a in res['groups'][0]['arms'].values()) and res['table']
