"What a fit with a miner leaves on the Learner when it ends, is cancelled or raises: as plain fastai leaves it."
import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.mixup import MixUp
from fastai.callback.training import GradientAccumulation
from fastai_hardmine.callback import TopKCallback, SelectiveBackpropCallback
from fastai_hardmine.fill_queue import TrainAtOnce
from test_callback import make_learner, mlp_bn
from test_subset import CpuAutocast, one_thread  # noqa: F401 (fixture)
from test_text import lm_learner

class CancelAt(Callback):
    order = 200
    def after_batch(self):
        if self.training and self.iter == 5: raise CancelFitException()

class Boom(Exception): pass

class RaiseAt(Callback):
    "Raises in the middle of the epoch, at a point every batch reaches (deferred, accumulating or stepping)"
    order = 200
    def after_batch(self):
        if self.training and self.iter == 3: raise Boom('stop at batch 3')

def run(learn, scenario, lr=1e-2, epochs=1):
    if scenario == 'normal': learn.fit(epochs, lr)
    elif scenario == 'cancel': learn.fit(epochs, lr, cbs=CancelAt())
    else:
        with pytest.raises(Boom): learn.fit(epochs, lr, cbs=RaiseAt())

def snapshot(learn):
    lf = learn.loss_func
    return dict(loss_func=type(lf).__name__, reduction=getattr(lf, 'reduction', None), training=learn.model.training,
                cbs=[type(cb).__name__ for cb in learn.cbs.sorted('order')], autocast=torch.is_autocast_enabled('cpu'))

@pytest.mark.parametrize('scenario', ['normal', 'cancel', 'error'])
@pytest.mark.parametrize('make', [lambda: TopKCallback(16), lambda: SelectiveBackpropCallback(2, seed=0, fill_batch=True)])
def test_subset_fit_leaves_the_learner_as_plain_fastai_does(scenario, make):
    "With MixUp, MixedPrecision's autocast and GradientAccumulation in the Learner"
    states = []
    for miner in (None, make()):
        learn = make_learner(cbs=[CpuAutocast(), MixUp(0.4), GradientAccumulation(128)], model_fn=mlp_bn)
        if miner is not None: learn.add_cb(miner)
        order = miner.order if miner is not None else None
        run(learn, scenario)
        state = snapshot(learn)
        if miner is not None:
            # the miner and its progress-table companion (`EpochColumns`), which joined and leave with it
            state['cbs'].remove(type(miner).__name__); state['cbs'].remove('EpochColumns')
            # back at its own place with nothing queued (an exception goes through fastai without `after_fit`: the
            # next fit places the callback again)
            if scenario != 'error': assert miner.order == order and getattr(miner.batch_step, 'batches', TrainAtOnce()).waiting == 0
        states.append(state)
    assert states[0] == states[1]

@pytest.mark.parametrize('scenario', ['normal', 'cancel', 'error'])
def test_language_model_hidden_state_left_as_plain_fastai_leaves_it(scenario):
    "With lr=0 and no dropout, the AWD_LSTM's hidden state after the fit equals plain fastai's, however it ended"
    hidden = []
    for miner in (None, TopKCallback(3)):
        learn = lm_learner(miner)
        run(learn, scenario, lr=0.)
        encoder = learn.model[0]
        hidden.append((encoder.bs, [tuple(t.clone() for t in layer) for layer in encoder.hidden]))
    (bs0, h0), (bs1, h1) = hidden
    assert bs0 == bs1
    for layer0, layer1 in zip(h0, h1):
        for t0, t1 in zip(layer0, layer1): torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-6)
