"fastai's GradientAccumulation with a miner: the plain cadence (every n_acc loader samples) and the loader-size weighting."
import copy
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.training import GradientAccumulation
from fastai_hardmine.callback import TopKCallback, BatchLossFilterCallback, SelectiveBackpropCallback
from fastai_hardmine.core import select_top_k
from test_callback import make_learner, digits
from test_subset import one_thread  # noqa: F401 (fixture)

class Steps(Callback):
    "Counts optimizer steps per epoch, and whether any gradient is left when an epoch ends"
    order, run_valid = 100, False
    def before_fit(self): self.per_epoch, self.left = [], []
    def before_epoch(self): self.per_epoch.append(0)
    def after_step(self): self.per_epoch[-1] += 1
    def after_train(self):
        self.left.append(any(p.grad is not None and p.grad.abs().sum() > 0 for p in self.learn.model.parameters()))

def data(n):
    xt, yt, xv, yv = digits()
    return xt[:n], yt[:n], xv, yv

MINERS = {
    'top_k subset': lambda: TopKCallback(16), 'top_k mask': lambda: TopKCallback(16, mode='mask'),
    'loss_filter subset': lambda: BatchLossFilterCallback(0.5),
    'selective subset': lambda: SelectiveBackpropCallback(2, seed=0),
    'selective fill_batch': lambda: SelectiveBackpropCallback(2, seed=0, fill_batch=True),
    'selective staleness': lambda: SelectiveBackpropCallback(2, seed=0, staleness=1),
}

@pytest.mark.parametrize('name', MINERS)
@pytest.mark.parametrize('n, n_acc', [(1280, 256), (1280, 320), (1300, 256)])
def test_steps_at_the_plain_cadence(name, n, n_acc):
    "As many optimizer steps per epoch as plain fastai, and nothing half-accumulated left where plain leaves nothing"
    def run(cbs):
        steps = Steps()
        learn = make_learner(cbs=cbs, data=data(n), shuffle=False)
        learn.fit(3, 1e-2, cbs=[GradientAccumulation(n_acc), steps])
        return steps
    miner = MINERS[name]()
    plain, mined = run(None), run(miner)
    if miner.fill_batch:
        # a step can only come with a trained batch: one at each trained batch with a plain step point since the last one
        expected, count, due, nb = [0, 0, 0], 0, False, len(miner.batch_sizes) // 3
        for i, (size, trained) in enumerate(zip(miner.batch_sizes.tolist(), miner.trained.tolist())):
            count += size
            if count >= n_acc: count, due = 0, True
            if trained and due: expected[i // nb], due = expected[i // nb] + 1, False
        assert mined.per_epoch == expected and sum(expected) <= sum(plain.per_epoch)
        # a step that comes late can only empty what plain fastai leaves half-accumulated, never leave more
        assert all(p or not m for m, p in zip(mined.left, plain.left))
    else: assert mined.per_epoch == plain.per_epoch and mined.left == plain.left
    if n % n_acc == 0: assert not any(mined.left) and (miner.fill_batch or mined.per_epoch == [n // n_acc] * 3)

class FirstStep(Callback):
    "Gradients at the first optimizer step that GradientAccumulation lets through"
    order, run_valid = 100, False
    def before_step(self):
        self.grads = [p.grad.detach().clone() for p in self.learn.model.parameters()]
        raise CancelFitException()

@pytest.mark.parametrize('mode', ['subset', 'mask'])
def test_accumulated_gradient_equals_plain_pytorch(mode):
    "Two loader batches of 64 with n_acc=128: (64/128) * grad(mean over batch 1's kept) + (64/128) * grad(batch 2's)"
    learn = make_learner(cbs=TopKCallback(16, mode=mode), data=data(640), shuffle=False)
    ref = copy.deepcopy(learn.model).train()
    first = FirstStep()
    learn.fit(1, 1e-2, cbs=[GradientAccumulation(128), first])
    xt, yt = data(640)[:2]
    for b in range(2):
        x, y = xt[b * 64:(b + 1) * 64], yt[b * 64:(b + 1) * 64]
        losses = F.cross_entropy(ref(x), y, reduction='none')
        idx = select_top_k(losses.detach(), 16)
        (losses[idx].mean() * 64 / 128).backward()
    for g, p in zip(first.grads, ref.parameters()): torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)

def test_without_accumulation_the_step_is_the_kept_mean():
    "No GradientAccumulation: nothing is rescaled (the step's gradient is the mean over the kept samples)"
    learn = make_learner(cbs=TopKCallback(16), data=data(640), shuffle=False)
    ref = copy.deepcopy(learn.model).train()
    first = FirstStep()
    learn.fit(1, 1e-2, cbs=first)
    x, y = data(640)[0][:64], data(640)[1][:64]
    losses = F.cross_entropy(ref(x), y, reduction='none')
    losses[select_top_k(losses.detach(), 16)].mean().backward()
    for g, p in zip(first.grads, ref.parameters()): torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
