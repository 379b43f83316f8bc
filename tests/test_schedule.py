"Selection schedules (`start`, `end`, `warmup`, `interrupt`), shape buckets, the noise guard and free losses, inside real fits"
import copy, math
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patch Learner)
from fastai_hardmine.callback import TopKCallback, BatchLossFilterCallback, SelectiveBackpropCallback
from test_callback import make_learner, digits, BS, CaptureLosses, Recording
from test_subset import tabular_learner, two_target_loss, TrainedBatches, one_thread  # noqa: F401 (fixture)

N_TRAIN = len(digits()[0])
N_ITER = math.ceil(N_TRAIN / BS)

def expected_selection(epochs, start=0., end=1., warmup=0, interrupt=0):
    "Slow reference: for each batch of the fit, does the rule select on it"
    total, out = epochs * N_ITER, []
    for e in range(epochs):
        for i in range(N_ITER):
            step = e * N_ITER + i
            inside = start <= step / total + 1e-12 and step / total + 1e-12 < end
            out.append(e >= warmup and inside and not (interrupt and (step + 1) % interrupt == 0))
    return out

@pytest.mark.parametrize('kw', [dict(warmup=1), dict(end=0.75), dict(start=0.25, end=0.5), dict(interrupt=3),
                                dict(warmup=1, end=0.75, interrupt=4)])
@pytest.mark.parametrize('mode', ['subset', 'mask'])
def test_window_turns_selection_on_and_off_at_the_right_batches(kw, mode):
    epochs = 4
    learn = make_learner(cbs=TopKCallback(16, mode=mode, **kw))
    learn.fit(epochs, 1e-2)
    cb, want = learn.hard_miner, torch.tensor(expected_selection(epochs, **kw))
    assert want.any() and not want.all()
    sizes = cb.batch_sizes
    # a plain batch keeps and trains everything and runs no scoring forward; a selecting one keeps 16
    assert torch.equal(cb.kept, torch.where(want, torch.minimum(sizes, torch.tensor(16)), sizes))
    if mode == 'subset':
        assert torch.equal(cb.scored, torch.where(want, sizes, 0))
        assert torch.equal(cb.trained, cb.kept)

class LRs(Callback):
    "The learning rate and momentum of every optimizer step"
    order, run_valid = 100, False
    def before_fit(self): self.lrs = []
    def before_step(self): self.lrs.append((self.opt.hypers[0]['lr'], self.opt.hypers[0]['mom']))

@pytest.mark.parametrize('kw', [dict(), dict(warmup=1, end=0.75, interrupt=3), dict(buckets=0)])
def test_lr_schedule_and_step_count_match_plain_fastai(kw):
    plain, mined = LRs(), LRs()
    make_learner().fit_one_cycle(3, 1e-2, cbs=plain)
    make_learner(cbs=BatchLossFilterCallback(0.6, **kw)).fit_one_cycle(3, 1e-2, cbs=mined)
    assert len(plain.lrs) == 3 * N_ITER
    assert mined.lrs == plain.lrs

def test_final_phase_trains_on_all_samples():
    "end=0.75 of 4 epochs: the last epoch trains every sample of every batch, as plain fastai does"
    trained = TrainedBatches()
    learn = make_learner(cbs=SelectiveBackpropCallback(2, seed=0, end=0.75))
    learn.fit(4, 1e-2, cbs=trained)
    cb = learn.hard_miner
    last = slice(3 * N_ITER, None)
    assert torch.equal(cb.trained[last], cb.batch_sizes[last]) and cb.scored[last].sum() == 0
    assert sum(len(y) for _, (y,) in trained.batches[last]) == N_TRAIN
    assert (cb.kept[:3 * N_ITER] < cb.batch_sizes[:3 * N_ITER]).any()

def test_fill_batch_queue_trains_with_a_plain_batch():
    "A batch the window trains plain takes queued samples only up to the loader's batch size; the rest waits, none trains twice"
    cb = SelectiveBackpropCallback(1, seed=0, fill_batch=True, interrupt=3,
                                   per_sample_loss_func=lambda p, ya, yb: two_target_loss(p, ya, yb, 'none'))
    learn = tabular_learner(cb, bs=32, n=200)
    trained = []
    class Trained(Callback):
        order, run_valid = 60, False
        def after_pred(self): trained.append((self.epoch, self.iter, self.learn.xb[0][:, 0].clone()))
    learn.fit(2, 1e-3, cbs=Trained())
    n_iter = 7
    assert len(cb.kept) == 2 * n_iter and len(trained) == int((cb.trained > 0).sum())
    sizes = {e * n_iter + i: len(t) for e, i, t in trained}
    # no step trains more than the loader's batch size; a plain batch (every third) trains at least its whole batch
    assert max(sizes.values()) <= 32
    plain = [i for i in range(2 * n_iter) if i % 3 == 2]
    assert all(sizes[i] == cb.trained[i] >= cb.batch_sizes[i] for i in plain)
    # every kept sample trains once, in its epoch or at the start of the next; fewer than a batch wait at the end
    ids = [t for _, _, t in trained]
    for e in range(2):
        ep = torch.cat([t for ep_, _, t in trained if ep_ == e]).tolist()
        assert len(ep) == len(set(ep))
    left = int(cb.kept.sum()) - int(cb.trained.sum())
    assert 0 <= left < 32 and sum(len(t) for t in ids) == int(cb.trained.sum())

@pytest.mark.parametrize('mode', ['subset', 'mask'])
def test_ignore_top_never_selects_the_highest_losses(mode):
    "ignore_top=0.25 with top_k(16) of 64: the 16 highest losses are skipped, the next 16 kept"
    capture = CaptureLosses()
    class RecTopK(Recording, TopKCallback): pass
    cb = RecTopK(16, mode=mode, ignore_top=0.25)
    kept = []
    class Kept(Callback):
        order = 90
        def after_loss(self):
            if self.training: kept.append(self.learn.yb[0].clone())
    learn = make_learner(cbs=[cb, Kept()] + ([capture] if mode == 'mask' else []), shuffle=False)
    if mode == 'subset':
        from test_subset import full_first_batch
        xb, yb = full_first_batch(make_learner(shuffle=False))
        model = copy.deepcopy(learn.model).train()
        with torch.no_grad(): losses = F.cross_entropy(model(*xb), *yb, reduction='none')
        learn.fit(1, 0.)
        order = losses.argsort(descending=True)
        want = order[16:32].sort().values
        assert torch.equal(kept[0], yb[0][want])
    else:
        learn.fit(1, 0.)
        # the last batch's selection (`Recording` keeps the last): the 16 below its quarter of highest losses
        losses = capture.losses[-1]
        order = losses.argsort(descending=True)
        n_top = int(0.25 * len(losses))
        assert torch.equal(cb.idx.sort().values, order[n_top:n_top + 16].sort().values)

def test_selective_backprop_guards_against_noise_by_default():
    "Selective-Backprop's default ignore_top=0.1 (measured: benchmarks/noise_guard.py): the top 6 of 64 losses never kept"
    capture = CaptureLosses()
    class RecSB(Recording, SelectiveBackpropCallback): pass
    cb = RecSB(beta=1, seed=0, mode='mask')
    assert cb.ignore_top == 0.1 and make_learner().selective_backprop().hard_miner.ignore_top == 0.1
    assert BatchLossFilterCallback().ignore_top == TopKCallback(4).ignore_top == 0
    learn = make_learner(cbs=[cb, capture])
    learn.fit(1, 1e-2)
    losses = capture.losses[-1]
    top = losses.topk(int(0.1 * len(losses))).indices
    assert len(cb.idx) > 0 and not set(top.tolist()) & set(cb.idx.tolist())

def test_buckets_round_kept_counts_up():
    "Default buckets: every kept count of a full batch of 64 is a multiple of 8; buckets=0 keeps the exact counts"
    learn = make_learner(cbs=BatchLossFilterCallback(0.6))
    learn.fit(2, 1e-2)
    cb = learn.hard_miner
    full = cb.batch_sizes == BS
    assert ((cb.kept[full] % 8) == 0).all()
    exact = make_learner(cbs=BatchLossFilterCallback(0.6, buckets=0))
    exact.fit(2, 1e-2)
    assert ((exact.hard_miner.kept[full] % 8) != 0).any()
    assert (cb.kept >= exact.hard_miner.kept).float().mean() > 0.5

@pytest.mark.parametrize('make, msg', [
    (lambda: TopKCallback(8, buckets=4), 'one shape already'),
    (lambda: BatchLossFilterCallback(buckets=4, mode='mask'), 'trains the whole batch'),
    (lambda: SelectiveBackpropCallback(fill_batch=True, buckets=4), 'one shape already'),
    (lambda: BatchLossFilterCallback(buckets=-1), '`buckets` must be None'),
    (lambda: BatchLossFilterCallback(ignore_top=1.), '`ignore_top` must be a number in [0, 1)'),
    (lambda: TopKCallback(8, start=0.6, end=0.5), '`start` must be below `end`'),
    (lambda: SelectiveBackpropCallback(interrupt=1), '`interrupt` must be 0'),
    (lambda: make_learner().batch_loss_filter(warmup=-1), '`warmup` must be an int >= 0')])
def test_bad_schedule_bucket_and_guard_arguments(make, msg):
    with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[')): make()

class SmallCNN(torch.nn.Module):
    "A convnet that takes any image size (adaptive pooling), as vision models do"
    def __init__(self):
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 4)
    def forward(self, x): return self.head(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))

def test_score_scale_scores_downscaled_images():
    "score_scale=0.5: the rule ranks the losses of the images resized to half, and trains on the full-size kept images"
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai_hardmine.data import TensorDataLoader, IndexedTensors
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 16, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    dls = DataLoaders(TensorDataLoader(IndexedTensors(x, y), bs=32), TensorDataLoader(IndexedTensors(x[:8], y[:8]), bs=8))
    torch.manual_seed(0)
    learn = Learner(dls, SmallCNN(), loss_func=F.cross_entropy, cbs=TopKCallback(8, score_scale=0.5))
    ref = copy.deepcopy(learn.model)
    seen = []
    class Seen(Callback):
        order, run_valid = 60, False
        def after_pred(self): seen.append(self.learn.xb[0].clone())
    learn.fit(1, 0., cbs=Seen())
    small = F.interpolate(x[:32], scale_factor=0.5, mode='bilinear', align_corners=False, antialias=True)
    with torch.no_grad(): idx = F.cross_entropy(ref(small), y[:32], reduction='none').topk(8).indices.sort().values
    assert seen[0].shape == (8, 3, 16, 16) and torch.equal(seen[0], x[:32][idx])
    with torch.no_grad(): full = F.cross_entropy(ref(x[:32]), y[:32], reduction='none').topk(8).indices.sort().values
    assert not torch.equal(idx, full)  # the downscaled ranking differs here: the test would see a full-size scoring
    with pytest.raises(ValueError, match='first input is'):
        make_learner(cbs=TopKCallback(8, score_scale=0.5)).fit(1)
    with pytest.raises(ValueError, match='runs no scoring forward'): TopKCallback(8, score_scale=0.5, mode='mask')
