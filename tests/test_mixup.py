"MixUp, CutMix (any fastai `MixHandler`): select on the batch before mixing (subset), or on the mixed per-sample loss (mask)."
import copy
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.mixup import MixUp, CutMix
from fastai.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat
from fastai_hardmine.callback import TopKCallback, BatchLossFilterCallback, SelectiveBackpropCallback
from fastai_hardmine.core import select_top_k, select_loss_fraction
from test_callback import make_learner, mlp, mlp_bn, digits
from test_subset import CpuAutocast, full_first_batch, one_thread  # noqa: F401 (fixture)

class RecordPerms:
    "Records every `torch.randperm` (MixUp/CutMix draw their shuffle with it)"
    def __init__(self, monkeypatch):
        self.perms, real = [], torch.randperm
        def randperm(*args, **kwargs):
            p = real(*args, **kwargs)
            self.perms.append(p.clone())
            return p
        monkeypatch.setattr(torch, 'randperm', randperm)

class StopBeforeStep(Callback):
    "Grabs the mixed batch, MixUp's `lam` and the gradients just before the first step, then ends the fit"
    order, run_valid = 100, False
    def before_step(self):
        mix = next(cb for cb in self.learn.cbs if isinstance(cb, (MixUp, CutMix)))
        self.xb, self.yb, self.lam = self.learn.xb[0].clone(), self.learn.yb[0].clone(), mix.lam.clone()
        self.grads = [p.grad.detach().clone() for p in self.learn.model.parameters()]
        raise CancelFitException()

def mixed_ce(out, y, perm, lam):
    return torch.lerp(F.cross_entropy(out, y[perm], reduction='none'), F.cross_entropy(out, y, reduction='none'), lam)

SELECT = {'top_k': (lambda mode: TopKCallback(20, mode=mode), lambda l: select_top_k(l, 20)),
          'loss_filter': (lambda mode: BatchLossFilterCallback(0.5, mode=mode, buckets=0), lambda l: select_loss_fraction(l, 0.5))}

@pytest.mark.parametrize('rule', SELECT)
@pytest.mark.parametrize('model_fn', [mlp, mlp_bn])
def test_mixup_subset_selects_then_mixes_the_kept(monkeypatch, rule, model_fn):
    "Gradient = plain PyTorch that scores the unmixed batch, keeps by the rule, and mixes the kept with MixUp's lam and permutation"
    make_cb, select = SELECT[rule]
    (xb,), (yb,) = full_first_batch(make_learner(model_fn=model_fn))
    learn = make_learner(cbs=[make_cb('subset'), MixUp(0.4)], model_fn=model_fn)
    ref = copy.deepcopy(learn.model).train()
    perms, stop = RecordPerms(monkeypatch), StopBeforeStep()
    learn.fit(1, 1e-2, cbs=stop)
    with torch.no_grad(): scores = F.cross_entropy(copy.deepcopy(ref)(xb), yb, reduction='none')
    idx = select(scores)
    assert 1 < len(idx) < len(yb)
    xk, yk = xb[idx], yb[idx]
    perm, lam = perms.perms[-1], stop.lam
    assert len(perm) == len(lam) == len(idx)
    # MixUp mixed the kept samples only, with each other
    assert torch.equal(stop.yb, yk)
    torch.testing.assert_close(stop.xb, torch.lerp(xk[perm], xk, lam[:, None]))
    mixed_ce(ref(stop.xb), yk, perm, lam).mean().backward()
    for g, p in zip(stop.grads, ref.parameters()): torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    assert learn.loss_func.__class__ is CrossEntropyLossFlat  # MixUp put the loss back

@pytest.mark.parametrize('rule', SELECT)
def test_mixup_mask_selects_on_the_mixed_loss(monkeypatch, rule):
    "Gradient = plain PyTorch: mix the whole batch, per-sample mixed losses, mean over the rule's pick of them"
    make_cb, select = SELECT[rule]
    (xb,), (yb,) = full_first_batch(make_learner())
    learn = make_learner(cbs=[make_cb('mask'), MixUp(0.4)])
    ref = copy.deepcopy(learn.model).train()
    perms, stop = RecordPerms(monkeypatch), StopBeforeStep()
    learn.fit(1, 1e-2, cbs=stop)
    perm, lam = perms.perms[-1], stop.lam
    assert len(perm) == len(yb)
    torch.testing.assert_close(stop.xb, torch.lerp(xb[perm], xb, lam[:, None]))
    losses = mixed_ce(ref(stop.xb), yb, perm, lam)
    idx = select(losses.detach())
    assert 1 < len(idx) < len(yb) and learn.hard_miner.kept.tolist() == [len(idx)]
    losses[idx].mean().backward()
    for g, p in zip(stop.grads, ref.parameters()): torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)

class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 10)
    def forward(self, x): return self.head(self.conv(x.view(-1, 1, 8, 8)).relu().mean((2, 3)))

def image_digits():
    xt, yt, xv, yv = digits()
    return xt.view(-1, 1, 8, 8), yt, xv.view(-1, 1, 8, 8), yv

@pytest.mark.parametrize('mode', ['subset', 'mask'])
def test_cutmix(monkeypatch, mode):
    "CutMix pastes a box of the shuffled kept images: same gradient as plain PyTorch on that batch with CutMix's lam"
    (xb,), (yb,) = full_first_batch(make_learner(model_fn=TinyConv, data=image_digits()))
    learn = make_learner(cbs=[TopKCallback(20, mode=mode), CutMix(1.)], model_fn=TinyConv, data=image_digits())
    ref = copy.deepcopy(learn.model).train()
    perms, stop = RecordPerms(monkeypatch), StopBeforeStep()
    learn.fit(1, 1e-2, cbs=stop)
    perm, lam = perms.perms[-1], stop.lam
    if mode == 'subset':
        with torch.no_grad(): idx = select_top_k(F.cross_entropy(copy.deepcopy(ref)(xb), yb, reduction='none'), 20)
        xk, yk = xb[idx], yb[idx]
        assert torch.equal(stop.yb, yk) and len(perm) == 20
        # outside the pasted box every pixel is the kept image's own, inside it the shuffled kept image's
        inside = stop.xb != xk
        assert torch.equal(stop.xb[inside], xk[perm][inside])
        mixed_ce(ref(stop.xb), yk, perm, lam).mean().backward()
    else:
        losses = mixed_ce(ref(stop.xb), yb, perm, lam)
        losses[select_top_k(losses.detach(), 20)].mean().backward()
    for g, p in zip(stop.grads, ref.parameters()): torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)

@pytest.mark.parametrize('mode', ['subset', 'mask'])
def test_mixup_with_soft_targets_multilabel(mode):
    "A loss without `y_int` (multi-label BCE): MixUp lerps the targets and keeps the loss; both modes train on the kept"
    xt, yt, xv, yv = digits()
    onehot = lambda y: F.one_hot(y, 10).float()
    learn = make_learner(cbs=[TopKCallback(16, mode=mode), MixUp(0.4)], data=(xt, onehot(yt), xv, onehot(yv)),
                         loss_func=BCEWithLogitsLossFlat(), metrics=[])
    sizes = []
    class Size(Callback):
        order, run_valid = 100, False
        def after_pred(self): sizes.append(len(self.learn.pred))
    learn.fit(1, 1e-2, cbs=Size())
    miner = learn.hard_miner
    assert miner.kept.tolist() == [min(16, n) for n in miner.batch_sizes.tolist()]
    assert sizes == (miner.kept.tolist() if mode == 'subset' else miner.batch_sizes.tolist())

def test_mixup_subset_scores_under_autocast_and_fill_batch():
    "Selecting before MixUp puts the miner before MixedPrecision: scoring still runs under its autocast, and a deferred batch leaves no autocast open"
    seen = []
    def per_sample(pred, y):
        seen.append(torch.is_autocast_enabled('cpu'))
        return F.cross_entropy(pred.float(), y, reduction='none')
    learn = make_learner(cbs=[CpuAutocast(), MixUp(0.4),
                              SelectiveBackpropCallback(2, seed=0, fill_batch=True, per_sample_loss_func=per_sample)])
    class Check(Callback):
        order = -100
        def __init__(self): self.states, self.orders = [], []
        def before_batch(self):
            self.states.append(torch.is_autocast_enabled('cpu'))
            self.orders.append(self.learn.hard_miner.order)
    check = Check()
    learn.fit(2, 1e-2, cbs=check)
    miner = learn.hard_miner
    # before MixUp during the fit, back after MixedPrecision once it ends
    assert all(o < MixUp.order for o in check.orders) and miner.order > CpuAutocast.order and seen and all(seen)
    assert (miner.trained == 0).any() and miner.trained.sum() == miner.kept.sum()
    assert not any(check.states) and not torch.is_autocast_enabled('cpu')
    assert learn.loss_func.__class__ is CrossEntropyLossFlat and learn.loss_func.reduction == 'mean'
    # without a MixHandler the miner goes back to its place after MixedPrecision
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, MixUp)])
    learn.fit(1, 1e-2)
    assert miner.order > CpuAutocast.order
