"`fill_batch=True` never trains more than the loader's batch size in one step; kept samples that do not fit wait, into the next epoch if need be."
import pytest
import torch
from fastai.callback.core import Callback
from fastai_hardmine.core import batch_size
from fastai_hardmine.callback import SelectiveBackpropCallback
from test_subset import tabular_learner, two_target_loss, one_thread  # noqa: F401 (fixture)

BS, N, EPOCHS = 32, 200, 3

class Steps(Callback):
    "Per training step, what fastai's forward trains on: (epoch, its dataset ids); and the store's counts at each epoch's end"
    order, run_valid = 60, False
    def __init__(self): self.steps, self.epoch_counts = [], []
    def after_pred(self):
        assert batch_size(self.learn.yb) == len(self.learn.xb[0])
        self.steps.append((self.epoch, self.learn.xb[0][:, 0].clone()))
    def after_train(self):
        store = self.learn.hard_miner.store
        self.epoch_counts.append((store.times_kept.clone(), store.times_trained.clone()))

# settings under which the old queue trained up to ~1.6x the loader's batch size in one step: a plain batch in the
# middle of an epoch (`interrupt`, `start`/`end` inside an epoch) took every waiting sample, and so did an epoch's
# last batch (`beta=0.3` keeps many: queue and last batch together exceed `bs`)
CASES = {
    'interrupt=2': (dict(interrupt=2), False),
    'interrupt=2 drop_last': (dict(interrupt=2), True),
    'start=0.2 end=0.7': (dict(start=0.2, end=0.7), False),
    'start=0.3 drop_last': (dict(start=0.3), True),
    'end=0.6 drop_last': (dict(end=0.6), True),
    'last batch': (dict(beta=0.3), True),
}

def fit(kwargs, drop_last):
    kw = dict(beta=1, seed=0, fill_batch=True, track_samples=True,
              per_sample_loss_func=lambda p, ya, yb: two_target_loss(p, ya, yb, 'none'))
    cb = SelectiveBackpropCallback(**{**kw, **kwargs})
    learn = tabular_learner(cb, bs=BS, drop_last=drop_last, n=N)
    steps = Steps()
    learn.fit(EPOCHS, 1e-3, cbs=steps)
    return cb, steps

@pytest.mark.parametrize('case', CASES)
def test_no_step_above_the_loaders_batch_size(case):
    cb, steps = fit(*CASES[case])
    sizes = [len(ids) for _, ids in steps.steps]
    assert max(sizes) <= BS, f"steps of {[s for s in sizes if s > BS]} samples, above bs={BS}"
    # the records count what trained, step by step
    assert [t for t in cb.trained.tolist() if t] == sizes
    assert cb.trained.sum() == cb.store.times_trained.sum()

@pytest.mark.parametrize('case', CASES)
def test_every_kept_sample_trains_once_or_waits_for_a_later_step(case):
    "Per epoch and sample: trained = kept + carried in - carried out, with fewer than bs carried; the fit's last leftovers never train"
    cb, steps = fit(*CASES[case])
    carried = torch.zeros(N, dtype=torch.long)
    kept0, trained0 = torch.zeros(N, dtype=torch.long), torch.zeros(N, dtype=torch.long)
    for e, (kept1, trained1) in enumerate(steps.epoch_counts):
        seen = torch.zeros(N, dtype=torch.long)
        for ep, ids in steps.steps:
            if ep == e: seen.index_add_(0, ids, torch.ones_like(ids))
        # what fastai's forward trained on is what the store counts as trained
        assert torch.equal(seen, trained1 - trained0)
        carried = carried + (kept1 - kept0) - (trained1 - trained0)
        # never trained more often than kept; what waits at the epoch's end is less than one batch
        assert (carried >= 0).all() and carried.sum() < BS
        kept0, trained0 = kept1, trained1
    # the samples still waiting when the fit ends are the only ones kept and not trained
    assert torch.equal(cb.store.times_kept - cb.store.times_trained, carried)
    assert cb.kept.sum() - cb.trained.sum() == carried.sum()

def test_waiting_samples_carry_into_the_next_epochs_first_step():
    "The epoch's last batch trains one full batch; the rest train first in the next epoch, in the order they were kept"
    cb, steps = fit(*CASES['last batch'])
    n_iter = N // BS
    assert len(cb.trained) == EPOCHS * n_iter
    carried_any = False
    for e in range(EPOCHS - 1):
        kept1, trained1 = steps.epoch_counts[e]
        left = (kept1 - trained1).nonzero().flatten()
        if not len(left): continue
        carried_any = True
        assert cb.trained[(e + 1) * n_iter - 1] == BS
        first = next(ids for ep, ids in steps.steps if ep == e + 1)
        assert sorted(first[:len(left)].tolist()) == left.tolist()
    assert carried_any
