"Epoch-level pruning (InfoBatch) on a real fastai `Learner`: the weights it applies, the samples each epoch trains on, the schedule, and what it leaves alone."
import copy, math
import pytest
import torch
import torch.nn.functional as F
from fastcore.test import test_close as close
from fastai.torch_core import set_seed
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.data import WeightedDL
from fastai.callback.mixup import MixUp
from fastai.callback.training import GradientAccumulation
from fastai.callback.schedule import fit_one_cycle, lr_find, combined_cos  # noqa: F401 (patch Learner)
from fastai_hardmine import pruning
from fastai_hardmine.prune import InfoBatchCallback
from fastai_hardmine.pruning import below_mean, pruned_count, prune_epoch, plan_epoch
from fastai_hardmine.callback import TopKCallback
from fastai_hardmine.data import tensor_dls
from test_callback import make_dls, digits, mlp, mlp_bn, quiet, state, one_thread  # noqa: F401 (fixture)

N = len(digits()[0])  # 1437 training samples

def learner(loader='tfmd', cbs=None, model_fn=mlp, seed=0, bs=64, data=None, **kwargs):
    "Same seed -> same initial weights and data order; `loader`: 'tfmd' (a `TfmdDL` from `Datasets`) or 'tensor'"
    set_seed(seed)
    data = data if data is not None else digits()
    dls = make_dls(*data, bs=bs) if loader == 'tfmd' else tensor_dls(*data, bs=bs, device='cpu')
    return quiet(Learner(dls, model_fn(), loss_func=CrossEntropyLossFlat(), cbs=cbs, **kwargs))

class TrainedIndices(Callback):
    "Per training epoch: the dataset indices of every batch (from the pruner's mapping), checked against the batch's contents"
    order = InfoBatchCallback.order + 1
    def __init__(self, x): self.x, self.epochs = x, []
    def before_train(self): self.epochs.append([])
    def after_loss(self):
        if not self.training: return
        idx = self.learn.info_batch_pruner.batch_indices(self.iter, len(self.yb[0]))
        # the mapped indices are the batch's own samples
        assert torch.equal(self.xb[0], self.x[idx])
        self.epochs[-1].append(idx)

# ---------------------------------------------------------------------------------------------------------------
# the rule

def test_planted_losses_skip_a_share_r_of_the_below_mean_samples():
    losses = torch.arange(1000.)
    measured = torch.ones(1000, dtype=torch.bool)
    measured[990:] = False  # never measured: never candidates, even with the lowest "loss" of 0 written there
    losses[990:] = 0.
    mean = losses[:990].mean()
    expected = [i for i in range(990) if losses[i] < mean]
    skipped = torch.zeros(1000)
    draws = 400
    for seed in range(draws):
        cand = below_mean(losses, measured, torch.Generator().manual_seed(seed))
        assert sorted(cand.tolist()) == expected
        n = pruned_count(len(cand), 0.3)
        assert n == math.floor(0.3 * len(expected) + 0.5)  # rounded half up: 148.5 -> 149
        kept, weights = prune_epoch(cand, n, 1000)
        assert not kept[cand[:n]].any() and kept.sum() == 1000 - n
        close(weights[kept].sum().item(), 1000, eps=1e-3)  # unbiased: the weights sum to the full count
        skipped += ~kept
    # each candidate is skipped with probability r, each other sample never
    assert (skipped[len(expected):] == 0).all()
    share = skipped[:len(expected)] / draws
    close(share.mean().item(), 149 / 495); assert ((share - 0.3).abs() < 0.15).all()

# ten samples, sample 9 never measured (its 0 is no loss): the mean of the others is 40.5 / 9 = 4.5, so the candidates
# are the odd-loss samples 0, 2, 4, 6, 8 and the others are 1, 3, 5, 7, 9
TEN = torch.tensor([1., 9., 2., 8., 3., 7., 4., 6., .5, 0.]), torch.arange(10) < 9
OTHERS = [1, 3, 5, 7, 9]

def plan(bs, prune_ratio=0.9, drop_last=False, min_rows=1, agreed_batches=None, seed=0, shuffle=False):
    return plan_epoch(*TEN, 10, bs, drop_last, prune_ratio, torch.Generator().manual_seed(seed), shuffle, min_rows,
                      agreed_batches)

def test_plan_epoch_hand_computed():
    # 0.9 of 5 candidates rounds to all 5: the epoch trains the 5 others, unweighted (no kept candidate to weigh up)
    p = plan(3)
    assert p.n_kept == 5 and p.order.tolist() == OTHERS and p.weights.tolist() == [1.] * 10
    # in batches of 4 those 5 leave a last batch of one: with BatchNorm's 2 rows one candidate stays, weighed by 5/1
    p = plan(4, min_rows=2)
    extra = sorted(set(p.order.tolist()) - set(OTHERS))
    assert p.n_kept == 6 and len(extra) == 1 and extra[0] in (0, 2, 4, 6, 8) and set(OTHERS) < set(p.order.tolist())
    assert p.weights[extra].item() == 5. and p.weights.sum().item() == 9 + 5
    assert plan(4, min_rows=1).n_kept == 5
    # another process runs 3 batches of 3: 7 samples make them, so 2 candidates stay, each weighed by 5/2
    p = plan(3, agreed_batches=3)
    assert p.n_kept == 7 and sorted(p.weights[p.order].tolist()) == [1.] * 5 + [2.5] * 2
    # ... 4 batches take all 10 (the loader itself: no plan); 5 are more than this process has
    assert plan(3, agreed_batches=4) is None
    with pytest.raises(RuntimeError, match="This process's training loader has 4 batches, fewer than another process's"):
        plan(3, agreed_batches=5)
    # dropping the last partial batch: 5 kept make one batch; another process's 3 batches take 9 samples
    assert plan(3, drop_last=True).n_kept == 5 and plan(3, drop_last=True, agreed_batches=3).n_kept == 9
    assert plan(4, drop_last=True, min_rows=2).n_kept == 5  # no partial batch trains, so BatchNorm adds none
    # the count to agree on is asked for with this process's own count (2 batches of 3), once per plan
    asked = []
    assert plan(3, agreed_batches=lambda b: asked.append(b) or b).n_kept == 5 and asked == [2]
    # nothing to skip: no plan
    assert plan(3, prune_ratio=0.) is None

def reference_plan(losses, measured, n, bs, drop_last, prune_ratio, seed, shuffle, min_rows, agreed):
    "The plan, counted by brute force: the loader's batches listed, kept counts tried one by one"
    gen = torch.Generator().manual_seed(seed)
    cand = below_mean(losses[:n], measured[:n], gen).tolist()
    def batch_sizes(k):
        sizes = [len(range(k)[i:i + bs]) for i in range(0, k, bs)]
        return [s for s in sizes if s == bs] if drop_last else sizes
    k = n - round_half_up(prune_ratio * len(cand))
    mine = len(batch_sizes(k))
    target = mine if agreed is None else agreed
    while len(batch_sizes(k)) < target:
        k += 1
        if k > n: return RuntimeError
    # a partial last batch gets samples up to `min_rows` (a batch size under `min_rows` is no fault of pruning's)
    while not drop_last and k < n and batch_sizes(k) and batch_sizes(k)[-1] < min(bs, min_rows): k += 1
    if k == n: return None
    skipped, kept_cand = cand[:n - k], cand[n - k:]
    order = torch.tensor([i for i in range(n) if i not in skipped])
    if shuffle: order = order[torch.randperm(len(order), generator=gen)]
    weights = [len(cand) / len(kept_cand) if i in kept_cand and skipped and kept_cand else 1. for i in range(n)]
    return order, k, torch.tensor(weights)

def round_half_up(x): return math.floor(x + 0.5)

def test_plan_epoch_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    checked = {'plan': 0, 'none': 0, 'error': 0}
    for trial in range(400):
        n = int(torch.randint(1, 40, (), generator=g)); size = n + int(torch.randint(0, 3, (), generator=g))
        losses = torch.rand(size, generator=g)
        measured = torch.rand(size, generator=g) < 0.8
        bs, drop_last = int(torch.randint(1, 9, (), generator=g)), bool(torch.rand((), generator=g) < 0.3)
        ratio, shuffle = float(torch.rand((), generator=g)) * 0.99, bool(torch.rand((), generator=g) < 0.5)
        min_rows = int(torch.randint(1, 3, (), generator=g))
        agreed = None if trial % 3 == 0 else int(torch.randint(0, n // bs + 3, (), generator=g))
        ref = reference_plan(losses, measured, n, bs, drop_last, ratio, trial, shuffle, min_rows, agreed)
        def run(): return plan_epoch(losses, measured, n, bs, drop_last, ratio, torch.Generator().manual_seed(trial),
                                     shuffle, min_rows, agreed)
        if ref is RuntimeError:
            with pytest.raises(RuntimeError, match='fewer than another'): run()
            checked['error'] += 1
        elif ref is None:
            assert run() is None
            checked['none'] += 1
        else:
            p = run()
            assert p.n_kept == ref[1] and p.order.tolist() == ref[0].tolist()
            close(p.weights, ref[2])
            checked['plan'] += 1
    assert min(checked.values()) > 20, checked

class Plant(Callback):
    "Writes a planted loss table into the pruner's store at the end of epoch 0"
    order = InfoBatchCallback.order + 1
    def __init__(self, losses): self.losses = losses
    def after_train(self):
        if self.epoch == 0: self.learn.info_batch_pruner.store.loss[:] = self.losses

def test_callback_prunes_the_planted_below_mean_samples_with_its_seeded_generator():
    x = digits()[0]
    planted = torch.rand(N, generator=torch.Generator().manual_seed(1))
    rec = TrainedIndices(x)
    learn = learner(cbs=[InfoBatchCallback(0.4, final_phase=0.5, seed=7), Plant(planted), rec])
    learn.fit(2 * 1 + 2, 1e-3)
    # the independent reference: candidates are those below the mean, drawn in the order the seeded generator gives
    sorted_cand = [i for i in range(N) if planted[i] < planted.mean()]
    gen = torch.Generator().manual_seed(7)
    order = torch.tensor(sorted_cand)[torch.randperm(len(sorted_cand), generator=gen)]
    n_pruned = math.floor(0.4 * len(sorted_cand) + 0.5)
    skipped = set(order[:n_pruned].tolist())
    trained = torch.cat(rec.epochs[1])
    assert len(trained) == len(set(trained.tolist())) == N - n_pruned
    assert set(trained.tolist()) == set(range(N)) - skipped
    # epochs 0 (nothing measured) and 2, 3 (the final half) train on every sample once
    for e in (0, 2, 3): assert sorted(torch.cat(rec.epochs[e]).tolist()) == list(range(N))
    assert learn.info_batch_pruner.kept.tolist() == [N, N - n_pruned, N, N]

class GrabPrunedBatch(Callback):
    "Before the first step of epoch 1: the model, batch, dataset indices, `loss_grad` and gradients; then stops"
    order = 100
    def before_batch(self):
        if self.epoch == 1 and self.iter == 0: self.model = copy.deepcopy(self.learn.model)
    def before_train(self):
        if self.epoch == 1: self.store_loss = self.learn.info_batch_pruner.store.loss.clone()
    def before_step(self):
        if self.epoch < 1: return
        self.xb, self.yb = self.learn.xb[0].clone(), self.learn.yb[0].clone()
        self.idx = self.learn.info_batch_pruner.batch_indices(self.iter, len(self.yb))
        self.loss_grad = self.learn.loss_grad.detach().clone()
        self.grads = [p.grad.detach().clone() for p in self.learn.model.parameters()]
        raise CancelFitException()

@pytest.mark.parametrize('loader', ['tfmd', 'tensor'])
def test_pruned_step_matches_a_hand_computed_weighted_loss(loader):
    grab = GrabPrunedBatch()
    learn = learner(loader, cbs=[InfoBatchCallback(0.5, seed=3), grab])
    learn.fit(4, 1e-2)
    # hand-computed weights from the losses stored when epoch 1 started: below-mean samples, half of them skipped
    losses = grab.store_loss[:learn.dls.train.n]
    below = [i for i in range(len(losses)) if losses[i] < losses.mean()]
    n_kept_below = len(below) - math.floor(0.5 * len(below) + 0.5)
    weight = {i: len(below) / n_kept_below for i in below}
    w = torch.tensor([weight.get(i, 1.) for i in grab.idx.tolist()])
    assert (w > 1).any() and (w == 1).any()
    close(w[w > 1], 1 / (1 - 0.5), eps=0.01)  # 1/(1-r), up to the rounding of the skipped count
    model = grab.model
    per_sample = F.cross_entropy(model(grab.xb), grab.yb, reduction='none')
    ref = (per_sample * w).mean()
    close(grab.loss_grad, ref.detach(), eps=1e-5)
    ref.backward()
    for g, p in zip(grab.grads, model.parameters()): close(g, p.grad, eps=1e-5)

# ---------------------------------------------------------------------------------------------------------------
# what stays as plain fastai

@pytest.mark.parametrize('loader', ['tfmd', 'tensor'])
def test_prune_ratio_0_trains_exactly_as_plain_fastai(loader):
    plain = learner(loader)
    plain.fit_one_cycle(3, 1e-2)
    pruned = learner(loader).info_batch(0., seed=0)
    pruned.fit_one_cycle(3, 1e-2)
    a, b = state(plain.model), state(pruned.model)
    for k in a: close(a[k], b[k])
    assert pruned.info_batch_pruner.kept.tolist() == [pruned.dls.train.n] * 3

class LRs(Callback):
    "Each training batch's epoch, position, epoch length, `pct_train` and learning rate"
    order = 100
    def __init__(self): self.rows = []
    def before_batch(self):
        if self.training: self.rows.append((self.epoch, self.iter, self.n_iter, self.pct_train, self.opt.hypers[0]['lr']))
    def after_fit(self): self.end_pct = self.pct_train

def test_one_cycle_schedule_is_plain_fastais_in_shorter_epochs():
    n_epoch, lr = 8, 1e-2
    runs = {}
    for name in ('plain', 'pruned'):
        rec = LRs()
        learn = learner(cbs=rec)
        if name == 'pruned': learn.info_batch(0.5, seed=0)
        learn.fit_one_cycle(n_epoch, lr)
        runs[name] = rec
    plain, pruned = runs['plain'].rows, runs['pruned'].rows
    sched = combined_cos(0.25, lr / 25, lr, lr / 25 / 1e5)  # fit_one_cycle's defaults
    per_epoch = {name: {e: [r for r in rows if r[0] == e] for e in range(n_epoch)} for name, rows in (('plain', plain), ('pruned', pruned))}
    lengths = [len(per_epoch['pruned'][e]) for e in range(n_epoch)]
    assert lengths[0] == lengths[-1] == math.ceil(N / 64) and min(lengths) < math.ceil(N / 64) * 0.85, lengths
    for e in range(n_epoch):
        p, q = per_epoch['plain'][e], per_epoch['pruned'][e]
        # each epoch starts at the same point of the schedule, with the same LR, and covers 1/n_epoch of it
        close(q[0][3], e / n_epoch); close(q[0][4], p[0][4])
        close(q[-1][3] + 1 / (q[-1][2] * n_epoch), (e + 1) / n_epoch)
        # every batch's LR is the one-cycle LR at its fraction of training, as in plain fastai
        for rows in (p, q):
            for _, i, n_iter, pct, lr_ in rows:
                close(pct, e / n_epoch + i / (n_iter * n_epoch)); close(lr_, sched(pct))
    # the last epoch is the full final phase: the same batches at the same LRs, down to the end of training
    for a, b in zip(per_epoch['plain'][n_epoch - 1], per_epoch['pruned'][n_epoch - 1]): close(a[3:], b[3:])
    close(plain[-1][4], pruned[-1][4]); close(runs['plain'].end_pct, 1.); close(runs['pruned'].end_pct, 1.)

class Interrupt(Callback):
    "Cancels the fit, or raises, at the second batch of epoch 1 (a pruned epoch)"
    def __init__(self, exc): self.exc = exc
    def after_batch(self):
        if self.training and self.epoch == 1 and self.iter == 1: raise self.exc

@pytest.mark.parametrize('how', ['done', 'cancelled', 'raised'])
def test_loss_func_and_train_loader_unchanged(how):
    learn = learner().info_batch(0.5, seed=0)
    loss_func, train = learn.loss_func, learn.dls.train
    before = dict(n=train.n, len=len(train), bs=train.bs, shuffle=train.shuffle, attrs=set(vars(train)) - {'_DataLoader__idxs'})
    if how == 'raised':
        with pytest.raises(ZeroDivisionError): learn.fit(3, 1e-2, cbs=Interrupt(ZeroDivisionError('boom')))
    else: learn.fit(3, 1e-2, cbs=Interrupt(CancelFitException()) if how == 'cancelled' else None)
    assert learn.loss_func is loss_func and learn.dls.train is train
    assert dict(n=train.n, len=len(train), bs=train.bs, shuffle=train.shuffle, attrs=set(vars(train)) - {'_DataLoader__idxs'}) == before
    assert 'get_idxs' not in vars(train)
    # fastai clears `learn.dl` at the end of a fit, cancelled or not; an exception skips that, and leaves the loader of
    # the epoch that raised (plain fastai leaves `dls.train` there): here the pruned copy, which the next fit replaces
    if how == 'raised': assert learn.dl is not train and learn.dl.dataset is train.dataset and len(learn.dl) < len(train)
    else: assert learn.dl is None
    if how != 'done': assert learn.info_batch_pruner.kept[1] < N  # it was in a pruned epoch
    # a later fit prunes again from a fresh store: its first epoch is full
    learn.fit(2, 1e-2)
    assert learn.info_batch_pruner.kept.tolist()[0] == N

def test_export_keeps_settings_not_run_state(tmp_path):
    sizes = []
    for times in (1, 4):
        xt, yt, xv, yv = digits()
        learn = learner(data=(xt.repeat(times, 1), yt.repeat(times), xv, yv)).info_batch(0.3, 0.25, seed=5)
        learn.fit(2, 1e-2)
        cb = learn.info_batch_pruner
        learn.export(tmp_path/'with.pkl')
        assert cb.store is not None and len(cb.kept) == 2  # the export leaves the live callback alone
        learn.remove_cb(cb)
        learn.export(tmp_path/'without.pkl')
        sizes.append((tmp_path/'with.pkl').stat().st_size - (tmp_path/'without.pkl').stat().st_size)
        loaded = load_learner(tmp_path/'with.pkl').info_batch_pruner
        assert (loaded.prune_ratio, loaded.final_phase, loaded.seed) == (0.3, 0.25, 5)
        assert loaded.store is None and loaded.generator is None and loaded.weights is None and len(loaded.kept) == 0
    assert all(0 < s < 1536 for s in sizes), sizes

# ---------------------------------------------------------------------------------------------------------------
# loaders, models and other callbacks

@pytest.mark.parametrize('loader', ['tfmd', 'tensor'])
def test_pruned_epochs_train_each_kept_sample_once_on_both_loaders(loader):
    rec = TrainedIndices(digits()[0])
    learn = learner(loader, cbs=rec).info_batch(0.5, final_phase=0.25, seed=0)
    learn.fit(4, 1e-2)
    n = learn.dls.train.n
    kept = learn.info_batch_pruner.kept.tolist()
    assert kept[0] == kept[3] == n and kept[1] < n and kept[2] < n
    for e, batches in enumerate(rec.epochs):
        idx = torch.cat(batches).tolist()
        assert len(idx) == len(set(idx)) == kept[e] and max(idx) < n
    close(learn.info_batch_pruner.pruned_share, 1 - torch.tensor(kept, dtype=torch.float) / n)
    # the pruned epochs are shuffled: their order is not the sorted kept set
    assert torch.cat(rec.epochs[1]).tolist() != sorted(torch.cat(rec.epochs[1]).tolist())

def test_no_batch_of_one_with_batchnorm(monkeypatch):
    # force a kept count that leaves one sample in the last batch: 1408 = 22 * 64, so keep 1409
    monkeypatch.setattr(pruning, 'pruned_count', lambda n, r: min(n, N - 1409))
    learn = learner(model_fn=mlp_bn).info_batch(0.5, seed=0)
    learn.fit(3, 1e-2)
    assert learn.info_batch_pruner.kept.tolist() == [N, 1410, N]
    learn = learner(model_fn=mlp).info_batch(0.5, seed=0)
    learn.fit(3, 1e-2)
    assert learn.info_batch_pruner.kept.tolist() == [N, 1409, N]

def test_same_seed_same_epochs_other_seed_other_epochs():
    def kept_sets(seed):
        rec = TrainedIndices(digits()[0])
        learner(cbs=rec).info_batch(0.5, seed=seed).fit(3, 1e-2)
        return sorted(torch.cat(rec.epochs[1]).tolist())
    assert kept_sets(1) == kept_sets(1) != kept_sets(2)

def test_refused_with_a_hard_miner_a_weighted_loader_or_a_loss_without_reduction():
    learn = learner(cbs=TopKCallback(16)).info_batch()
    with pytest.raises(ValueError, match='cannot be combined with a hard-mining callback'): learn.fit(1)
    learn = learner().info_batch()
    learn.dls.train = learn.dls.train.new(cls=WeightedDL, wgts=torch.ones(N))
    with pytest.raises(TypeError, match='draws its own'): learn.fit(1)
    learn = learner().info_batch()
    learn.loss_func = lambda pred, y: F.cross_entropy(pred, y)
    with pytest.raises(TypeError, match=r'per_sample_loss_func.*learn.info_batch\(per_sample_loss_func=f\)'): learn.fit(1)
    # ... which `per_sample_loss_func` fixes
    learn = learner().info_batch(per_sample_loss_func=lambda pred, y: F.cross_entropy(pred, y, reduction='none'))
    learn.loss_func = lambda pred, y: F.cross_entropy(pred, y)
    learn.fit(3)
    assert learn.info_batch_pruner.kept[1] < N

@pytest.mark.parametrize('kwargs, msg', [(dict(prune_ratio=-0.1), '`prune_ratio` must be a number in [0, 1)'),
                                         (dict(prune_ratio=1.), '`prune_ratio` must be a number in [0, 1)'),
                                         (dict(prune_ratio=True), '`prune_ratio`'),
                                         (dict(final_phase=-1), '`final_phase` must be a number in [0, 1]'),
                                         (dict(seed='0'), '`seed` must be an int or None')])
def test_bad_arguments_raise_at_construction(kwargs, msg):
    with pytest.raises(ValueError) as e: InfoBatchCallback(**kwargs)
    assert msg in str(e.value)
    with pytest.raises(ValueError): learner().info_batch(**kwargs)

def test_one_pruner_per_learner_and_lr_find_is_left_alone():
    learn = learner().info_batch(0.3).info_batch(0.6)
    pruners = [cb for cb in learn.cbs if isinstance(cb, InfoBatchCallback)]
    assert len(pruners) == 1 and pruners[0].prune_ratio == 0.6 and learn.info_batch_pruner is pruners[0]
    learn.lr_find(num_it=20, show_plot=False)
    assert len(learn.info_batch_pruner.kept) == 0 and learn.info_batch_pruner.store is None

def test_with_mixup_and_gradient_accumulation():
    steps = []
    class CountSteps(Callback):
        def after_step(self): steps[-1] += 1
        def before_train(self): steps.append(0)
    learn = learner(cbs=[MixUp(0.4), GradientAccumulation(256), CountSteps()]).info_batch(0.5, seed=0)
    loss_func = learn.loss_func
    learn.fit(3, 1e-2)
    kept = learn.info_batch_pruner.kept.tolist()
    assert kept[1] < N and learn.loss_func is loss_func
    # one step per 256 loader samples, as fastai's accumulation counts them: fewer in the pruned epoch
    assert steps[1] < steps[0] and abs(steps[1] - kept[1] / 256) <= 1
