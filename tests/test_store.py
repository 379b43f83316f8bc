"The per-sample store and fill queue on their own and inside a fit: sizing, counters, reuse of losses, queue order."
import math
import pytest
import torch
from fastai_hardmine.store import SampleStore, NEVER
from fastai_hardmine.fill_queue import FillQueue
from fastai_hardmine.records import MiningRecords, BatchSelection
from fastai_hardmine.counting import NoCounts
from fastai_hardmine.fitting import min_train_rows
from fastai_hardmine.callback import SelectiveBackpropCallback
from test_callback import make_learner, digits, mlp_bn, Recording
from test_subset import tabular_learner, two_target_loss, TrainedBatches, one_thread  # noqa: F401 (fixture)

# ---------------------------------------------------------------------------------------------------------------
# SampleStore against a slow reference

def reference_losses(table, idx, epoch, max_age, fresh_losses, min_scored=1):
    "Dict-based reference of `SampleStore.losses`: table maps index -> (loss, epoch)"
    stale = [p for p, i in enumerate(idx) if i not in table or table[i][1] < epoch - max_age]
    if stale and (len(stale) >= len(idx) or len(stale) < min_scored): stale = list(range(len(idx)))
    for p in stale: table[idx[p]] = (fresh_losses[p], epoch)
    return [table[i][0] for i in idx], stale

@pytest.mark.parametrize('max_age, min_scored', [(0, 1), (1, 1), (2, 1), (1, 3)])
def test_store_losses_match_reference(max_age, min_scored):
    g = torch.Generator().manual_seed(0)
    store, table = SampleStore(50), {}
    for epoch in range(6):
        for _ in range(4):
            idx = torch.randperm(50, generator=g)[:12]
            fresh = torch.rand(12, generator=g)
            asked = []
            def score(pos):
                asked.append(pos)
                return fresh if pos is None else fresh[pos]
            got, scored = store.losses(idx, epoch, max_age, score, min_scored)
            want, want_scored = reference_losses(table, idx.tolist(), epoch, max_age, fresh.tolist(), min_scored)
            assert got.tolist() == pytest.approx(want) and scored.tolist() == want_scored
            assert len(asked) == (1 if want_scored else 0)
    assert (store.measured_at[list(table)] >= 0).all() and (store.measured_at == NEVER).sum() == 50 - len(table)

def test_store_bad_size():
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match='`size` must be an int >= 0'): SampleStore(bad)

# ---------------------------------------------------------------------------------------------------------------
# the store inside a fit

class RecordIds(Recording, SelectiveBackpropCallback):
    "Selective-Backprop recording the ids (column 0 of the input) of each loader batch and of the samples it keeps"
    def select(self, losses):
        idx = super().select(losses)
        ids = self.xb[0][:, 0]
        self.log.append((ids.clone(), ids[idx].clone()))
        return idx
    def reset(self):
        super().reset()
        self.log = []

@pytest.mark.parametrize('fill_batch', [False, True])
@pytest.mark.parametrize('drop_last', [False, True])
def test_store_counts_follow_the_samples(fill_batch, drop_last):
    "times_scored/kept/trained of each dataset index equal what the test sees the fit do with that sample"
    n, bs, epochs = 200, 32, 4
    # exact kept counts (no shape buckets), so that the kept samples are those `select` returns
    cb = RecordIds(beta=1, seed=0, staleness=1, fill_batch=fill_batch, buckets=0,
                   per_sample_loss_func=lambda p, ya, yb: two_target_loss(p, ya, yb, 'none'))
    learn = tabular_learner(cb, bs=bs, drop_last=drop_last, n=n)
    class TrainedWhen(TrainedBatches):
        "Also the epoch each step trained in: with `fill_batch`, samples kept at an epoch's end may train in the next"
        def after_pred(self): super().after_pred(); self.epochs.append(self.epoch)
    trained = TrainedWhen()
    trained.epochs = []
    learn.fit(epochs, 1e-3, cbs=trained)
    store = cb.store
    assert len(store) == n and store.device == torch.device('cpu')
    kept = torch.zeros(n, dtype=torch.long)
    for _, k in cb.log: kept.index_add_(0, k, torch.ones_like(k))
    done = torch.zeros(n, dtype=torch.long)
    for (cat, _), _ in trained.batches: done.index_add_(0, cat[:, 0], torch.ones_like(cat[:, 0]))
    assert torch.equal(store.times_kept, kept) and torch.equal(store.times_trained, done)
    assert store.times_scored.sum() == cb.scored.sum() and store.times_kept.sum() == cb.kept.sum()
    assert store.times_trained.sum() == cb.trained.sum()
    seen = torch.zeros(n, dtype=torch.long)
    for ids, _ in cb.log: seen.index_add_(0, ids, torch.ones_like(ids))
    if drop_last: assert (seen < epochs).any()
    else: assert (seen == epochs).all()
    # staleness=1: a sample is scored when its last loss (scored, or from its training forward, in the epoch that step
    # trained) is over one epoch old; a batch with fewer such samples than the model can take (2, with BatchNorm) is
    # scored whole
    n_batches = len(cb.log) // epochs
    steps = iter(zip(trained.batches, trained.epochs))
    last, expected = {}, torch.zeros(n, dtype=torch.long)
    for b, (ids, kept_ids) in enumerate(cb.log):
        e = b // n_batches
        stale = [i for i in ids.tolist() if i not in last or last[i] < e - 1]
        if 0 < len(stale) < min_train_rows(cb.learn.model): stale = ids.tolist()
        for i in stale: expected[i] += 1; last[i] = e
        if cb.trained[b] > 0:
            ((cat, _), _), trained_epoch = next(steps)
            for i in cat[:, 0].tolist(): last[i] = trained_epoch
    assert torch.equal(store.times_scored, expected)
    assert (store.times_scored < epochs // 2).any()  # the free losses spared some scoring

def test_store_sized_once_per_fit_from_the_data_set():
    cb = SelectiveBackpropCallback(2, seed=0, staleness=1)
    learn = make_learner(cbs=cb, model_fn=mlp_bn)
    stores = []
    from fastai.callback.core import Callback
    class Watch(Callback):
        order = 100
        def after_epoch(self): stores.append(self.learn.hard_miner.store)
    learn.fit(3, 1e-2, cbs=Watch())
    assert len(stores) == 3 and all(s is stores[0] for s in stores) and len(stores[0]) == len(digits()[0])
    learn.fit(1, 1e-2, cbs=Watch())
    # a new fit starts a new store
    assert stores[-1] is not stores[0] and stores[-1].times_scored.sum() == cb.scored.sum()

def test_no_store_without_an_option_that_needs_it():
    learn = make_learner(cbs=SelectiveBackpropCallback(2, seed=0))
    learn.fit(1, 1e-2)
    assert learn.hard_miner.store is None and isinstance(learn.hard_miner.batch_step.counts, NoCounts)

# ---------------------------------------------------------------------------------------------------------------
# FillQueue against a slow reference

@pytest.mark.parametrize('bs', [1, 4, 7])
def test_fill_queue_matches_reference(bs):
    "Whatever the kept counts, the queue trains every sample once, in order, in full batches but the last"
    g = torch.Generator().manual_seed(bs)
    counts = torch.randint(0, 9, (40,), generator=g).tolist()
    q, waiting, start, out, ref = FillQueue(), [], 0, [], []
    for j, c in enumerate(counts):
        ids = torch.arange(start, start + c)
        start += c
        last = j == len(counts) - 1
        q.push((ids.float(), {'y': ids * 2}))
        if q.ready(bs, last): out.append(q.pop(bs, last))
        # reference: a flat list
        waiting += ids.tolist()
        if len(waiting) >= bs or (last and waiting):
            take = len(waiting) if last else bs
            ref.append(waiting[:take]); waiting = waiting[take:]
    assert [o[0].long().tolist() for o in out] == ref
    assert all(torch.equal(o[1]['y'], o[0].long() * 2) for o in out)
    assert sum(ref, []) == list(range(start)) and len(q) == 0

def test_records_shares_survive_epochs():
    rec = MiningRecords()
    for e in range(3):
        for b in range(4): rec.add(BatchSelection(8, torch.arange(b + 1), torch.arange(8.), 8), trained=b + 1)
        rec.end_epoch()
    expected = [sum(range(b + 1)) / 28 for b in range(4)] * 3
    assert rec.kept_loss_share.tolist() == pytest.approx(expected)
    assert math.isclose(rec.mean_kept_share(), 30 / 96)
