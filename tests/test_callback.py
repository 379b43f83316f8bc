"The hard-mining callbacks on a real fastai `Learner`: what each rule keeps, the gradient it makes, what it leaves alone."
import copy, functools, math
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from fastcore.basics import noop
from fastcore.test import test_close as close
from fastai.torch_core import set_seed
from fastai.data.core import Datasets, DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, MSELossFlat
from fastai.metrics import accuracy
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.training import GradientAccumulation
from fastai.callback.progress import ProgressCallback
from fastai.callback.rnn import rnn_cbs
from fastai.callback.schedule import lr_find, fit_one_cycle  # noqa: F401 (patch Learner)
from fastai_hardmine import callback as hm
from fastai_hardmine.callback import HardMiningCallback
from fastai_hardmine.core import select_top_k, select_loss_fraction

BS = 64

# This file tests mask mode (the loss masked after fastai's full forward); tests/test_subset.py tests the
# default, subset mode. The callbacks and Learner methods here default to mask mode.
def _mask_default(cls):
    class Mask(cls):
        def __init__(self, *args, mode='mask', **kwargs): super().__init__(*args, mode=mode, **kwargs)
    Mask.__name__ = Mask.__qualname__ = cls.__name__
    return Mask

BatchLossFilterCallback, TopKCallback, SelectiveBackpropCallback = map(
    _mask_default, (hm.BatchLossFilterCallback, hm.TopKCallback, hm.SelectiveBackpropCallback))

@pytest.fixture(autouse=True)
def mask_mode_learner_methods(monkeypatch):
    for name in ('batch_loss_filter', 'top_k', 'selective_backprop'):
        def masked(self, *args, _method=getattr(Learner, name), mode='mask', **kwargs):
            return _method(self, *args, mode=mode, **kwargs)
        monkeypatch.setattr(Learner, name, masked)

@pytest.fixture(autouse=True)
def one_thread():
    "Tiny models: a second CPU thread only adds contention (a step gets ~100x slower on a busy 2-core box)"
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

# ---------------------------------------------------------------------------------------------------------------
# data, models, learners

@functools.lru_cache(None)
def digits():
    "scikit-learn's digits as (x_train, y_train, x_valid, y_valid): X/16 float32, fixed 80/20 split (1437/360)"
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16., dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]

def make_dls(xt, yt, xv, yv, bs=BS, shuffle=True):
    "fastai `Datasets` over indices into in-memory tensors (so that `test_dl`/`predict` work); no worker processes"
    x, y, n = torch.cat([xt, xv]), torch.cat([yt, yv]), len(xt)
    dsets = Datasets(list(range(len(x))), tfms=[[x.__getitem__], [y.__getitem__]],
                     splits=(list(range(n)), list(range(n, len(x)))))
    return dsets.dataloaders(bs=bs, shuffle=shuffle, drop_last=False, num_workers=0, device='cpu')

def mlp(): return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
def mlp_bn(): return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))

def quiet(learn):
    "No progress bar, no printed table"
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    return learn

def make_learner(cbs=None, model_fn=mlp, loss_func=None, seed=0, bs=BS, data=None, shuffle=True, metrics=accuracy):
    "Same seed -> same initial weights and same data order"
    set_seed(seed)
    dls = make_dls(*(data if data is not None else digits()), bs=bs, shuffle=shuffle)
    model = model_fn()
    return quiet(Learner(dls, model, loss_func=loss_func if loss_func is not None else CrossEntropyLossFlat(),
                         metrics=metrics, cbs=cbs))

def n_train_batches(): return math.ceil(len(digits()[0]) / BS)
def train_batch_sizes():
    n = len(digits()[0])
    return [BS] * (n // BS) + ([n % BS] if n % BS else [])

def state(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}

def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), f"{k} differs"

class CaptureLosses(Callback):
    "Test-side per-sample losses of every training batch, from the batch's predictions"
    order, run_valid = 50, False
    def __init__(self, f=lambda p, y: F.cross_entropy(p, y, reduction='none')): self.f, self.losses = f, []
    def after_loss(self):
        if self.training: self.losses.append(self.f(self.pred.detach(), *self.yb))

class Recording:
    "Mixin recording the indices a hard-mining callback's `select` returns"
    def select(self, losses):
        self.idx = super().select(losses)
        return self.idx

class RecTopK(Recording, TopKCallback): pass
class RecLossFilter(Recording, BatchLossFilterCallback): pass
class RecSB(Recording, SelectiveBackpropCallback):
    # the rule alone, against its reference: the noise guard (on by default) is tested in test_schedule.py
    def __init__(self, *args, ignore_top=0, **kwargs): super().__init__(*args, ignore_top=ignore_top, **kwargs)

class FirstBatchProbe(Callback):
    "Grabs the first training batch, its losses and gradients just before the step, then ends the fit (no step)"
    order = 100
    def before_step(self):
        self.xb, self.yb = self.learn.xb, self.learn.yb  # fastai clears them after fit
        self.loss, self.loss_grad = self.learn.loss.detach().clone(), self.learn.loss_grad.detach().clone()
        self.grads = [p.grad.detach().clone() for p in self.learn.model.parameters()]
        self.model_training = self.learn.model.training
        raise CancelFitException()

def run_one_batch(learn):
    "Gradients of the first training batch (no optimizer step), with the batch and the model at that point"
    probe = FirstBatchProbe()
    before = state(learn.model)
    learn.fit(1, 1e-2, cbs=probe)
    assert_same_state(before, state(learn.model))  # no step was taken
    assert probe.model_training
    return probe

def reference_grads(model, xb, yb, per_sample, select=None, idx=None):
    "Plain PyTorch: per-sample losses of the batch, mean over the selected ones, backward; grads and indices"
    m = copy.deepcopy(model).train()
    m.zero_grad(set_to_none=True)
    losses = per_sample(m(*xb), *yb)
    if idx is None: idx = select(losses.detach())
    losses[idx].mean().backward()
    return [p.grad.detach().clone() for p in m.parameters()], idx, losses.detach()

def full_batch_grads(model, xb, yb, per_sample):
    return reference_grads(model, xb, yb, per_sample, idx=slice(None))[0]

def assert_grads_close(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected): torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)

def assert_grads_differ(got, other):
    assert max((g - o).abs().max().item() for g, o in zip(got, other)) > 1e-4

def ce_none(p, y): return F.cross_entropy(p, y, reduction='none')

def sb_reference_draws(batches, beta, seed, history_size=1024):
    "Independent Selective-Backprop: keep i if rand < (share of the last `history_size` losses < loss_i) ** beta"
    g, seen, kept = torch.Generator().manual_seed(seed), torch.zeros(0), []
    for l in batches:
        seen = torch.cat([seen, l.float()])[-history_size:]
        p = ((seen[None, :] < l[:, None]).sum(1).float() / len(seen)) ** beta
        keep = torch.rand(p.shape, generator=g) < p
        if not keep.any(): keep[l.argmax()] = True
        kept.append(keep.nonzero().squeeze(1))
    return kept

# ---------------------------------------------------------------------------------------------------------------
# 1-2. end to end: accuracy and what was kept

def test_digits_fixture_shape():
    xt, yt, xv, yv = digits()
    assert xt.shape == (1437, 64) and xv.shape == (360, 64) and xt.dtype == torch.float32
    assert 0 <= xt.min() and xt.max() <= 1 and set(yt.tolist()) == set(range(10))
    learn = make_learner()
    assert len(learn.dls.train) == n_train_batches() == 23 and train_batch_sizes()[-1] == 29

@pytest.mark.parametrize('k, expected', [(16, lambda n: min(16, n)), (100, lambda n: n),
                                         (0.25, lambda n: math.floor(0.25 * n + 0.5))], ids=['16', '100', '0.25'])
def test_top_k_end_to_end(k, expected):
    cap = CaptureLosses()
    learn = make_learner(cbs=[TopKCallback(k), cap])
    learn.fit(3, 1e-2)
    cb = learn.hard_miner
    assert learn.recorder.values[-1][-1] > 0.7
    sizes = train_batch_sizes() * 3
    assert cb.batch_sizes.tolist() == sizes
    assert cb.kept.tolist() == [expected(n) for n in sizes]  # 16 / 29 -> 16 / 16 / 29 and 16 / 7 for 0.25
    assert cb.kept.dtype == torch.long and cb.kept.device.type == 'cpu'
    close(cb.kept_share, cb.kept.float() / cb.batch_sizes.float())
    close(cb.mean_kept_share(), sum(expected(n) for n in sizes) / sum(sizes), eps=1e-9)
    # the kept samples are the highest-loss ones: their share of the loss is that of the top-k
    share = [l.double().sort(descending=True).values[:kk].sum() / l.double().sum() for l, kk in zip(cap.losses, cb.kept)]
    assert cb.kept_loss_share.device.type == 'cpu' and len(cb.kept_loss_share) == len(sizes)
    close(cb.kept_loss_share, torch.stack(share).float(), eps=1e-5)

@pytest.mark.parametrize('min_loss_perc, min_sample_perc', [(0.9, 0.), (0.9, 0.5), (0.6, 0.)])
def test_batch_loss_filter_end_to_end(min_loss_perc, min_sample_perc):
    cap = CaptureLosses()
    learn = make_learner(cbs=[BatchLossFilterCallback(min_loss_perc, min_sample_perc), cap])
    learn.fit(3, 1e-2)
    cb = learn.hard_miner
    assert learn.recorder.values[-1][-1] > 0.7
    sizes = train_batch_sizes() * 3
    assert cb.batch_sizes.tolist() == sizes and len(cap.losses) == len(sizes)
    assert (cb.kept_loss_share >= min_loss_perc - 1e-6).all()
    for l, k, n, share in zip(cap.losses, cb.kept.tolist(), sizes, cb.kept_loss_share):
        assert len(l) == n and 1 <= k <= n
        assert k >= math.ceil(min_sample_perc * n)
        s = l.double().sort(descending=True).values
        total = s.sum()
        close(share.item(), (s[:k].sum() / total).item(), eps=1e-5)
        assert s[:k].sum() / total >= min_loss_perc - 1e-6
        if k > math.ceil(min_sample_perc * n):  # fewest: one sample fewer would fall short
            assert s[:k - 1].sum() / total < min_loss_perc
    # the rule does drop samples once the model has learnt something
    assert cb.mean_kept_share() < 0.9

def test_selective_backprop_end_to_end():
    cap = CaptureLosses()
    learn = make_learner(cbs=[SelectiveBackpropCallback(beta=3, seed=1, ignore_top=0), cap])
    learn.fit(3, 1e-2)
    cb = learn.hard_miner
    assert learn.recorder.values[-1][-1] > 0.7
    sizes = train_batch_sizes() * 3
    assert cb.batch_sizes.tolist() == sizes
    assert (cb.kept >= 1).all() and (cb.kept <= cb.batch_sizes).all()
    # E[u**3] = 1/4 for a uniform percentile u; losses falling over training push it lower
    assert 0.02 < cb.mean_kept_share() < 0.4
    # the exact draws: same seed, same history of the last 1024 losses (across batches), same Bernoulli draws
    expected = sb_reference_draws(cap.losses, beta=3, seed=1)
    assert cb.kept.tolist() == [len(i) for i in expected]
    share = torch.stack([l[i].sum() / l.sum() for l, i in zip(cap.losses, expected)])
    close(cb.kept_loss_share, share, eps=1e-5)

def test_selective_backprop_history_size_and_default_seed():
    "history_size bounds the percentile window; seed=None draws its seed from torch's (seeded) global RNG"
    cap = CaptureLosses()
    learn = make_learner(cbs=[SelectiveBackpropCallback(beta=2, history_size=50, seed=3, ignore_top=0), cap])
    learn.fit(1, 1e-2)
    expected = sb_reference_draws(cap.losses, beta=2, seed=3, history_size=50)
    assert learn.hard_miner.kept.tolist() == [len(i) for i in expected]
    assert learn.hard_miner.kept.tolist() != [len(i) for i in sb_reference_draws(cap.losses, beta=2, seed=3)]
    runs = []
    for _ in range(2):
        learn = make_learner(cbs=SelectiveBackpropCallback(beta=2))
        learn.fit(1, 1e-2)
        runs.append(learn.hard_miner.kept.tolist())
    assert runs[0] == runs[1]

def test_selective_backprop_beta_zero_keeps_all():
    learn = make_learner(cbs=SelectiveBackpropCallback(beta=0, seed=0))
    learn.fit(2, 1e-2)
    cb = learn.hard_miner
    assert cb.kept.tolist() == cb.batch_sizes.tolist() == train_batch_sizes() * 2
    assert cb.mean_kept_share() == 1.
    close(cb.kept_loss_share, torch.ones(len(cb.kept)))

def test_records_one_per_batch_reset_each_fit_and_survive_validation():
    learn = make_learner().top_k(8)
    cb = learn.hard_miner
    assert len(cb.kept) == len(cb.batch_sizes) == len(cb.kept_loss_share) == len(cb.kept_share) == 0
    assert cb.mean_kept_share() == 0
    learn.fit(2, 1e-2)
    assert len(cb.batch_sizes) == len(cb.kept) == len(cb.kept_loss_share) == len(learn.dls.train) * 2
    kept = cb.kept.clone()
    learn.validate(); learn.get_preds(); learn.get_preds(ds_idx=0)
    assert torch.equal(cb.kept, kept) and len(cb.batch_sizes) == len(learn.dls.train) * 2
    learn.fit(1, 1e-2)
    assert cb.batch_sizes.tolist() == train_batch_sizes()
    assert cb.kept.tolist() == [8] * len(learn.dls.train)

# ---------------------------------------------------------------------------------------------------------------
# 3. the gradient is that of the mean loss over exactly the kept samples

GRAD_CASES = {
    'top_k_16': (lambda: RecTopK(16), lambda l: select_top_k(l, 16), 16),
    'top_k_0.25': (lambda: RecTopK(0.25), lambda l: select_top_k(l, 0.25), 16),
    'loss_filter_0.5': (lambda: RecLossFilter(0.5), lambda l: select_loss_fraction(l, 0.5), None),
    'loss_filter_0.9': (lambda: RecLossFilter(0.9), lambda l: select_loss_fraction(l, 0.9), None),
    'loss_filter_0.3_min_0.75': (lambda: RecLossFilter(0.3, 0.75), lambda l: select_loss_fraction(l, 0.3, 0.75), 48),
}

@pytest.mark.parametrize('case', list(GRAD_CASES))
def test_gradient_is_mean_over_kept(case):
    make_cb, select, n_kept = GRAD_CASES[case]
    learn = make_learner(cbs=make_cb())
    probe = run_one_batch(learn)
    x, y = probe.xb[0], probe.yb[0]
    assert x.shape == (BS, 64)
    expected, idx, losses = reference_grads(learn.model, probe.xb, probe.yb, ce_none, select=select)
    # the callback picked exactly these samples ...
    assert torch.equal(learn.hard_miner.idx, idx)
    if n_kept is not None: assert len(idx) == n_kept
    assert 0 < len(idx) < BS
    # ... and the top-k / loss filter picks are the highest losses (hand check, not the core function)
    assert losses[idx].min() >= losses[[i for i in range(BS) if i not in set(idx.tolist())]].max()
    # the gradient in the parameters is that of mean CE over those samples, not the full batch
    assert_grads_close(probe.grads, expected)
    assert_grads_differ(probe.grads, full_batch_grads(learn.model, probe.xb, probe.yb, ce_none))
    close(probe.loss_grad.item(), losses[idx].mean().item(), eps=1e-6)
    # learn.loss stays fastai's full-batch loss
    close(probe.loss.item(), F.cross_entropy(learn.model(x), y).item(), eps=1e-6)
    # the batch records match
    cb = learn.hard_miner
    assert cb.kept.tolist() == [len(idx)] and cb.batch_sizes.tolist() == [BS]
    close(cb.kept_loss_share.item(), (losses[idx].sum() / losses.sum()).item(), eps=1e-5)

@pytest.mark.parametrize('beta, seed', [(3, 0), (3, 5), (1, 2)])
def test_gradient_selective_backprop(beta, seed):
    learn = make_learner(cbs=RecSB(beta=beta, seed=seed))
    probe = run_one_batch(learn)
    chosen = learn.hard_miner.idx
    # the draw is reproducible test-side: first batch -> history is this batch, generator seeded with `seed`
    with torch.no_grad(): losses = ce_none(learn.model(probe.xb[0]), probe.yb[0])
    assert torch.equal(chosen, sb_reference_draws([losses], beta, seed)[0])
    assert 0 < len(chosen) < BS
    # the gradient is that of the mean CE over exactly the chosen samples
    expected, _, _ = reference_grads(learn.model, probe.xb, probe.yb, ce_none, idx=chosen)
    assert_grads_close(probe.grads, expected)
    assert_grads_differ(probe.grads, full_batch_grads(learn.model, probe.xb, probe.yb, ce_none))
    close(probe.loss.item(), losses.mean().item(), eps=1e-6)

def test_gradient_with_sum_reduction_is_mean_over_kept():
    "The documented contract: the step's gradient is the MEAN over the kept samples, whatever the loss's reduction"
    learn = make_learner(cbs=RecTopK(16), loss_func=CrossEntropyLossFlat(reduction='sum'))
    probe = run_one_batch(learn)
    expected, idx, losses = reference_grads(learn.model, probe.xb, probe.yb, ce_none, select=lambda l: select_top_k(l, 16))
    assert torch.equal(learn.hard_miner.idx, idx)
    assert_grads_close(probe.grads, expected)
    close(probe.loss.item(), losses.sum().item(), eps=1e-4)  # learn.loss: fastai's (summed) loss
    assert learn.loss_func.reduction == 'sum'

def test_gradient_with_per_sample_loss_func():
    "`per_sample_loss_func` drives both the selection and the gradient (here: CE weighted by 1 + target)"
    w = lambda p, t: F.cross_entropy(p, t, reduction='none') * (1 + t.float())
    learn = make_learner(cbs=RecTopK(8, per_sample_loss_func=w))
    probe = run_one_batch(learn)
    expected, idx, _ = reference_grads(learn.model, probe.xb, probe.yb, w, select=lambda l: select_top_k(l, 8))
    assert torch.equal(learn.hard_miner.idx, idx) and len(idx) == 8
    assert_grads_close(probe.grads, expected)
    other, _, _ = reference_grads(learn.model, probe.xb, probe.yb, ce_none, select=lambda l: select_top_k(l, 8))
    assert_grads_differ(probe.grads, other)

# ---------------------------------------------------------------------------------------------------------------
# 4. validation, get_preds, predict and lr_find are untouched

CALLBACKS = {
    'loss_filter': lambda: BatchLossFilterCallback(0.6),
    'top_k': lambda: TopKCallback(0.25),
    'selective_backprop': lambda: SelectiveBackpropCallback(beta=3, seed=0),
}

@pytest.mark.parametrize('name', list(CALLBACKS))
def test_inference_untouched(name):
    learn = make_learner(cbs=CALLBACKS[name]())
    learn.fit(1, 1e-2)
    cb = learn.hard_miner
    assert cb.active and cb.mean_kept_share() < 1
    records = (cb.kept.clone(), cb.batch_sizes.clone(), cb.kept_loss_share.clone())
    xt, yt, xv, yv = digits()
    with_cb = dict(validate=learn.validate(), preds=learn.get_preds(), train_preds=learn.get_preds(ds_idx=0),
                   loss_preds=learn.get_preds(with_loss=True), predict=learn.predict(len(xt) + 3))
    assert all(torch.equal(a, b) for a, b in zip(records, (cb.kept, cb.batch_sizes, cb.kept_loss_share)))
    learn.remove_cb(cb)
    assert not any(isinstance(c, HardMiningCallback) for c in learn.cbs)
    without = dict(validate=learn.validate(), preds=learn.get_preds(), train_preds=learn.get_preds(ds_idx=0),
                   loss_preds=learn.get_preds(with_loss=True), predict=learn.predict(len(xt) + 3))
    assert with_cb['validate'] == without['validate']
    for k in ('preds', 'train_preds', 'loss_preds', 'predict'):
        assert len(with_cb[k]) == len(without[k])
        for a, b in zip(with_cb[k], without[k]): assert torch.equal(a, b), k
    # get_preds over the training set and with_loss: every sample, full per-sample losses
    assert len(with_cb['train_preds'][0]) == len(xt)
    preds, targs, losses = with_cb['loss_preds']
    assert losses.shape == (len(xv),)
    with torch.no_grad(): ref = ce_none(learn.model.eval()(xv), yv)
    close(losses, ref, eps=1e-5)
    assert learn.loss_func.reduction == 'mean'
    # predict on one validation item: class, probabilities
    with torch.no_grad(): probs = F.softmax(learn.model.eval()(xv[3:4]), 1)[0]
    close(with_cb['predict'][2], probs, eps=1e-5)
    assert with_cb['predict'][0] == probs.argmax()

@pytest.mark.parametrize('name', list(CALLBACKS))
def test_validation_after_fit_is_over_full_valid_set(name):
    learn = make_learner(cbs=CALLBACKS[name]())
    learn.fit(2, 1e-2)
    assert learn.hard_miner.mean_kept_share() < 1
    recorded = learn.recorder.values[-1]  # train_loss, kept, valid_loss, accuracy
    assert list(learn.recorder.metric_names) == ['epoch', 'train_loss', 'kept', 'valid_loss', 'accuracy', 'time']
    n = len(learn.dls.train)
    assert recorded[1] == pytest.approx(learn.hard_miner.kept[-n:].sum().item() / learn.hard_miner.batch_sizes[-n:].sum().item())
    xt, yt, xv, yv = digits()
    with torch.no_grad():
        out = learn.model.eval()(xv)
        ref_loss, ref_acc = F.cross_entropy(out, yv).item(), (out.argmax(1) == yv).float().mean().item()
    valid_loss, acc = learn.validate()
    close(valid_loss, ref_loss, eps=1e-5)
    close(acc, ref_acc, eps=1e-6)
    close(recorded[2:], [ref_loss, ref_acc], eps=1e-5)
    assert ref_acc > 0.7

@pytest.mark.parametrize('name', list(CALLBACKS))
def test_lr_find_untouched(name):
    results = []
    for cb in (None, CALLBACKS[name]()):
        learn = make_learner(cbs=cb)
        init = state(learn.model)
        set_seed(1)
        sug = learn.lr_find(num_it=30, show_plot=False)
        results.append((sug, list(learn.recorder.lrs), [float(l) for l in learn.recorder.losses]))
        assert_same_state(init, state(learn.model))  # lr_find restores the weights
    assert results[0][1] == results[1][1] and len(results[0][1]) >= 20
    assert results[0][2] == results[1][2]
    assert results[0][0] == results[1][0]
    cb = learn.hard_miner
    assert len(cb.kept) == len(cb.batch_sizes) == len(cb.kept_loss_share) == 0  # nothing recorded during lr_find
    assert not hasattr(learn, 'lr_finder')
    learn.fit(1, 1e-2)  # and the callback is active again in the next fit
    assert len(cb.kept) == len(learn.dls.train) and cb.mean_kept_share() < 1

# ---------------------------------------------------------------------------------------------------------------
# 5. state left behind: loss function, training mode, BatchNorm statistics

class CancelMidEpoch(Callback):
    def after_batch(self):
        if self.training and self.iter == 5: raise CancelFitException()

class Boom(Exception): pass

class RaiseMidEpoch(Callback):
    def before_step(self):
        if self.iter == 3: raise Boom('stop at batch 3')

def run_scenario(learn, scenario):
    if scenario == 'normal': learn.fit(1, 1e-2)
    elif scenario == 'cancel': learn.fit(1, 1e-2, cbs=CancelMidEpoch())
    else:
        with pytest.raises(Boom): learn.fit(1, 1e-2, cbs=RaiseMidEpoch())

LOSSES = {
    'flat_mean': lambda: CrossEntropyLossFlat(),
    'flat_sum': lambda: CrossEntropyLossFlat(reduction='sum'),
    'torch_sum': lambda: nn.CrossEntropyLoss(reduction='sum'),
}

@pytest.mark.parametrize('scenario', ['normal', 'cancel', 'error'])
@pytest.mark.parametrize('loss', list(LOSSES))
def test_state_after_fit(scenario, loss):
    modes = []
    for cb in (None, TopKCallback(0.5)):
        lf = LOSSES[loss]()
        reduction = lf.reduction
        learn = make_learner(cbs=cb, loss_func=lf, model_fn=mlp_bn)
        run_scenario(learn, scenario)
        assert learn.loss_func is lf and lf.reduction == reduction
        modes.append(learn.model.training)
        if cb is not None:
            assert len(cb.kept) == {'normal': len(learn.dls.train), 'cancel': 6, 'error': 4}[scenario]
            assert (cb.kept < cb.batch_sizes).all()
    assert modes[0] == modes[1]
    assert modes[0] == (scenario != 'normal')  # fastai ends a normal fit after validation, in eval mode

class FailsWhenUnreduced(CrossEntropyLossFlat):
    "A loss that raises while the callback has switched it to reduction='none'"
    def __call__(self, inp, targ, **kwargs):
        if self.reduction == 'none': raise Boom('no per-sample loss')
        return super().__call__(inp, targ, **kwargs)

def test_reduction_restored_when_per_sample_loss_raises():
    lf = FailsWhenUnreduced()
    learn = make_learner(cbs=TopKCallback(4), loss_func=lf)
    with pytest.raises(Boom): learn.fit(1, 1e-2)
    assert learn.loss_func is lf and lf.reduction == 'mean' and lf.func.reduction == 'mean'

# ---------------------------------------------------------------------------------------------------------------
# 6. keeping everything is plain fastai, exactly (weights, BatchNorm buffers, recorded losses)

KEEP_ALL = {
    'top_k_1.0': lambda: TopKCallback(1.0),
    'loss_filter_1_1': lambda: BatchLossFilterCallback(min_loss_perc=1.0, min_sample_perc=1.0),
    'selective_backprop_beta_0': lambda: SelectiveBackpropCallback(beta=0),
    # min_sample_perc < 1: no shortcut, the per-sample losses are computed, ranked and all kept (mean = fastai's loss)
    'loss_filter_1_0': lambda: BatchLossFilterCallback(min_loss_perc=1.0, min_sample_perc=0.),
}

@functools.lru_cache(None)
def plain_run(model_name):
    learn = make_learner(model_fn={'mlp': mlp, 'mlp_bn': mlp_bn}[model_name])
    learn.fit(2, 1e-2)
    return state(learn.model), learn.model.training, [list(map(float, v)) for v in learn.recorder.values]

@pytest.mark.parametrize('model_name', ['mlp', 'mlp_bn'])
@pytest.mark.parametrize('name', list(KEEP_ALL))
def test_keep_all_equals_plain_fastai(name, model_name):
    learn = make_learner(cbs=KEEP_ALL[name](), model_fn={'mlp': mlp, 'mlp_bn': mlp_bn}[model_name])
    learn.fit(2, 1e-2)
    assert learn.hard_miner.kept.tolist() == train_batch_sizes() * 2
    plain_state, plain_mode, plain_values = plain_run(model_name)
    got = state(learn.model)
    if model_name == 'mlp_bn': assert 'running_mean' in ''.join(got)
    assert_same_state(got, plain_state)
    assert learn.model.training == plain_mode
    # the same table as plain fastai's, and a `kept` column of 1s
    values = [list(map(float, v)) for v in learn.recorder.values]
    assert [v[:1] + v[2:] for v in values] == plain_values and [v[1] for v in values] == [1., 1.]

def test_keep_all_with_gradient_accumulation_equals_plain():
    "The callback runs before `GradientAccumulation`, which rescales the `loss_grad` it sets"
    states = []
    for cb in ([], [TopKCallback(1.0)], [BatchLossFilterCallback(1.0)]):
        learn = make_learner(cbs=cb + [GradientAccumulation(n_acc=3 * BS)])
        learn.fit(1, 1e-2)
        states.append(state(learn.model))
        if cb: assert learn.hard_miner.kept.tolist() == train_batch_sizes()
    assert_same_state(states[0], states[1])
    assert_same_state(states[0], states[2])
    plain_no_ga = make_learner(); plain_no_ga.fit(1, 1e-2)
    with pytest.raises(AssertionError): assert_same_state(state(plain_no_ga.model), states[0])  # GA matters here

class RNNLikeOutput(nn.Module):
    "An MLP returning (logits, raw_outputs, outputs) as fastai's AWD-LSTM does, for `RNNCallback`/`RNNRegularizer`"
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(64, 64), nn.ReLU()), nn.Linear(64, 10)
    def forward(self, x):
        h = self.body(x)
        return self.head(h), [h], [h]
    def reset(self): pass  # for `ModelResetter`

def test_gradient_keeps_fastai_rnn_regularization():
    "fastai's `RNNRegularizer` (AR/TAR, on by default in text learners) adds to `loss_grad` in after_loss"
    learn = make_learner(cbs=[RecTopK(16)] + rnn_cbs(alpha=2., beta=1.), model_fn=RNNLikeOutput)
    probe = run_one_batch(learn)
    idx = learn.hard_miner.idx
    m = copy.deepcopy(learn.model).train()
    logits, _, (h,) = m(*probe.xb)
    assert torch.equal(idx, select_top_k(ce_none(logits, *probe.yb).detach(), 16))
    (ce_none(logits, *probe.yb)[idx].mean() + 2. * h.pow(2).mean() + 1. * (h[:, 1:] - h[:, :-1]).pow(2).mean()).backward()
    expected = [p.grad for p in m.parameters()]
    assert_grads_differ(expected, reference_grads(learn.model, probe.xb, probe.yb, lambda o, y: ce_none(o[0], y),
                                                  idx=idx)[0])  # the regularization matters here
    assert_grads_close(probe.grads, expected)

# ---------------------------------------------------------------------------------------------------------------
# 7. bad arguments

BAD = [
    (lambda v: BatchLossFilterCallback(min_loss_perc=v), 'min_loss_perc', '(0, 1]', [0, 1.5, -1, float('nan'), True, '0.5']),
    (lambda v: BatchLossFilterCallback(min_sample_perc=v), 'min_sample_perc', '[0, 1]', [-0.1, 1.1, float('nan')]),
    (lambda v: TopKCallback(v), 'k', '(0, 1]', [0, -1, 0.0, 1.5, True, 'a', float('nan'), None]),
    (lambda v: SelectiveBackpropCallback(beta=v), 'beta', '>= 0', [-1, float('nan'), True, '3']),
    (lambda v: SelectiveBackpropCallback(history_size=v), 'history_size', '>= 1', [0, 1.5, -3, True]),
]
BAD_VIA_LEARNER = [
    (lambda l, v: l.batch_loss_filter(min_loss_perc=v), 'min_loss_perc', '(0, 1]', [0, 1.5]),
    (lambda l, v: l.batch_loss_filter(0.9, min_sample_perc=v), 'min_sample_perc', '[0, 1]', [-0.1, 1.1]),
    (lambda l, v: l.top_k(v), 'k', 'positive int', [0, 1.5, True]),
    (lambda l, v: l.selective_backprop(beta=v), 'beta', '>= 0', [-1, float('nan')]),
    (lambda l, v: l.selective_backprop(history_size=v), 'history_size', '>= 1', [0, 1.5]),
]

@pytest.mark.parametrize('make, name, rng, value', [(m, n, r, v) for m, n, r, vs in BAD for v in vs],
                         ids=[f'{n}={v!r}' for _, n, _, vs in BAD for v in vs])
def test_bad_arguments(make, name, rng, value):
    with pytest.raises(ValueError) as e: make(value)
    msg = str(e.value)
    assert f'`{name}`' in msg and rng in msg and repr(value) in msg

@pytest.mark.parametrize('call, name, rng, value', [(m, n, r, v) for m, n, r, vs in BAD_VIA_LEARNER for v in vs],
                         ids=[f'{n}={v!r}' for _, n, _, vs in BAD_VIA_LEARNER for v in vs])
def test_bad_arguments_via_learner(call, name, rng, value):
    learn = make_learner().top_k(4)
    old = learn.hard_miner
    with pytest.raises(ValueError, match=f'`{name}`') as e: call(learn, value)
    assert rng in str(e.value)
    assert learn.hard_miner is old and [c for c in learn.cbs if isinstance(c, HardMiningCallback)] == [old]

def test_good_edge_arguments():
    assert BatchLossFilterCallback(1.0, 0.).min_loss_perc == 1.0
    assert BatchLossFilterCallback(1e-9, 1.0).min_sample_perc == 1.0
    assert TopKCallback(1).k == 1 and TopKCallback(1.0).k == 1.0 and isinstance(TopKCallback(1.0).k, float)
    assert SelectiveBackpropCallback(beta=0).beta == 0. and SelectiveBackpropCallback(history_size=1).history.size == 1

@pytest.mark.parametrize('make, attr, value', [
    (lambda: TopKCallback(np.int64(4)), 'k', 4),
    (lambda: BatchLossFilterCallback(np.float32(0.5)), 'min_loss_perc', 0.5),
    (lambda: SelectiveBackpropCallback(history_size=np.int64(128)), 'history_size', 128),
    (lambda: SelectiveBackpropCallback(beta=np.float64(2.)), 'beta', 2.),
    (lambda: SelectiveBackpropCallback(beta=np.float32(2.)), 'beta', 2.),
    (lambda: SelectiveBackpropCallback(beta=np.int64(2)), 'beta', 2.),
], ids=['k_np_int64', 'min_loss_perc_np_float32', 'history_size_np_int64', 'beta_np_float64', 'beta_np_float32',
        'beta_np_int64'])
def test_numpy_scalars_accepted(make, attr, value):
    "Every argument accepts numpy scalars, e.g. `for beta in np.arange(4): learn.selective_backprop(beta)`"
    cb = make()
    got = cb.history.size if attr == 'history_size' else getattr(cb, attr)
    assert got == value

# ---------------------------------------------------------------------------------------------------------------
# 8. NaN losses

@pytest.mark.parametrize('name', list(CALLBACKS))
def test_nan_loss_raises_with_batch_number(name):
    xt, yt, xv, yv = digits()
    xt = xt.clone()
    xt[2 * BS + 5, 7] = float('nan')  # batch 2 of epoch 0 (no shuffling)
    lf = CrossEntropyLossFlat()
    learn = make_learner(cbs=CALLBACKS[name](), data=(xt, yt, xv, yv), shuffle=False, loss_func=lf)
    with pytest.raises(FloatingPointError, match=r'batch 2\b') as e: learn.fit(1, 1e-2)
    assert 'epoch 0' in str(e.value) and '1 of 64' in str(e.value)
    assert learn.loss_func is lf and lf.reduction == 'mean'
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())  # the NaN batch took no step
    assert len(learn.hard_miner.kept) == 2  # batches 0 and 1 were recorded

def test_nan_in_validation_does_not_raise():
    xt, yt, xv, yv = digits()
    xv = xv.clone()
    xv[10, 3] = float('nan')
    learn = make_learner(cbs=TopKCallback(0.5), data=(xt, yt, xv, yv))
    learn.fit(1, 1e-2)
    valid_loss = learn.recorder.values[-1][learn.recorder.metric_names.index('valid_loss') - 1]
    assert math.isnan(valid_loss) and len(learn.hard_miner.kept) == len(learn.dls.train)

# ---------------------------------------------------------------------------------------------------------------
# 9. losses that cannot give a per-sample loss

def my_loss(pred, targ): return F.cross_entropy(pred, targ)

@pytest.mark.parametrize('make_cb', [lambda: TopKCallback(16), lambda: BatchLossFilterCallback(0.9),
                                     lambda: SelectiveBackpropCallback(seed=0)], ids=['top_k', 'loss_filter', 'sb'])
def test_loss_without_reduction_needs_per_sample_loss_func(make_cb):
    learn = make_learner(cbs=make_cb(), loss_func=my_loss)
    with pytest.raises(TypeError, match='per_sample_loss_func=') as e: learn.fit(1, 1e-2)
    assert 'my_loss' in str(e.value)

def test_per_sample_loss_func_trains():
    learn = make_learner(loss_func=my_loss).top_k(16, per_sample_loss_func=lambda p, t: F.cross_entropy(p, t, reduction='none'))
    learn.fit(3, 1e-2)
    assert learn.hard_miner.kept.tolist() == [min(16, n) for n in train_batch_sizes() * 3]
    assert learn.recorder.values[-1][-1] > 0.7

def test_loss_taking_reduction_argument_trains():
    def loss_with_arg(pred, targ, reduction='mean'): return F.cross_entropy(pred, targ, reduction=reduction)
    learn = make_learner(loss_func=loss_with_arg).batch_loss_filter(0.9)
    learn.fit(2, 1e-2)
    assert len(learn.hard_miner.kept) == 2 * len(learn.dls.train) and learn.hard_miner.mean_kept_share() < 1

def test_loss_ignoring_reduction_raises_type_error():
    class AlwaysMean(nn.Module):
        reduction = 'mean'
        def forward(self, p, t): return F.cross_entropy(p, t)
    learn = make_learner(cbs=TopKCallback(4), loss_func=AlwaysMean())
    with pytest.raises(TypeError, match='per_sample_loss_func='): learn.fit(1, 1e-2)
    assert learn.loss_func.reduction == 'mean'

# ---------------------------------------------------------------------------------------------------------------
# 10. Learner methods

def miners(learn): return [c for c in learn.cbs if isinstance(c, HardMiningCallback)]

def test_learner_methods_return_learner_and_replace():
    learn = make_learner()
    assert learn.hard_miner is None
    assert learn.top_k(4) is learn
    first = learn.hard_miner
    assert isinstance(first, hm.TopKCallback) and first.k == 4 and miners(learn) == [first] and first.learn is learn
    assert learn.top_k(0.5) is learn
    assert miners(learn) == [learn.hard_miner] and learn.hard_miner is not first and learn.hard_miner.k == 0.5
    f = lambda p, t: F.cross_entropy(p, t, reduction='none')
    assert learn.batch_loss_filter(0.8, 0.2, per_sample_loss_func=f) is learn
    cb = learn.hard_miner
    assert isinstance(cb, hm.BatchLossFilterCallback) and miners(learn) == [cb]
    assert (cb.min_loss_perc, cb.min_sample_perc, cb.per_sample_loss_func) == (0.8, 0.2, f)
    assert learn.selective_backprop(2, 128, 7) is learn
    cb = learn.hard_miner
    assert isinstance(cb, hm.SelectiveBackpropCallback) and miners(learn) == [cb]
    assert (cb.beta, cb.history.size, cb.seed) == (2., 128, 7)
    learn.fit(1, 1e-2)  # the replaced callbacks do nothing
    assert len(cb.kept) == len(learn.dls.train) and len(first.kept) == 0

def test_learner_methods_chain():
    learn = make_learner().top_k(4).selective_backprop(beta=1, seed=0).batch_loss_filter(0.7)
    assert isinstance(learn, Learner) and isinstance(learn.hard_miner, hm.BatchLossFilterCallback)
    assert len(miners(learn)) == 1
    learn.fit(1, 1e-2)
    assert (learn.hard_miner.kept_loss_share >= 0.7 - 1e-6).all()

def test_two_hard_miners_raise():
    learn = make_learner(cbs=[TopKCallback(4), BatchLossFilterCallback(0.9)])
    with pytest.raises(ValueError, match='one hard-mining callback') as e: learn.fit(1, 1e-2)
    assert 'TopKCallback' in str(e.value) and 'BatchLossFilterCallback' in str(e.value)
    learn = make_learner().top_k(4)
    with pytest.raises(ValueError, match='one hard-mining callback'): learn.fit(1, 1e-2, cbs=SelectiveBackpropCallback())
    assert len(miners(learn)) == 1 and miners(learn)[0].k == 4

def test_hard_miner_attribute_survives_rejected_fit_callback():
    "A second miner passed to `fit` is rejected; the Learner keeps its own miner, reachable as `learn.hard_miner`"
    learn = make_learner().top_k(4)
    own = learn.hard_miner
    with pytest.raises(ValueError, match='one hard-mining callback'): learn.fit(1, 1e-2, cbs=SelectiveBackpropCallback())
    assert miners(learn) == [own]
    assert getattr(learn, 'hard_miner', None) is own

def test_callback_passed_to_fit():
    learn = make_learner()
    cb = TopKCallback(8)
    learn.fit(1, 1e-2, cbs=cb)
    assert cb.kept.tolist() == [8] * len(learn.dls.train) and not miners(learn)

# ---------------------------------------------------------------------------------------------------------------
# 11. multi-input model, flattened loss on a multi-value target

@functools.lru_cache(None)
def regression_data(n_train=210, n_valid=64):
    g = torch.Generator().manual_seed(0)
    n = n_train + n_valid
    a, b = torch.randn(n, 5, generator=g), torch.randn(n, 4, generator=g)
    y = a @ torch.randn(5, 3, generator=g) + 0.5 * (b ** 2) @ torch.randn(4, 3, generator=g) + 0.1 * torch.randn(n, 3, generator=g)
    return (a[:n_train], b[:n_train], y[:n_train]), (a[n_train:], b[n_train:], y[n_train:])

class TwoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 32), nn.Linear(4, 32), nn.Linear(32, 3)
    def forward(self, a, b): return self.head(torch.relu(self.a(a) + self.b(b)))

def two_input_learner(cbs=None, bs=32):
    set_seed(0)
    train, valid = regression_data()
    dls = DataLoaders(DataLoader(TensorDataset(*train), bs=bs, shuffle=True, num_workers=0),
                      DataLoader(TensorDataset(*valid), bs=bs, num_workers=0), device='cpu')
    return quiet(Learner(dls, TwoInput(), loss_func=MSELossFlat(), cbs=cbs))

def mse_none(p, y): return F.mse_loss(p, y, reduction='none').mean(1)

def test_multi_input_multi_value_target_top_k():
    cap = CaptureLosses(mse_none)
    learn = two_input_learner(cbs=[TopKCallback(0.25), cap])
    before = learn.validate()[0]
    learn.fit(5, 1e-2)
    cb = learn.hard_miner
    sizes = [32] * 6 + [18]
    assert cb.batch_sizes.tolist() == sizes * 5
    assert cb.kept.tolist() == [math.floor(0.25 * n + 0.5) for n in sizes * 5]
    share = [l.double().sort(descending=True).values[:k].sum() / l.double().sum() for l, k in zip(cap.losses, cb.kept)]
    close(cb.kept_loss_share, torch.stack(share).float(), eps=1e-5)
    assert learn.validate()[0] < 0.5 * before
    assert learn.loss_func.reduction == 'mean'

def test_multi_input_multi_value_target_loss_filter():
    cap = CaptureLosses(mse_none)
    learn = two_input_learner(cbs=[BatchLossFilterCallback(0.8), cap])
    learn.fit(2, 1e-2)
    cb = learn.hard_miner
    for l, k in zip(cap.losses, cb.kept.tolist()):
        s = l.double().sort(descending=True).values
        assert s[:k].sum() >= 0.8 * s.sum() - 1e-6 and s[:k - 1].sum() < 0.8 * s.sum()
    assert cb.mean_kept_share() < 0.9

def test_multi_input_gradient():
    learn = two_input_learner(cbs=RecLossFilter(0.5))
    probe = run_one_batch(learn)
    assert len(probe.xb) == 2 and len(probe.yb) == 1 and probe.yb[0].shape == (32, 3)
    expected, idx, losses = reference_grads(learn.model, probe.xb, probe.yb, mse_none,
                                            select=lambda l: select_loss_fraction(l, 0.5))
    assert torch.equal(learn.hard_miner.idx, idx) and 0 < len(idx) < 32
    assert_grads_close(probe.grads, expected)
    assert_grads_differ(probe.grads, full_batch_grads(learn.model, probe.xb, probe.yb, mse_none))
    close(probe.loss.item(), F.mse_loss(learn.model(*probe.xb), probe.yb[0]).item(), eps=1e-6)
