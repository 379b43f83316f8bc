"RHO-LOSS: the model's gradient on what the reducible loss keeps, the held-out split, the Learner left as it was, other rules and MixUp."
import copy, warnings
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from fastai.torch_core import set_seed
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patch Learner)
from fastai.callback.mixup import MixUp
from fastai.distributed import DistributedDL
from fastai_hardmine.callback import TopKCallback, SelectiveBackpropCallback, BatchLossFilterCallback
from fastai_hardmine.core import select_top_k
from fastai_hardmine.data import digits_data, tensor_dls
from fastai_hardmine.rho_loss import Reference, HeldOutWarning, held_out_split
from test_subset import StopBeforeStep, full_first_batch, CpuAutocast, one_thread  # noqa: F401 (one_thread: the autouse fixture)
from test_state import CancelAt, RaiseAt, Boom

X, Y, XV, YV = digits_data()

def learner(cbs=None, seed=0, bs=128):
    set_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.BatchNorm1d(96), nn.ReLU(), nn.Linear(96, 10))
    return Learner(tensor_dls(X, Y, XV, YV, bs=bs), model, CrossEntropyLossFlat(), cbs=cbs, metrics=accuracy)

def trained_reference(seed=1):
    "A small model trained on the validation images: the reference of a user who holds out data"
    torch.manual_seed(seed)
    ref = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(ref.parameters(), 1e-2)
    for _ in range(30):
        opt.zero_grad(); F.cross_entropy(ref(XV), YV).backward(); opt.step()
    return ref.eval()

def test_gradient_equals_plain_pytorch_on_the_highest_reducible_losses():
    (xb,), (yb,) = full_first_batch(learner())
    ref_model = trained_reference()
    valid = tensor_dls(X, Y, XV, YV, bs=128).valid
    learn = learner(cbs=TopKCallback(24, scorer=Reference(model=ref_model, dl=valid, epochs=0)))
    twin, stop = copy.deepcopy(learn.model).train(), StopBeforeStep()
    learn.fit(1, 1e-2, cbs=stop)
    # independent reference: the model's train-mode no-grad losses minus the reference's eval-mode losses
    with torch.no_grad():
        reducible = F.cross_entropy(copy.deepcopy(twin)(xb), yb, reduction='none') - F.cross_entropy(ref_model(xb), yb, reduction='none')
    idx = select_top_k(reducible, 24)
    assert torch.equal(stop.batch[0][0], xb[idx]) and torch.equal(stop.batch[1][0], yb[idx])
    F.cross_entropy(twin(xb[idx]), yb[idx]).backward()
    for g, p in zip(stop.grads, twin.parameters()): torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)

def test_a_user_loader_holds_nothing_out_and_warns_about_overlap():
    valid = tensor_dls(X, Y, XV, YV, bs=128).valid
    learn = learner(cbs=TopKCallback(0.5, scorer=Reference(dl=valid, epochs=1)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        learn.fit(1, 1e-2)
    assert not [w for w in caught if issubclass(w.category, HeldOutWarning) or 'same inputs' in str(w.message)]
    # a held-out loader over the training images themselves: every training sample overlaps
    train_copy = tensor_dls(X[:300], Y[:300], XV, YV, bs=64).train
    learn = learner(cbs=TopKCallback(0.5, scorer=Reference(dl=train_copy, epochs=1)))
    with pytest.warns(UserWarning, match=r'300 of the \d+ training samples have the same inputs'): learn.fit(1, 1e-2)

@pytest.mark.parametrize('scenario', ['normal', 'cancel', 'error'])
def test_the_learners_loaders_are_left_as_they_were(scenario):
    learn = learner()
    learn.rho_loss(0.3)
    train = learn.dls.train
    before = len(train), train.n, 'get_idxs' in vars(train)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', HeldOutWarning)
        if scenario == 'normal': learn.fit(2, 1e-2)
        elif scenario == 'cancel': learn.fit(2, 1e-2, cbs=CancelAt())
        else:
            with pytest.raises(Boom): learn.fit(2, 1e-2, cbs=RaiseAt())
    assert learn.dls.train is train and (len(train), train.n, 'get_idxs' in vars(train)) == before

def test_every_epoch_draws_only_the_kept_samples_and_the_schedule_counts_their_batches():
    learn = learner()
    learn.rho_loss(0.3, reference=Reference(holdout=0.25, seed=3, epochs=1))
    drawn, n_iters = set(), []
    from fastai.callback.core import Callback
    class Watch(Callback):
        order = 100
        def before_train(self): n_iters.append(None)
        def after_batch(self):
            if self.training:
                drawn.update(self.learn.dl._DataLoader__idxs); n_iters[-1] = self.learn.n_iter
    with pytest.warns(HeldOutWarning, match='holds out 360'): learn.fit_one_cycle(3, 1e-2, cbs=Watch())
    _, kept = held_out_split(len(X), 0.25, 3)
    assert drawn == set(kept.tolist())
    assert n_iters == [-(-len(kept) // 128)] * 3
    # one-cycle ran to its end over the shortened epochs
    assert learn.recorder.lrs[-1] < 1e-4

@pytest.mark.parametrize('make', [lambda s: SelectiveBackpropCallback(1., seed=0, scorer=s),
                                  lambda s: BatchLossFilterCallback(0.5, scorer=s)])
def test_other_rules_with_mixup_and_autocast_train_on_reducible_losses(make):
    learn = learner(cbs=[CpuAutocast(), MixUp(0.4), make(Reference(epochs=1))])
    with pytest.warns(HeldOutWarning): learn.fit(2, 1e-2)
    kept = learn.hard_miner.records.epoch_kept_share()
    assert 0 < kept < 1 and torch.isfinite(torch.tensor(learn.recorder.values[-1])).all()
    ref = learn.hard_miner.store.column('reference_loss')
    _, trained = held_out_split(len(X), 0.1, 0)
    assert (ref[trained] > 0).all()

def test_a_distributed_loader_needs_a_held_out_loader():
    learn = learner(cbs=TopKCallback(0.5, scorer=Reference()))
    learn.dls.train = DistributedDL(learn.dls.train, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r'pass `Reference\(dl=...\)`'): learn.fit(1)
