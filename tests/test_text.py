"Text models: an AWD_LSTM language model carries its hidden state as in plain fastai; a classifier's tuple output is unpacked."

import pytest
import torch
import torch.nn.functional as F
from fastcore.basics import noop
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.callback.rnn import rnn_cbs
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import SGD
from fastai.text.data import LMDataLoader
from fastai.text.models.awdlstm import AWD_LSTM, awd_lstm_lm_config, awd_lstm_clas_config
from fastai.text.models.core import get_language_model, get_text_classifier
from fastai.torch_core import set_seed
from fastai_hardmine.callback import TopKCallback, BatchLossFilterCallback, SelectiveBackpropCallback
from fastai_hardmine.core import select_top_k
from fastai_hardmine.data import TensorDataLoader, IndexedTensors
from test_subset import one_thread  # noqa: F401 (fixture)

VOCAB = 30
# no dropout, so that runs compare exactly; weight_p not 0: with it, torch 2.14's `F.dropout(w, p=0)` returns the
# parameter itself, which fastai's WeightDropout then registers on the LSTM, and `reset` fails on the next call
CONFIG = dict(emb_sz=16, n_hid=16, n_layers=2, pad_token=1, bidir=False, hidden_p=0., input_p=0., embed_p=0., weight_p=1e-9)

def lm_learner(cbs=None, seed=0):
    set_seed(seed)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(2, VOCAB, (97,), generator=g) for _ in range(8)]
    dls = DataLoaders(LMDataLoader(docs, bs=8, seq_len=10), LMDataLoader(docs[:2], bs=8, seq_len=10), device='cpu')
    model = get_language_model(AWD_LSTM, VOCAB, config={**awd_lstm_lm_config, **CONFIG, 'output_p': 0.})
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=rnn_cbs() + ([cbs] if cbs else []))
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    return learn

class TrainingForwards:
    "The input and the hidden state at every training forward of the AWD_LSTM (the scoring forward runs without grad)"
    def __init__(self, learn):
        self.calls = []
        encoder = learn.model[0]
        def hook(m, args):
            if torch.is_grad_enabled() and m.training:
                n = args[0].shape[0]
                hidden = [tuple(t[:, :n].clone() if m.bs >= n else t.clone() for t in layer) for layer in m.hidden]
                self.calls.append((args[0].clone(), hidden, m.bs))
        encoder.register_forward_pre_hook(hook)

@pytest.mark.parametrize('make', [lambda: TopKCallback(3), lambda: BatchLossFilterCallback(0.5),
                                  lambda: SelectiveBackpropCallback(2, seed=0)])
def test_language_model_trains_from_plain_fastais_hidden_state(make):
    "With lr=0 and no dropout, each kept row enters the training forward with the state plain fastai's row has there"
    plain, mined = lm_learner(), lm_learner(make())
    seen_plain, seen_mined = TrainingForwards(plain), TrainingForwards(mined)
    plain.fit(2, 0.)
    mined.fit(2, 0.)
    assert len(seen_plain.calls) == len(seen_mined.calls) > 4
    subset = 0
    for (x, hidden, bs), (xk, hk, bsk) in zip(seen_plain.calls, seen_mined.calls):
        # which rows of the loader batch were kept
        idx = torch.tensor([next(i for i in range(len(x)) if torch.equal(x[i], r)) for r in xk])
        subset += len(idx) < len(x)
        if bs != len(x): continue  # the first batch after a reset: plain fastai pads zeros, so does the miner
        assert bsk == len(idx)
        for layer, layer_k in zip(hidden, hk):
            for t, tk in zip(layer, layer_k): torch.testing.assert_close(tk, t[:, idx], rtol=1e-5, atol=1e-6)
    assert subset > 4

def test_language_model_rejects_fill_batch():
    with pytest.raises(ValueError, match="cannot keep the hidden state of AWD_LSTM.*mode='mask'"):
        lm_learner(SelectiveBackpropCallback(2, seed=0, fill_batch=True)).fit(1)

def classifier_learner(cbs):
    set_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(2, VOCAB, (96, 12), generator=g), torch.randint(0, 3, (96,), generator=g)
    dls = DataLoaders(TensorDataLoader(IndexedTensors(x, y), bs=32), TensorDataLoader(IndexedTensors(x[:32], y[:32]), bs=32))
    model = get_text_classifier(AWD_LSTM, VOCAB, 3, seq_len=12, config={**awd_lstm_clas_config, **CONFIG, 'output_p': 0.},
                                drop_mult=1., ps=[0.])
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=rnn_cbs() + [cbs])
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    return learn, (x[:32], y[:32])

class FirstStep(Callback):
    order, run_valid = 100, False
    def before_step(self):
        self.grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.learn.model.parameters()]
        raise CancelFitException()

@pytest.mark.parametrize('mode', ['subset', 'mask'])
def test_text_classifier_gradient(mode):
    "The classifier's (output, raw, dropped) tuple is unpacked for scoring; the gradient is plain PyTorch's on the top k"
    learn, (x, y) = classifier_learner(TopKCallback(8, mode=mode))
    # AWD_LSTM cannot be deep-copied (WeightDropout holds non-leaf weights): a twin built the same way, same weights
    ref = classifier_learner(TopKCallback(8))[0].model.train()
    ref.load_state_dict(learn.model.state_dict())
    first = FirstStep()
    learn.fit(1, 1e-2, cbs=first)
    # no BatchNorm, no dropout, and the classifier's encoder resets its state every forward: scoring `ref` changes nothing
    with torch.no_grad(): scores = F.cross_entropy(ref(x)[0], y, reduction='none')
    idx = select_top_k(scores, 8)
    if mode == 'subset': F.cross_entropy(ref(x[idx])[0], y[idx]).backward()
    else: F.cross_entropy(ref(x)[0], y, reduction='none')[idx].mean().backward()
    for g, p in zip(first.grads, ref.parameters()):
        torch.testing.assert_close(g, p.grad if p.grad is not None else torch.zeros_like(p), rtol=1e-4, atol=1e-6)

class Counter(torch.nn.Module):
    "A model with a state across batches that is not AWD_LSTM's `hidden`/`bs`: a running sum of its inputs"
    def __init__(self):
        super().__init__()
        self.lin, self.total = torch.nn.Linear(64, 10), None
    def reset(self): self.total = None
    def forward(self, x):
        self.total = x.sum(0) if self.total is None else self.total + x.sum(0)
        return self.lin(x)

def test_state_the_scoring_forward_cannot_put_back_is_refused_at_fit_start():
    from fastai.callback.rnn import ModelResetter
    from test_callback import make_learner
    # with or without fastai's ModelResetter: the module's `reset` is the mark of its state
    for cbs in ([ModelResetter()], []):
        learn = make_learner(cbs=cbs + [TopKCallback(16)], model_fn=Counter)
        with pytest.raises(ValueError, match="Counter has a `reset` method.*Use mode='mask'"): learn.fit(1)
        assert learn.hard_miner.kept.numel() == 0
        # mask mode runs no scoring forward
        make_learner(cbs=cbs + [TopKCallback(16, mode='mask')], model_fn=Counter).fit(1)
    # fastai's own text models are known: a language model trains in subset mode with ModelResetter (rnn_cbs)
    lm_learner(TopKCallback(3)).fit(1, 0.)

class DictOutput(torch.nn.Module):
    "A model returning a dictionary, as many Hugging Face-style models do"
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 10)
    def forward(self, x): return {'logits': self.lin(x), 'hidden': x}

class TakeLogits(Callback):
    "A user's callback that rewrites `pred` in `after_pred` and says so"
    transforms_pred = True
    def after_pred(self): self.learn.pred = self.pred['logits']

class CountPreds(Callback):
    "A user's callback that only records in `after_pred`"
    def __init__(self, says=None):
        if says is not None: self.transforms_pred = says
        self.n = 0
    def after_pred(self): self.n += 1

def test_user_pred_transform_is_replayed_on_the_scoring_output():
    "A callback with `transforms_pred = True` rewrites the scoring output too: the step is plain PyTorch's on the top k"
    import copy
    from test_callback import make_learner
    from test_accumulation import FirstStep as FirstStepOnly
    learn = make_learner(cbs=[TakeLogits(), TopKCallback(16)], model_fn=DictOutput, shuffle=False)
    ref = copy.deepcopy(learn.model).train()
    x, y = learn.dls.train.one_batch()
    first = FirstStepOnly()
    learn.fit(1, 1e-2, cbs=first)
    with torch.no_grad(): idx = select_top_k(F.cross_entropy(ref(x)['logits'], y, reduction='none'), 16)
    F.cross_entropy(ref(x[idx])['logits'], y[idx]).backward()
    for g, p in zip(first.grads, ref.parameters()): torch.testing.assert_close(g, p.grad)

def test_after_pred_that_says_nothing_is_warned_about_and_recorders_run_once():
    from test_callback import make_learner
    unsaid = CountPreds()
    learn = make_learner(cbs=[unsaid, TopKCallback(16)])
    with pytest.warns(UserWarning, match=r"CountPreds override\(s\) `after_pred`.*transforms_pred = True"): learn.fit(1)
    # the scoring forward does not run a recording callback: once per training and validation forward
    assert unsaid.n == len(learn.dls.train) + len(learn.dls.valid)
    said = CountPreds(says=False)
    learn = make_learner(cbs=[said, TopKCallback(16)])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        learn.fit(1)
    assert said.n == len(learn.dls.train) + len(learn.dls.valid)
    # mask mode runs no scoring forward: nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        make_learner(cbs=[CountPreds(), TopKCallback(16, mode='mask')]).fit(1)
