"`learn.mining_profile`: its parts against a directly timed step, the Learner left as it was, vision, tabular and text."
import copy, json, random, statistics, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
import torch
from torch import nn
from fastai.callback.core import Callback
from fastai.data.block import CategoryBlock
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.tabular.learner import tabular_learner
from fastai.torch_core import set_seed
from fastai_hardmine.data import digits_data, tensor_dls, digits_image_dls
from fastai_hardmine.proxy import Proxy
from fastai_hardmine.profile import StepProfile
from test_subset import one_thread  # noqa: F401 (fixture)
from test_applications import tab_dls, quiet
from test_text import classifier_learner

X, Y, XV, YV = digits_data()

def mlp_learner(bs=512, width=512):
    set_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10))
    x, y = X.repeat(4, 1), Y.repeat(4)
    return quiet(Learner(tensor_dls(x, y, XV, YV, bs=bs), model, CrossEntropyLossFlat()))

class StepClock(Callback):
    "Wall time between consecutive training batches' ends: a plain fastai step with its loading, timed directly"
    order, run_valid = 1000, False
    def before_train(self): self.last, self.steps = time.perf_counter(), []
    def after_batch(self):
        now = time.perf_counter()
        self.steps.append(now - self.last); self.last = now

def paired_ratios(pairs:int=5) -> list[float]:
    "The profile's step time over a directly timed step's, for `pairs` pairs, each pair in alternating order"
    torch.set_num_threads(1)
    learn = mlp_learner()
    ratios = []
    for r in range(pairs):
        def profiled(): return learn.mining_profile(n_batches=8, warmup=2, show=False).step_ms
        def direct():
            clock = StepClock()
            mlp_learner().fit(1, 1e-3, cbs=clock)
            return 1000 * statistics.median(clock.steps[2:])
        # alternating order, so that a drift of the machine's speed favours neither
        p, d = (profiled(), direct()) if r % 2 == 0 else reversed((direct(), profiled()))
        ratios.append(p / d)
    return ratios

def test_parts_add_up_to_a_directly_timed_step():
    # in a fresh process, as a user runs the profile: late in this long test session the two clocks drift apart
    # (the profile read 1.18x and 1.25x the direct step there, 0.98x to 1.06x in shorter sessions, on the same machine)
    code = "import json, sys; sys.path.insert(0, 'tests'); import test_profile as t; print(json.dumps(t.paired_ratios()))"
    out = subprocess.run([sys.executable, '-W', 'ignore', '-c', code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent).stdout
    ratios = json.loads(out.strip().splitlines()[-1])
    # the median of five pairs: a moment of load on the machine moves one or two pairs, not the median
    assert len(ratios) == 5 and abs(statistics.median(ratios) - 1) < 0.15, ratios

def test_the_learner_is_left_as_it_was():
    learn = mlp_learner(bs=256, width=64)
    learn.fit(1, 1e-3)
    model_state = copy.deepcopy(learn.model.state_dict())
    opt_state = copy.deepcopy(learn.opt.state_dict())
    dl_state, values, mode = learn.dls.train.rng.getstate(), copy.deepcopy(learn.recorder.values), learn.model.training
    torch.manual_seed(3); random.seed(3); np.random.seed(3)
    learn.mining_profile(n_batches=3, warmup=1, show=False)
    after = torch.rand(1).item(), random.random(), np.random.rand()
    torch.manual_seed(3); random.seed(3); np.random.seed(3)
    assert after == (torch.rand(1).item(), random.random(), np.random.rand())
    for k, v in model_state.items(): assert torch.equal(learn.model.state_dict()[k], v), k
    st = learn.opt.state_dict()
    assert st['hypers'] == opt_state['hypers']
    for a, b in zip(st['state'], opt_state['state']):
        for k in b: assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k]))
    assert learn.dls.train.rng.getstate() == dl_state and learn.recorder.values == values
    assert learn.model.training == mode and learn.opt is not None

def check(prof: StepProfile, bs:int):
    assert prof.bs == bs and all(v > 0 for v in (prof.forward_ms, prof.backward_ms, prof.scoring_ms, prof.step_ms))
    su = prof.speed_ups
    assert (su['mask'] == 1).all() and (su['subset, stored losses'] > su['subset']).all()
    assert list(su.index) == [0.5, 0.25, 0.1] and (su > 0).all().all()
    assert 'no rule can save more than' in prof.summary()

def test_vision_learner_with_a_proxy():
    set_seed(0)
    dls = digits_image_dls(bs=64)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    learn = quiet(Learner(dls, model, CrossEntropyLossFlat()))
    learn.selective_backprop(1, scorer=Proxy())
    prof = learn.mining_profile(n_batches=3, warmup=1, show=False)
    check(prof, 64)
    assert prof.proxy_ms > 0 and 'subset, proxy' in prof.speed_ups.columns

def test_tabular_learner():
    learn = quiet(tabular_learner(tab_dls('cls', CategoryBlock()), layers=[16], n_out=2))
    check(learn.mining_profile(n_batches=3, warmup=1, show=False), 32)

def test_text_classifier():
    learn, _ = classifier_learner(Callback())
    check(learn.mining_profile(n_batches=2, warmup=1, show=False), 32)
