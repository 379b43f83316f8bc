"The proxy scorer: the model's gradient on what the proxy chose, the proxy's own training, image inputs, validation, export."
import copy, pickle, warnings
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from fastai.torch_core import set_seed
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patch Learner)
from fastai.callback.core import Callback, CancelFitException
from fastai.vision.learner import vision_learner  # noqa: F401 (fastai's vision imports)
from fastai.callback.fp16 import MixedPrecision
from fastai_hardmine.callback import TopKCallback, SelectiveBackpropCallback
from fastai_hardmine.core import select_top_k
from fastai_hardmine.data import digits_data, tensor_dls, digits_image_dls
from fastai_hardmine.proxy import Proxy, ProxyScorer, mlp_proxy, cnn_proxy
from test_subset import StopBeforeStep, one_thread  # noqa: F401 (one_thread: the autouse fixture)

X, Y, XV, YV = digits_data()

def learner(cbs=None, bn=True, seed=0, bs=128):
    set_seed(seed)
    layers = [nn.Linear(64, 96)] + [nn.BatchNorm1d(96)] * bn + [nn.ReLU(), nn.Linear(96, 10)]
    return Learner(tensor_dls(X, Y, XV, YV, bs=bs), nn.Sequential(*layers), CrossEntropyLossFlat(), cbs=cbs, metrics=accuracy)

class ProxyBefore(Callback):
    "The proxy as it is before the first training batch (before the miner scores it)"
    order, run_valid = -100, False
    def before_batch(self):
        if self.iter == 0: self.proxy = copy.deepcopy(self.learn.hard_miner.batch_step.scorer.model)

class FirstBatch(Callback):
    order = -100
    def before_batch(self):
        self.b = self.learn.xb, self.learn.yb
        raise CancelFitException()

@pytest.mark.parametrize('pretrain', [0, 1])
def test_gradient_equals_plain_pytorch_on_what_the_proxy_keeps(pretrain):
    first = FirstBatch()
    learner().fit(1, cbs=first)
    (xb,), (yb,) = first.b
    learn = learner(cbs=TopKCallback(32, scorer=Proxy(model=lambda: mlp_proxy(64, 10, 24), pretrain_epochs=pretrain, seed=0)))
    ref = copy.deepcopy(learn.model).train()
    stop, before = StopBeforeStep(), ProxyBefore()
    learn.fit(1, 1e-2, cbs=[stop, before])
    # independent reference: the proxy as it was before the batch ranks it in train mode, the model trains the top 32
    proxy = before.proxy.train()
    with torch.no_grad(): scores = F.cross_entropy(proxy(xb), yb, reduction='none')
    idx = select_top_k(scores, 32)
    assert torch.equal(stop.batch[0][0], xb[idx]) and torch.equal(stop.batch[1][0], yb[idx])
    F.cross_entropy(ref(xb[idx]), yb[idx]).backward()
    for g, p in zip(stop.grads, ref.parameters()): torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)

def test_first_pass_trains_the_proxy_once_per_epoch_on_every_sample():
    seen = []
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp_proxy(64, 10, 8)
        def forward(self, x):
            if self.training and torch.is_grad_enabled(): seen.append(len(x))
            return self.net(x)
    learn = learner(cbs=SelectiveBackpropCallback(scorer=Proxy(model=Counting, pretrain_epochs=2, seed=0), seed=0))
    learn.fit(1)
    n, n_batches = len(X), len(learn.dls.train)
    # two first passes over every sample, then one training forward per loaded batch (drop_last drops the rest)
    assert sum(seen[:-n_batches]) == 2 * n
    assert seen[-n_batches:] == [128] * (n // 128) + [n % 128]

def test_proxy_never_sees_validation_or_predictions():
    calls = []
    class Watching(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp_proxy(64, 10, 8)
        def forward(self, x):
            calls.append(torch.is_grad_enabled())
            return self.net(x)
    learn = learner(cbs=TopKCallback(0.5, scorer=Proxy(model=Watching, pretrain_epochs=0)))
    learn.fit(1)
    trained = len(calls)
    learn.validate(); learn.get_preds()
    assert len(calls) == trained

def test_fit_restores_the_learners_state_and_exports_settings_only(tmp_path):
    learn = learner(cbs=SelectiveBackpropCallback(scorer=Proxy(seed=0), seed=0))
    loss_func, model = learn.loss_func, learn.model
    learn.fit_one_cycle(2, 1e-2)
    assert learn.loss_func is loss_func and learn.model is model
    assert [type(cb).__name__ for cb in learn.cbs].count('SelectiveBackpropCallback') == 1
    cb = pickle.loads(pickle.dumps(learn.hard_miner))
    assert type(cb.scorer) is Proxy and cb.scorer.seed == 0
    assert not any(isinstance(v, (ProxyScorer, nn.Module, torch.optim.Optimizer)) for v in vars(cb).values())
    # what the callback pickles, its Learner aside (and its progress-table columns, which refer to it), is as small as a new callback's: no proxy weights in it
    def pickled(cb): return len(pickle.dumps({k: v for k, v in cb.__getstate__().items() if k not in ('_learn', '_columns')}))
    assert abs(pickled(learn.hard_miner) - pickled(SelectiveBackpropCallback(scorer=Proxy(seed=0), seed=0))) < 200

def test_image_batches_get_a_cnn_proxy_and_train():
    dls = digits_image_dls(bs=64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10))
    learn = Learner(dls, model, CrossEntropyLossFlat(), cbs=SelectiveBackpropCallback(scorer=Proxy(seed=0), seed=0))
    learn.fit(1)
    scorer = learn.hard_miner.batch_step.scorer
    assert isinstance(scorer, ProxyScorer) and isinstance(scorer.model[0], nn.Conv2d) and scorer.model[0].in_channels == 1
    assert 0 < learn.hard_miner.records.epoch_kept_share() < 1

def test_proxy_runs_under_the_fits_autocast():
    dtypes = []
    class Watching(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp_proxy(64, 10, 8)
        def forward(self, x):
            dtypes.append(torch.is_autocast_enabled('cpu'))
            return self.net(x)
    class CpuAutocast(MixedPrecision):
        "fastai's MixedPrecision autocasts on CUDA only: the same callback with a bfloat16 autocast on the CPU"
        def before_fit(self):
            super().before_fit()
            self.autocast = torch.autocast('cpu', dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn = learner(cbs=[CpuAutocast(), TopKCallback(32, scorer=Proxy(model=Watching, pretrain_epochs=1))])
        learn.fit(1)
    # every proxy forward (the first pass and each loaded batch) under the autocast, the shape check aside
    assert dtypes[1:] and all(dtypes[1:])

def test_logged_loss_is_the_models_not_the_proxys():
    logged = []
    class Log(Callback):
        order = 90
        def after_loss(self):
            if self.training: logged.append((self.learn.loss.item(), F.cross_entropy(self.pred, self.yb[0]).item()))
    learn = learner(cbs=[TopKCallback(32, scorer=Proxy(seed=0)), Log()])
    learn.fit(1)
    assert all(abs(a - b) < 1e-5 for a, b in logged)
