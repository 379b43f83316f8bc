"Mistakes a rule can see before training are reported when the fit starts, before any batch trains, with what went wrong and the fix."
import warnings
import pytest
import torch
from torch import nn
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
from fastai_hardmine import callback as _callback  # noqa: F401 (the Learner methods)
from fastai_hardmine import prune as _prune  # noqa: F401 (Learner.info_batch)
from fastai_hardmine.data import digits_data, tensor_dls
from test_subset import one_thread  # noqa: F401 (fixture)

X, Y, XV, YV = digits_data()

class CountBatches(Callback):
    "How many training batches reached fastai's forward"
    order = 100
    def before_fit(self): self.n = 0
    def after_pred(self):
        if self.training: self.n += 1

def make(loss_func=None, bs=64):
    set_seed(0)
    return Learner(tensor_dls(X, Y, XV, YV, bs=bs), nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                   loss_func or CrossEntropyLossFlat(), cbs=CountBatches())

def mean_cross_entropy(pred, targ): return nn.functional.cross_entropy(pred, targ)

@pytest.mark.parametrize('add', [lambda l: l.top_k(0.5), lambda l: l.top_k(0.5, mode='mask'), lambda l: l.batch_loss_filter(),
                                 lambda l: l.selective_backprop(), lambda l: l.info_batch()])
def test_a_loss_with_no_reduction_is_refused_before_any_batch(add):
    learn = add(make(mean_cross_entropy))
    with pytest.raises(TypeError, match='Cannot compute a per-sample loss with mean_cross_entropy'):
        with learn.no_bar(): learn.fit(1)
    assert learn.count_batches.n == 0

def test_a_per_sample_function_that_reduces_says_what_it_returned():
    learn = make().top_k(0.5, per_sample_loss_func=mean_cross_entropy)
    with pytest.raises(TypeError) as e, learn.no_bar(): learn.fit(1)
    msg = str(e.value)
    assert "`per_sample_loss_func` (mean_cross_entropy) returned a tensor of shape () for a batch of 64 samples" in msg
    assert 'expected a tensor of shape (64,)' in msg and 'Pass a function' not in msg

def test_top_k_at_or_above_the_batch_size_warns_once_at_fit_start():
    learn = make(bs=64).top_k(64)
    with warnings.catch_warnings(record=True) as w, learn.no_bar():
        warnings.simplefilter('always')
        learn.fit(2)
    said = [str(x.message) for x in w if 'TopKCallback: k=64' in str(x.message)]
    assert len(said) == 1 and "batch size (64)" in said[0] and 'k=0.5' in said[0]
    # below the batch size, and a share of the batch, say nothing
    for k in (63, 1.):
        learn = make(bs=64).top_k(k)
        with warnings.catch_warnings(record=True) as w, learn.no_bar():
            warnings.simplefilter('always')
            learn.fit(1)
        assert not [x for x in w if 'TopKCallback: k=' in str(x.message)]

def test_score_scale_on_inputs_that_are_not_images_is_refused_at_the_first_batch_even_in_warmup():
    learn = make().top_k(0.5, score_scale=0.5, warmup=2)
    with pytest.raises(ValueError, match=r"`score_scale` resizes image batches .* is \(64, 64\)"), learn.no_bar(): learn.fit(3)
    # refused at the fit's first batch, inside the warmup: no batch reached fastai's forward
    assert learn.count_batches.n == 0

def test_a_miner_given_to_one_fit_keeps_its_records_on_itself_and_the_error_says_so():
    from fastai_hardmine.callback import TopKCallback
    from fastai_hardmine import diagnostics as _diagnostics  # noqa: F401 (the plots)
    learn, cb = make(), TopKCallback(0.5)
    with learn.no_bar(): learn.fit(1, cbs=cb)
    assert learn.hard_miner is None and len(cb.kept) == len(learn.dls.train)
    with pytest.raises(ValueError, match=r"leaves the Learner when that fit ends: call it on the callback itself \(`cb.plot_kept\(\)`\)"):
        learn.plot_kept()
    assert cb.plot_kept() is not None
    # the off switch: the Learner trains as plain fastai again
    learn = make().top_k(0.5)
    learn.remove_cb(learn.hard_miner)
    with learn.no_bar(): learn.fit(1)
    assert learn.hard_miner is None and learn.count_batches.n == len(learn.dls.train)
