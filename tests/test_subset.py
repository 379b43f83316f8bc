"Subset mode (score, then train on the kept samples), Selective-Backprop's `fill_batch` and `staleness`."
import copy, math
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from fastcore.basics import noop
from fastai.torch_core import set_seed
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback
from fastai_hardmine.callback import (HardMiningCallback, BatchLossFilterCallback, TopKCallback,
                                      SelectiveBackpropCallback)
from fastai_hardmine.core import select_top_k, select_loss_fraction
from fastai_hardmine.data import TensorDataLoader, IndexedTensors
from test_callback import digits, make_learner, mlp_bn, state, assert_same_state, ce_none, Recording

@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

RULES = {
    'top_k': lambda **kw: TopKCallback(16, mode='subset', **kw),
    'loss_filter': lambda **kw: BatchLossFilterCallback(0.6, mode='subset', **kw),
    'selective': lambda **kw: SelectiveBackpropCallback(beta=2, seed=0, mode='subset', **kw),
}

class Snapshots(Callback):
    "Model buffers and mode at two points of each training batch: before scoring (order -100) and just before fastai's forward"
    def __init__(self, order): self.order, self.run_valid, self.snaps = order, False, []
    def before_batch(self): self.snaps.append((state_buffers(self.learn.model), self.learn.model.training))

def state_buffers(model): return [b.detach().clone() for b in model.buffers()]

class TrainedBatches(Callback):
    "The batch fastai's own forward ran on, per training step"
    order, run_valid = 60, False
    def __init__(self): self.batches = []
    def after_pred(self): self.batches.append((self.learn.xb, self.learn.yb))

# ---------------------------------------------------------------------------------------------------------------
# scoring leaves the model as it was

@pytest.mark.parametrize('rule', RULES)
def test_scoring_leaves_buffers_and_mode(rule):
    "Between the batch start and fastai's forward (i.e. across the scoring forward) no buffer or mode changes"
    learn = make_learner(cbs=RULES[rule](), model_fn=mlp_bn)
    before, after = Snapshots(-100), Snapshots(80)
    start = state(learn.model)
    learn.fit(1, 1e-2, cbs=[before, after])
    assert learn.hard_miner.scored.sum() == learn.hard_miner.batch_sizes.sum() > 0
    assert len(before.snaps) == len(after.snaps) == len(learn.hard_miner.batch_sizes)
    for (b0, m0), (b1, m1) in zip(before.snaps, after.snaps):
        assert m0 and m1
        assert len(b0) == 3
        for x, y in zip(b0, b1): assert torch.equal(x, y)
    # ... while the training forwards did update them, once per step
    assert learn.model[1].num_batches_tracked.item() == len(before.snaps)
    assert not torch.equal(start['1.running_mean'], learn.model[1].running_mean)

@pytest.mark.parametrize('rule', RULES)
def test_state_restored_after_subset_fit(rule):
    learn = make_learner(cbs=RULES[rule]())
    loss_func = learn.loss_func
    learn.fit(2, 1e-2)
    assert learn.loss_func is loss_func and loss_func.reduction == 'mean' and learn.model.training is False

# ---------------------------------------------------------------------------------------------------------------
# the step's gradient equals plain PyTorch on the kept samples

class StopBeforeStep(Callback):
    order, run_valid = 100, False
    def before_step(self):
        self.batch = self.learn.xb, self.learn.yb
        self.grads = [p.grad.detach().clone() for p in self.learn.model.parameters()]
        raise CancelFitException()

def full_first_batch(learn):
    "The first training batch, as the loader gives it (before any callback)"
    class First(Callback):
        order = -100
        def before_batch(self):
            self.b = self.learn.xb, self.learn.yb
            raise CancelFitException()
    first = First()
    learn.fit(1, cbs=first)
    return first.b

def bucketed(select, step):
    "Reference of shape buckets: the rule's kept set, then the highest-loss others until the count is a multiple of `step`"
    def rounded(losses):
        idx = select(losses).tolist()
        target = min(len(losses), -(-len(idx) // step) * step)
        others = [i for i in losses.argsort(descending=True).tolist() if i not in idx]
        return torch.tensor(sorted(idx + others[:target - len(idx)]))
    return rounded

@pytest.mark.parametrize('rule, kw, select', [('top_k', {}, lambda l: select_top_k(l, 16)),
                                              ('loss_filter', dict(buckets=0), lambda l: select_loss_fraction(l, 0.6)),
                                              # the default: 8 sizes per batch of 64, multiples of 8
                                              ('loss_filter', {}, bucketed(lambda l: select_loss_fraction(l, 0.6), 8)),
                                              ('loss_filter', dict(buckets=3), bucketed(lambda l: select_loss_fraction(l, 0.6), 22))])
@pytest.mark.parametrize('model_fn', ['mlp', 'mlp_bn'])
def test_gradient_equals_plain_pytorch_on_kept(rule, kw, select, model_fn):
    from test_callback import mlp
    make = {'mlp': mlp, 'mlp_bn': mlp_bn}[model_fn]
    (xb, yb) = full_first_batch(make_learner(model_fn=make))
    learn = make_learner(cbs=RULES[rule](**kw), model_fn=make)
    ref = copy.deepcopy(learn.model).train()
    stop = StopBeforeStep()
    learn.fit(1, 1e-2, cbs=stop)
    # independent reference: score in train mode on a copy, select, train the copy's twin on exactly those
    with torch.no_grad(): scores = F.cross_entropy(copy.deepcopy(ref)(*xb), *yb, reduction='none')
    idx = select(scores)
    assert 0 < len(idx) < len(scores)
    assert torch.equal(stop.batch[0][0], xb[0][idx]) and torch.equal(stop.batch[1][0], yb[0][idx])
    F.cross_entropy(ref(xb[0][idx]), yb[0][idx]).backward()
    for g, p in zip(stop.grads, ref.parameters()): torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)

def test_logged_loss_is_whole_batch_scoring_mean():
    class Logged(Callback):
        order, run_valid = 95, False
        def __init__(self): self.losses = []
        def after_loss(self): self.losses.append(self.learn.loss.item())
    (xb, yb) = full_first_batch(make_learner())
    learn = make_learner(cbs=RULES['top_k']())
    ref = copy.deepcopy(learn.model).train()
    logged = Logged()
    learn.fit(1, 1e-2, cbs=logged)
    with torch.no_grad(): expected = F.cross_entropy(ref(*xb), *yb).item()
    assert logged.losses[0] == pytest.approx(expected, rel=1e-6)

# ---------------------------------------------------------------------------------------------------------------
# multi-input, multi-target, mixed dtypes

class TabularLike(nn.Module):
    "Categorical (long) + continuous (float) inputs, two targets"
    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(1000, 4), nn.Linear(3, 4)
        self.head_a, self.head_b = nn.Linear(8, 5), nn.Linear(8, 1)
    def forward(self, cat, cont):
        h = torch.cat([self.emb(cat[:, 0]), self.lin(cont)], 1).relu()
        return self.head_a(h), self.head_b(h).squeeze(1)

def two_target_loss(pred, ya, yb, reduction='mean'):
    loss = F.cross_entropy(pred[0], ya, reduction='none') + F.mse_loss(pred[1], yb, reduction='none')
    return loss if reduction == 'none' else loss.mean() if reduction == 'mean' else loss.sum()

def tabular_data(n=200):
    "Every tensor carries the sample id, so a consistent cut keeps rows that agree"
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(n)
    cat = torch.stack([ids, ids % 7], 1)                       # long
    cont = torch.cat([ids[:, None].double(), torch.randn(n, 2, generator=g, dtype=torch.float64)], 1).float()
    ya, yb = ids % 5, ids.float()
    return cat, cont, ya, yb

def tabular_learner(cb, bs=32, drop_last=False, n=200):
    cat, cont, ya, yb = tabular_data(n)
    dl = TensorDataLoader(IndexedTensors(cat, cont, ya, yb), bs=bs, shuffle=True, drop_last=drop_last)
    valid = TensorDataLoader(IndexedTensors(cat[:32], cont[:32], ya[:32], yb[:32]), bs=bs)
    set_seed(0)
    dls = DataLoaders(dl, valid)
    dls.n_inp = 2
    learn = Learner(dls, TabularLike(), loss_func=two_target_loss, cbs=cb)
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    return learn

@pytest.mark.parametrize('rule', RULES)
def test_multi_input_multi_target_cut_consistently(rule):
    learn = tabular_learner(RULES[rule](per_sample_loss_func=lambda p, ya, yb: two_target_loss(p, ya, yb, 'none')))
    trained = TrainedBatches()
    learn.fit(1, 1e-3, cbs=trained)
    miner = learn.hard_miner
    assert miner.kept.sum() < miner.batch_sizes.sum()
    assert [len(b[1][0]) for b in trained.batches] == miner.kept.tolist() == miner.trained.tolist()
    for (cat, cont), (ya, yb) in trained.batches:
        assert cat.dtype == torch.long and cont.dtype == torch.float32
        ids = cat[:, 0]
        assert torch.equal(cont[:, 0].long(), ids) and torch.equal(ya, ids % 5) and torch.equal(yb.long(), ids)
        assert len(set(ids.tolist())) == len(ids)

# ---------------------------------------------------------------------------------------------------------------
# autocast: the scoring forward runs in the same precision context as the step

class CpuAutocast(MixedPrecision):
    "`MixedPrecision` with a CPU bfloat16 autocast (fastai's own autocasts for CUDA only)"
    def before_fit(self):
        self.autocast = torch.autocast('cpu', dtype=torch.bfloat16)
        self.learn.scaler, self.scales = torch.amp.GradScaler('cpu', enabled=False), []

def test_scoring_runs_under_mixed_precision_autocast():
    seen, raw = [], []
    def per_sample(pred, y):
        seen.append((torch.is_autocast_enabled('cpu'), pred.dtype))
        return F.cross_entropy(pred.float(), y, reduction='none')
    learn = make_learner(cbs=[CpuAutocast(), TopKCallback(16, per_sample_loss_func=per_sample, mode='subset')])
    hook = learn.model[-1].register_forward_hook(lambda m, i, o: raw.append(o.dtype))
    learn.fit(1, 1e-2)
    hook.remove()
    # the model computes in bfloat16 in both forwards; MixedPrecision's `after_pred` casts the prediction to float32
    # for the loss, and the miner replays it on the scoring output, so the scoring losses see what fastai's loss sees
    assert seen and all(on and dtype == torch.float32 for on, dtype in seen)
    assert raw and all(dtype == torch.bfloat16 for dtype in raw[:2 * len(learn.dls.train)])
    assert not torch.is_autocast_enabled('cpu')

def test_fill_batch_leaves_autocast_when_deferring():
    "A deferred batch skips `after_loss`, where MixedPrecision leaves its autocast: the callback leaves it instead"
    class Check(Callback):
        order = -100
        def __init__(self): self.states = []
        def before_batch(self): self.states.append(torch.is_autocast_enabled('cpu'))
    check = Check()
    learn = make_learner(cbs=[CpuAutocast(), SelectiveBackpropCallback(2, seed=0, mode='subset', fill_batch=True), check])
    learn.fit(2, 1e-2)
    assert (learn.hard_miner.trained == 0).any()
    assert not any(check.states) and not torch.is_autocast_enabled('cpu')

# ---------------------------------------------------------------------------------------------------------------
# fill_batch

class RecordIds(Recording, SelectiveBackpropCallback):
    "Selective-Backprop recording, per loader batch, the ids of the kept samples and all (id, loss) pairs"
    # the losses `select` sees are the batch's own without the noise guard (on by default), which zeroes the highest
    def __init__(self, *args, ignore_top=0, **kwargs): super().__init__(*args, ignore_top=ignore_top, **kwargs)

    def select(self, losses):
        idx = super().select(losses)
        ids = self.xb[0][:, 0]
        self.log.append((self.epoch, ids.clone(), losses.clone(), ids[idx].clone()))
        self.events.append(('scored', self.epoch, ids.clone(), losses.clone()))
        return idx
    def after_loss(self):
        super().after_loss()
        # the training forward's own per-sample losses, which the miner writes to the store ("free losses")
        with torch.no_grad(): losses = self.per_sample_loss_func(self.pred, *self.yb)
        self.events.append(('trained', self.epoch, self.xb[0][:, 0].clone(), losses.clone()))
    def reset(self):
        super().reset()
        self.log, self.events = [], []

@pytest.mark.parametrize('n, bs, drop_last', [(200, 32, False), (192, 32, False), (200, 32, True)])
def test_fill_batch_trains_every_kept_sample_once_per_epoch(n, bs, drop_last):
    cb = RecordIds(beta=1, seed=0, mode='subset', fill_batch=True,
                   per_sample_loss_func=lambda p, ya, yb: two_target_loss(p, ya, yb, 'none'))
    learn = tabular_learner(cb, bs=bs, drop_last=drop_last, n=n)
    trained = TrainedBatches()
    epochs = 3
    learn.fit(epochs, 1e-3, cbs=trained)
    n_batches = n // bs if drop_last else math.ceil(n / bs)
    assert len(cb.log) == epochs * n_batches == len(cb.trained)
    kept = torch.cat([k for _, _, _, k in cb.log]).tolist()
    ids = torch.cat([b[0][0][:, 0] for b in trained.batches]).tolist()
    # the kept samples, each exactly once, in the order they were kept; what still waits when the fit ends is less than
    # a batch (a remainder that does not fit the epoch's last step trains first in the next epoch)
    assert ids == kept[:len(ids)] and 0 <= len(kept) - len(ids) < bs
    steps = cb.trained.tolist()
    assert len(trained.batches) == sum(t > 0 for t in steps) and sum(steps) == len(ids)
    for e in range(epochs):
        trained_e = steps[e * n_batches:(e + 1) * n_batches]
        # full batches of the loader's size, and on the epoch's last batch whatever waits, never more than a batch
        assert all(t in (0, bs) for t in trained_e[:-1]) and 0 < trained_e[-1] <= bs
    assert (cb.trained == 0).any() and cb.kept.sum() < cb.batch_sizes.sum()

def test_fill_batch_logs_every_batch_loss():
    learn = make_learner(cbs=SelectiveBackpropCallback(2, seed=0, mode='subset', fill_batch=True))
    learn.fit(1, 1e-2)
    n = len(learn.hard_miner.batch_sizes)
    assert len(learn.recorder.losses) == n and all(math.isfinite(float(l)) for l in learn.recorder.losses)
    assert (learn.hard_miner.trained == 0).sum() > 0

# ---------------------------------------------------------------------------------------------------------------
# staleness

@pytest.mark.parametrize('n, bs, drop_last', [(200, 32, False), (192, 32, False), (200, 32, True)])
@pytest.mark.parametrize('staleness', [1, 2])
def test_staleness_reuses_cached_losses_aligned_with_samples(n, bs, drop_last, staleness):
    cb = RecordIds(beta=1, seed=0, mode='subset', staleness=staleness,
                   per_sample_loss_func=lambda p, ya, yb: two_target_loss(p, ya, yb, 'none'))
    learn = tabular_learner(cb, bs=bs, drop_last=drop_last, n=n)
    epochs = 2 * (staleness + 1)
    learn.fit(epochs, 1e-3)
    n_batches = n // bs if drop_last else math.ceil(n / bs)
    scored = cb.scored.view(epochs, n_batches).sum(1).tolist()
    last_measured = {}   # id -> (epoch, loss) when its loss was last computed: by the scoring or the training forward
    for e in range(epochs):
        seen = torch.cat([ids for kind, ep, ids, _ in cb.events if ep == e and kind == 'scored']).tolist()
        assert seen != sorted(seen)  # shuffled: batches differ from one epoch to the next
        fresh = [i for i in seen if i in last_measured and e - last_measured[i][0] <= staleness]
        # only the samples without a fresh enough loss were forwarded for scoring
        assert scored[e] == len(seen) - len(fresh)
        for kind, ep, ids, losses in cb.events:
            if ep != e: continue
            for i, l in zip(ids.tolist(), losses.tolist()):
                if kind == 'scored' and i in fresh: assert l == last_measured[i][1], f"epoch {e}: sample {i} got another sample's loss"
                else: last_measured[i] = (e, l)
    # the first epoch is fully scored, except drop_last's never-seen samples
    assert scored[0] == (n_batches * bs if drop_last else n)
    assert scored[1] < scored[0]
    # free losses: the kept samples' losses came from their training forward, so fewer are scored than without them
    assert sum(scored) < (epochs // (staleness + 1)) * scored[0]

def test_stale_step_runs_no_scoring_forward():
    forwards = []
    learn = make_learner(cbs=SelectiveBackpropCallback(2, seed=0, mode='subset', staleness=1))
    learn.model[0].register_forward_hook(lambda m, i, o: forwards.append((learn.epoch, learn.training, len(i[0]))))
    learn.fit(2, 1e-2)
    miner = learn.hard_miner
    nb = len(miner.batch_sizes) // 2
    train1 = [n for e, t, n in forwards if e == 1 and t]
    # epoch 1: fastai's forward on the kept samples only, one per batch
    assert train1 == miner.kept[nb:].tolist() == miner.trained[nb:].tolist()
    assert miner.scored[nb:].sum() == 0 and miner.scored[:nb].sum() == miner.batch_sizes[:nb].sum()

def test_staleness_needs_fastai_dataloader_indices():
    class PlainIdx(TensorDataLoader):
        "A loader that forgets its index order, as a non-fastai loader would not have one"
        def __iter__(self):
            for b in super().__iter__():
                self.__dict__.pop('_DataLoader__idxs', None)
                yield b
    x, y = digits()[:2]
    dls = DataLoaders(PlainIdx(IndexedTensors(x, y), bs=64, shuffle=True), TensorDataLoader(IndexedTensors(x, y), bs=64))
    learn = Learner(dls, nn.Linear(64, 10), loss_func=CrossEntropyLossFlat(),
                    cbs=SelectiveBackpropCallback(2, mode='subset', staleness=1))
    learn.remove_cb(ProgressCallback)
    with pytest.raises(TypeError, match='`staleness` needs the dataset indices'): learn.fit(1)
    assert learn.loss_func.reduction == 'mean'

@pytest.mark.parametrize('kwargs, match', [
    (dict(staleness=1, mode='mask'), "need mode='subset'"), (dict(fill_batch=True, mode='mask'), "need mode='subset'"),
    (dict(staleness=-1, mode='subset'), '`staleness` must be an int >= 0'),
    (dict(staleness=1.5, mode='subset'), '`staleness` must be an int >= 0'),
    (dict(staleness=True, mode='subset'), '`staleness` must be an int >= 0'),
    (dict(fill_batch=1, mode='subset'), '`fill_batch` must be True or False'),
])
def test_bad_fill_batch_and_staleness(kwargs, match):
    with pytest.raises(ValueError, match=match): SelectiveBackpropCallback(**kwargs)
    with pytest.raises(ValueError, match=match): make_learner().selective_backprop(**kwargs)

def test_subset_is_the_default_mode():
    assert all(make().mode == 'subset' for make in (lambda: TopKCallback(4), BatchLossFilterCallback, SelectiveBackpropCallback))
    learn = make_learner()
    for add in (lambda: learn.top_k(4), learn.batch_loss_filter, learn.selective_backprop):
        assert add().hard_miner.mode == 'subset'
    with pytest.raises(ValueError, match='`mode` must be one of'): TopKCallback(4, mode='drop')

def test_batchnorm_model_never_trains_on_one_sample():
    "BatchNorm raises on a training batch of one: a rule keeping one sample gets the highest-loss other one added"
    learn = make_learner(cbs=TopKCallback(1), model_fn=mlp_bn)
    trained = TrainedBatches()
    (xb, yb) = full_first_batch(make_learner(model_fn=mlp_bn))
    ref = copy.deepcopy(learn.model).train()
    learn.fit(1, 1e-2, cbs=trained)
    assert learn.hard_miner.trained.tolist() == learn.hard_miner.kept.tolist() == [2] * len(learn.hard_miner.kept)
    with torch.no_grad(): scores = F.cross_entropy(ref(*xb), *yb, reduction='none')
    assert torch.equal(trained.batches[0][0][0], xb[0][select_top_k(scores, 2)])
    # without BatchNorm, one sample is one sample
    learn = make_learner(cbs=TopKCallback(1))
    learn.fit(1, 1e-2)
    assert learn.hard_miner.trained.max() == 1
