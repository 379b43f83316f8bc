"""What fastai_hardmine reads from fastai's internals, pinned: one test per private attribute or undocumented behaviour the
package relies on, on real fastai objects. A failure here names the fastai internal that changed and the module that relies
on it; the fix is to keep fastai within the bound pyproject.toml declares, or to adapt that module and raise the bound."""
import tomllib
import warnings
from pathlib import Path
import pytest
import torch
from torch import nn
import torch.nn.functional as F
import fastai
from fastai.torch_core import set_seed
from fastai.data.load import DataLoader
from fastai.data.core import DataLoaders, TfmdDL
from fastai.distributed import DistributedDL
from fastai.learner import Learner, Recorder
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import mae
from fastai.callback.core import Callback, CancelTrainException, TrainEvalCallback
from fastai.callback.progress import ProgressCallback
from fastai.callback.training import GradientAccumulation
from fastai.callback.mixup import MixHandler, MixUp, CutMix
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.rnn import RNNCallback
from fastai.text.models.awdlstm import AWD_LSTM
from fastai.test_utils import synth_learner
from fastcore.basics import noop
from packaging.requirements import Requirement
from packaging.version import Version

# the newest fastai release the assertions below were checked against
TESTED = '2.8.12'
PYPROJECT = Path(__file__).resolve().parents[1]/'pyproject.toml'

def changed(internal:str, module:str, relies:str) -> str:
    "The message of a failed assertion: what changed in fastai, what relies on it, what to do"
    return (f"fastai internal changed: {internal} (installed fastai {fastai.__version__}). {module} relies on it: {relies}. "
            f"fastai_hardmine is tested with fastai <={TESTED}; install fastai<={TESTED} (pip install 'fastai<={TESTED}'), "
            f"or adapt {module} to this fastai, rerun tests/test_fastai_internals.py and raise the bound in pyproject.toml.")

def regression_dls(n:int=40, bs:int=16) -> DataLoaders:
    "fastai loaders over `n` (x, 2x+3) pairs: a shuffled training `TfmdDL` (last batch partial when bs does not divide n)"
    x = torch.randn(n, 1)
    ds = torch.utils.data.TensorDataset(x, 2 * x + 3)
    return DataLoaders(TfmdDL(ds, bs=bs, shuffle=True, num_workers=0), TfmdDL(ds, bs=bs, num_workers=0))

def quiet(learn:Learner) -> Learner:
    "No progress bar, no printed table"
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    return learn

# --- DataLoader: the epoch's index order (fastai_hardmine.batch_indices) -------------------------------------------------

IDXS = "`DataLoader._DataLoader__idxs` (the epoch's index order, set by `DataLoader.__iter__`)"

def test_dataloader_keeps_the_epochs_index_order():
    "Once a shuffled loader yields its first batch, `_DataLoader__idxs` holds the epoch's order: batch i is entries i*bs.."
    set_seed(0)
    dl = DataLoader(list(range(10)), bs=4, shuffle=True, num_workers=0)
    msg = lambda relies: changed(IDXS, 'fastai_hardmine.batch_indices (BatchIndices)', relies)
    assert type(dl).__iter__ is DataLoader.__iter__ and TfmdDL.__iter__ is DataLoader.__iter__, msg(
        "a loader that keeps `DataLoader.__iter__` is one whose batches can be mapped to dataset indices")
    assert dl.indexed and dl.bs == 4, msg("`indexed` and `bs` say the loader draws indices, `bs` of them per batch")
    orders = []
    for _ in range(2):
        it = iter(dl)
        first = next(it)
        order = getattr(dl, '_DataLoader__idxs', None)
        assert order is not None, msg("it reads the attribute once the epoch's first batch has come")
        order = list(order)
        assert first.tolist() == order[:4], msg("the first `bs` entries are the items of the first batch, in its order")
        batches = [first] + list(it)
        assert sum((b.tolist() for b in batches), []) == order, msg("batch i holds entries i*bs to (i+1)*bs, in order")
        assert sorted(order) == list(range(10)), msg("the order holds each dataset index once")
        orders.append(order)
    assert orders[0] != orders[1], msg("a shuffled loader draws a new order, and sets a new attribute, every epoch")

def test_learner_iter_and_the_index_order_give_the_batch():
    "In a fit, at `before_batch`, entries `learn.iter*bs` on of `learn.dl._DataLoader__idxs` are the batch's dataset items"
    learn = quiet(Learner(regression_dls(40, 16), nn.Linear(1, 1), loss_func=F.mse_loss))
    x = learn.dls.train.dataset.tensors[0]
    seen = []
    class Probe(Callback):
        def before_batch(self):
            if not self.training: return
            order = list(self.learn.dl._DataLoader__idxs)
            n, start = len(self.learn.xb[0]), self.learn.iter * self.learn.dl.bs
            seen.append((self.learn.iter, torch.equal(self.learn.xb[0], x[order[start:start + n]])))
    learn.fit(1, cbs=Probe())
    assert [i for i, _ in seen] == [0, 1, 2] and all(ok for _, ok in seen), changed(
        f"`Learner.iter` (the batch's position in the epoch) or {IDXS}", 'fastai_hardmine.batch_indices (BatchIndices)',
        "the training batch number `learn.iter` picks entries iter*bs on of the loader's order: they are the batch's items")

def test_loader_copy_draws_a_given_order():
    "`dl.new(get_idxs=f, n=k)` makes a loader that draws f()'s indices, in order, and keeps them in `_DataLoader__idxs`"
    dl = DataLoader(list(range(10)), bs=3, shuffle=True, num_workers=0)
    idxs = [7, 2, 9, 0, 5]
    copy = dl.new(get_idxs=lambda: list(idxs), n=len(idxs))
    got = [b.tolist() for b in copy]
    assert got == [[7, 2, 9], [0, 5]] and list(copy._DataLoader__idxs) == idxs, changed(
        f"`DataLoader.new(get_idxs=..., n=...)` or {IDXS}", 'fastai_hardmine.batch_indices (loader_with_order)',
        "InfoBatch's pruned epochs and `show_hardest` draw a fixed list of indices through a copy of the training loader")

def test_distributed_loader_keeps_its_shards_order():
    "`DistributedDL` wraps its loader as `.dl`, keeps `DataLoader.__iter__`, and its `_DataLoader__idxs` is its rank's shard"
    class OneProcess(DistributedDL):
        # its broadcast needs CUDA and a process group: here every rank "receives" the order it computed
        def _broadcast(self, t, rank): return list(t)
    inner = DataLoader(list(range(10)), bs=2, shuffle=False, num_workers=0)
    ddl = OneProcess(inner, rank=1, world_size=2)
    got = sum((b.tolist() for b in ddl), [])
    msg = changed("`DistributedDL` (its `.dl`, its `__iter__`, or its `_DataLoader__idxs`)",
                  'fastai_hardmine.batch_indices (BatchIndices)',
                  "under DDP it reads the wrapped loader's settings from `.dl` and the rank's own shard of the order")
    assert ddl.dl is inner and type(ddl).__iter__ is DataLoader.__iter__, msg
    assert list(ddl._DataLoader__idxs) == got == [5, 6, 7, 8, 9], msg

# --- GradientAccumulation (fastai_hardmine.accumulation) -----------------------------------------------------------------

ACC = 'fastai_hardmine.accumulation (LoaderSampleAccumulation)'

def test_gradient_accumulation_counts_and_steps():
    "`before_step` adds `find_bs(yb)` to `count` and steps (count back to 0) once count >= n_acc; `after_loss` scales by bs/n_acc"
    n_acc, batches = 40, []
    class Before(Callback):
        order, run_valid = GradientAccumulation.order - 1, False
        def after_loss(self): self.loss_before = self.learn.loss_grad.detach().clone()
        def before_step(self): batches.append(dict(before=self.acc.count, n=len(self.learn.yb[0]), step=False))
    class After(Callback):
        order, run_valid = GradientAccumulation.order + 1, False
        def after_loss(self):
            n = len(self.learn.yb[0])
            self.scaled.append(torch.allclose(self.learn.loss_grad, self.before.loss_before * n / n_acc))
        def after_step(self): batches[-1]['step'] = True
        # a skipped step raises `CancelBatchException` in `before_step`: `after_batch` still runs
        def after_batch(self): batches[-1]['after'] = self.acc.count
    acc, before, after = GradientAccumulation(n_acc), Before(), After()
    before.acc = after.acc = acc
    after.before, after.scaled = before, []
    learn = quiet(Learner(regression_dls(72, 16), nn.Linear(1, 1), loss_func=F.mse_loss, cbs=[acc, before, after]))
    learn.fit(1)
    msg = lambda relies: changed("`GradientAccumulation.count`, `.n_acc` or their use in `after_loss`/`before_step`", ACC, relies)
    assert acc.n_acc == n_acc, msg("`n_acc` is the number of samples per optimizer step, as given")
    assert len(after.scaled) == 5 and all(after.scaled), msg("`after_loss` divides `loss_grad` by n_acc/find_bs(yb)")
    expected, count = [], 0
    for n in (16, 16, 16, 16, 8):   # 72 samples in batches of 16
        step = count + n >= n_acc
        expected.append(dict(before=count, n=n, step=step, after=0 if step else count + n))
        count = expected[-1]['after']
    assert batches == expected, msg("the count starts at 0, grows by the batch's size in `before_step`, and a step "
                                    f"happens (count back to 0) exactly when it reaches n_acc: got {batches}")

def test_gradient_accumulation_count_can_be_rewritten():
    "Writing `count` before `before_step` decides the step: n_acc - n makes it step, -n skips it; either way count ends at 0"
    steps, counts, plan = [], [], [True, False, False, True, True]   # whether each batch is made to step
    class Rewrite(Callback):
        order, run_valid = GradientAccumulation.order - 1, False
        def before_step(self):
            n = len(self.learn.yb[0])
            self.acc.count = self.acc.n_acc - n if plan[self.learn.iter] else -n
        def after_step(self): steps.append(self.learn.iter)
        def after_batch(self): counts.append(self.acc.count)
    acc, rewrite = GradientAccumulation(1000), Rewrite()
    rewrite.acc = acc
    learn = quiet(Learner(regression_dls(72, 16), nn.Linear(1, 1), loss_func=F.mse_loss, cbs=[acc, rewrite]))
    learn.fit(1)
    assert steps == [i for i, s in enumerate(plan) if s], changed(
        "`GradientAccumulation.count` (rewritten before its `before_step`)", ACC,
        "a trained subset of a loader batch makes the step happen when plain fastai's would, by setting `count`")
    assert counts == [0] * len(plan), changed(
        "`GradientAccumulation.count` after its `before_step`", ACC, f"count ends each batch at 0 (n_acc - n + n reached, "
        f"or -n + n): got {counts}")

# --- MixUp / CutMix (fastai_hardmine.scoring) ----------------------------------------------------------------------------

MIX = "`MixHandler.lf`, `.old_lf`, `.yb1` or `.lam`"

@pytest.mark.parametrize('handler', [MixUp, CutMix])
def test_mix_handler_loss_lerps_the_old_loss(handler):
    "In training, `learn.loss_func` is the handler's bound `lf`: the batch mean of lerp(old_lf(pred, *yb1), old_lf(pred, *yb), lam)"
    set_seed(0)
    x, y = torch.randn(24, 1, 4, 4), torch.randint(0, 3, (24,))
    ds = torch.utils.data.TensorDataset(x, y)
    dls = DataLoaders(TfmdDL(ds, bs=8, shuffle=True, num_workers=0), TfmdDL(ds, bs=8, num_workers=0))
    old = CrossEntropyLossFlat()
    mix = handler()
    seen = []
    class Probe(Callback):
        order, run_valid = 100, False
        def after_loss(self):
            lf = self.learn.loss_func
            pred, yb = self.learn.pred, self.learn.yb
            per_sample = lambda ys: F.cross_entropy(pred, ys[0], reduction='none')
            lam = mix.lam
            seen.append(dict(
                bound=getattr(lf, '__self__', None) is mix and lf.__func__ is MixHandler.lf, old=mix.old_lf is old,
                yb1=isinstance(mix.yb1, tuple) and len(mix.yb1) == 1 and sorted(mix.yb1[0].tolist()) == sorted(yb[0].tolist()),
                lam=isinstance(lam, torch.Tensor) and lam.numel() in (1, len(yb[0])),
                value=torch.allclose(self.learn.loss, torch.lerp(per_sample(mix.yb1), per_sample(yb), lam.to(pred.dtype)).mean())))
    learn = quiet(Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), loss_func=old, cbs=[mix, Probe()]))
    learn.fit(1)
    module = 'fastai_hardmine.scoring (mix_handler, sample_losses)'
    assert len(seen) == 3, changed(f"{handler.__name__}'s events", module, "it runs on every training batch")
    for s in seen:
        assert s['bound'], changed("`MixHandler.before_train` setting `learn.loss_func` to its bound `lf`", module,
                                   "it finds the handler of a mixed loss from `learn.loss_func.__self__`")
        assert s['old'], changed("`MixHandler.old_lf`", module, "it scores with the loss the handler replaced")
        assert s['yb1'], changed("`MixHandler.yb1`", module, "it holds the batch's targets, shuffled, as a tuple like `yb`")
        assert s['lam'], changed("`MixHandler.lam`", module, "a tensor of mixing weights, one per sample (MixUp) or one (CutMix)")
        assert s['value'], changed(MIX, module,
                                   "the mixed loss is the batch mean of torch.lerp(old_lf(pred, *yb1), old_lf(pred, *yb), lam), "
                                   "which it recomputes one loss per sample")
    assert learn.loss_func is old, changed("`MixHandler.after_train`", module, "the old loss function is back after the fit")

# --- Recorder (fastai_hardmine.columns) ----------------------------------------------------------------------------------

COLUMNS = 'fastai_hardmine.columns (EpochColumns)'

@pytest.mark.parametrize('train_metrics', [False, True])
def test_recorder_log_and_metric_names_are_the_table(train_metrics, monkeypatch):
    "`metric_names` (set in `Recorder.before_fit`) is the header ProgressCallback prints; `log`, after `Recorder.after_train`, is the row"
    names_ok, logs = [], []
    class Column(Callback):
        # where EpochColumns sits: after Recorder, before ProgressCallback
        order, run_valid = Recorder.order + 0.5, False
        def before_fit(self):
            rec = self.learn.recorder
            at = 2 + (len(rec.metrics) if rec.train_metrics else 0)
            names_ok.append(list(rec.metric_names[:at]) == ['epoch', 'train_loss'] + (['train_mae'] if train_metrics else []))
            rec.metric_names = rec.metric_names[:at] + ['extra'] + rec.metric_names[at:]
        def after_train(self):
            rec = self.learn.recorder
            logs.append(len(rec.log))
            rec.log += [0.125]
    written = []
    # what the progress table is given to print: its header, then one row per epoch
    monkeypatch.setattr(ProgressCallback, '_write_stats', lambda self, log: written.append(list(log)))
    learn = synth_learner(n_trn=2, metrics=mae, cbs=[Column()])
    learn.recorder.train_metrics = train_metrics
    learn.fit(2)
    msg = lambda internal, relies: changed(internal, COLUMNS, relies)
    assert isinstance(learn.recorder, Recorder) and learn.recorder.order < Column.order < ProgressCallback.order, msg(
        "`Recorder.order` or `ProgressCallback.order`", "its callback runs between the two")
    assert names_ok == [True], msg("`Recorder.metric_names`",
                                   "it starts 'epoch', 'train_loss', then the train metrics when `train_metrics` is set")
    at = 2 + (1 if train_metrics else 0)
    assert logs == [at, at], msg("`Recorder.log` after `Recorder.after_train`",
                                 "it holds the epoch number and the training columns, and nothing else yet")
    header, rows = written[0], written[1:]
    assert header == list(learn.recorder.metric_names) and header[at] == 'extra' and 'valid_loss' in header[at + 1:], msg(
        "`Recorder.metric_names` as the progress table's header", f"an inserted name is printed as a column: {header}")
    assert len(rows) == 2 and all(len(r) == len(header) and r[at] == 0.125 for r in rows), msg(
        "`Recorder.log` as the progress table's row", f"a value added to it is printed under the inserted name: {rows}")
    assert all(len(v) == len(learn.recorder.metric_names) - 2 for v in learn.recorder.values), msg(
        "`Recorder.values`", "each epoch's values are `log` less the epoch and the time, so loggers see the column")

def test_recorder_says_the_training_was_cancelled():
    "`Recorder.cancel_train` is set before `after_train` runs when training is cancelled, and the row has no training value"
    seen = []
    class Cancel(Callback):
        order = 0
        def after_batch(self):
            if self.training: raise CancelTrainException()
    class Probe(Callback):
        order, run_valid = Recorder.order + 0.5, False
        def after_train(self): seen.append((self.learn.recorder.cancel_train, len(self.learn.recorder.log)))
    learn = quiet(synth_learner(n_trn=2, cbs=[Cancel(), Probe()]))
    learn.fit(1)
    assert seen == [(True, 1)], changed(
        "`Recorder.cancel_train` or the order of `after_cancel_train` and `after_train`", COLUMNS,
        f"a cancelled epoch writes no column value: got (cancel_train, len(log)) = {seen}")

def test_validate_sends_before_fit_but_not_train():
    "`Learner.validate` sends `before_fit` (Recorder renames its columns) and `before_validate`, and no training event"
    events = []
    class Probe(Callback):
        def before_fit(self): events.append('before_fit')
        def before_train(self): events.append('before_train')
        def after_train(self): events.append('after_train')
        def before_validate(self): events.append('before_validate')
    learn = quiet(synth_learner(n_trn=2, cbs=[Probe()]))
    learn.validate()
    assert events == ['before_fit', 'before_validate'], changed(
        "the events `Learner.validate` sends", COLUMNS,
        f"outside a fit it takes its column names out again at `before_validate`: got {events}")

# --- other fastai behaviour the callbacks rely on ------------------------------------------------------------------------

def test_add_cb_and_remove_cb_set_the_callbacks_learn():
    "`Learner.add_cb` sets `cb.learn` to the Learner and `remove_cb` sets it to None, through the class's own property"
    sets = []
    class WithLearn(Callback):
        @property
        def learn(self): return self.__dict__.get('_learn')
        @learn.setter
        def learn(self, learn):
            sets.append(learn)
            self.__dict__['_learn'] = learn
    cb = WithLearn()
    learn = synth_learner(cbs=[cb])
    learn.remove_cb(cb)
    assert sets == [learn, None], changed(
        "`Learner.add_cb`/`remove_cb` setting `cb.learn`", 'fastai_hardmine.columns (ReportsEpochColumns)',
        "a callback with columns adds its companion `EpochColumns` when its `learn` is set, and removes it when unset")

def test_mixed_precision_keeps_its_autocast_for_the_fit():
    "`MixedPrecision.autocast` is a `torch.autocast` from `before_fit` to `after_fit` (entered in `before_batch`), None after"
    seen = []
    class Probe(Callback):
        order = MixedPrecision.order + 1
        def before_batch(self):
            mp = next(cb for cb in self.learn.cbs if isinstance(cb, MixedPrecision))
            seen.append(isinstance(getattr(mp, 'autocast', None), torch.autocast))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # on a CPU, CUDA's autocast and GradScaler warn and do nothing
        learn = quiet(synth_learner(n_trn=2, cbs=[MixedPrecision(), Probe()]))
        learn.fit(1)
    mp = next(cb for cb in learn.cbs if isinstance(cb, MixedPrecision))
    assert seen and all(seen) and mp.autocast is None and MixedPrecision.order == 10, changed(
        "`MixedPrecision.autocast` or `MixedPrecision.order`", 'fastai_hardmine.scorers (ModelScorer.autocast)',
        "the scoring forward runs in the fit's autocast, which `MixedPrecision` keeps as `.autocast` during a fit")

def test_after_pred_rewrites_learn_pred():
    "`RNNCallback.after_pred` and `MixedPrecision.after_pred` rewrite `learn.pred`, a plain attribute of the Learner"
    learn = quiet(synth_learner(cbs=[RNNCallback()]))
    out = torch.randn(2, 3)
    learn.pred = (out, [torch.zeros(1)], [torch.ones(1)])
    msg = lambda relies: changed("`Callback.after_pred` of `RNNCallback`/`MixedPrecision`, or `Learner.pred`",
                                 'fastai_hardmine.scoring (pred_transforms, replay_after_pred), used by fastai_hardmine.scorers', relies)
    assert 'pred' in learn.__dict__, msg("it sets `learn.pred` for a replay and puts the Learner's own back through `__dict__`")
    learn.rnn.after_pred()
    assert learn.pred is out, msg("replaying `RNNCallback.after_pred` turns the model's tuple into the prediction")
    mp = MixedPrecision()
    mp.learn = learn
    learn.pred = out.half()
    mp.after_pred()
    assert learn.pred.dtype == torch.float32, msg("replaying `MixedPrecision.after_pred` casts the prediction to float32")
    defaults = [type(cb) for cb in synth_learner().cbs]
    assert getattr(Callback, 'after_pred', None) is None and not [c for c in defaults if getattr(c, 'after_pred', None)], msg(
        "only a callback class that defines `after_pred` has one: fastai's base and default callbacks do not")
    assert TrainEvalCallback in defaults, msg("the default callbacks include `TrainEvalCallback`")

def test_callbacks_run_in_the_order_they_have_at_each_event():
    "The Learner sorts its callbacks by `order` at every event: an order changed in `before_fit` holds from the next event on"
    ran = []
    class Early(Callback):
        order = 20
        def before_fit(self): self.order = -5   # as the miner moves before MixUp/CutMix
        def before_batch(self): ran.append('early')
    class Mixer(Callback):
        order = 0
        def before_batch(self): ran.append('mixer')
    learn = quiet(synth_learner(n_trn=1, cbs=[Early(), Mixer()]))
    learn.fit(1)
    assert ran[:2] == ['early', 'mixer'], changed(
        "`Learner._call_one` (callbacks sorted by `order` at each event)", 'fastai_hardmine.callback (HardMiningCallback.before_fit)',
        f"subset mode moves the miner before MixUp/CutMix in `before_fit`: got {ran[:2]}")

class RunState(Callback):
    "A callback with a setting and a run state, as the miners have (module level, so that it pickles)"
    _stateattrs = ('run',)
    def __init__(self): self.setting, self.run = 3, None
    def _init_state(self): self.run = 'fresh'

def test_callback_pickling_leaves_out_its_stateattrs():
    "A fastai `Callback` (fastcore's `Stateful`) pickles without its `_stateattrs` and runs `_init_state` when it loads"
    import pickle
    cb = RunState()
    cb.run = 'what a fit made'
    back = pickle.loads(pickle.dumps(cb))
    assert 'run' not in cb.__getstate__() and back.setting == 3 and back.run == 'fresh', changed(
        "`Callback`'s pickling (fastcore `Stateful`: `_stateattrs`, `_init_state`)",
        'fastai_hardmine.callback (HardMiningCallback) and fastai_hardmine.prune (InfoBatchCallback)',
        "`learn.export()` pickles the callbacks without what a fit made, which `_init_state` makes afresh on loading")

def test_callback_call_reraises_the_same_exception():
    "`Callback.__call__` re-raises the exception object it caught, with its message replaced"
    class Boom(Callback):
        def before_batch(self):
            e = ValueError('the model said no')
            e.model_args = e.args
            raise e
    with pytest.raises(ValueError) as info: Boom()('before_batch')
    e = info.value
    assert getattr(e, 'model_args', None) == ('the model said no',) and 'Boom' in str(e.args[0]), changed(
        "`Callback.__call__`'s handling of an exception", 'fastai_hardmine.callback (HardMiningCallback.__call__)',
        "fastai rewrites the message of the same exception object, and the callback puts the model's own message back")

def test_awd_lstm_hidden_state():
    "`AWD_LSTM` keeps `bs` (an int) and `hidden` (a list per layer of (h, c), rows on dim 1); a forward assigns a new list"
    set_seed(0)
    m = AWD_LSTM(10, 4, 6, 2, hidden_p=0, input_p=0, embed_p=0, weight_p=0)
    msg = lambda relies: changed("`AWD_LSTM.hidden`, `AWD_LSTM.bs` or `AWD_LSTM.reset`", 'fastai_hardmine.recurrent', relies)
    assert isinstance(m.bs, int) and isinstance(m.hidden, list) and callable(type(m).reset), msg(
        "it finds the modules with a hidden state by a list `hidden`, an int `bs` and a `reset` method")
    m(torch.randint(0, 10, (3, 5)))
    before = m.hidden
    kept = [tuple(t.clone() for t in layer) for layer in before]
    assert m.bs == 3 and len(before) == 2 and all(len(l) == 2 and all(t.shape[1] == 3 for t in l) for l in before), msg(
        "`hidden` holds one (h, c) per layer, each with the batch's rows on dim 1, and `bs` is the batch's size")
    m(torch.randint(0, 10, (5, 5)))
    assert m.hidden is not before and all(torch.equal(a, b) for la, lb in zip(before, kept) for a, b in zip(la, lb)), msg(
        "a forward assigns a new list of new tensors, leaving the old state intact to be put back")
    # a larger batch: the old rows carry on and the new rows start at zero, as `RecurrentRows` pads them
    m.hidden = [tuple(t.clone() for t in layer) for layer in kept]
    m.bs = 3
    m._change_hidden(5)
    assert all(torch.equal(t[:, :3], k) and not t[:, 3:].any() for l, lk in zip(m.hidden, kept) for t, k in zip(l, lk)), msg(
        "a batch with more rows keeps the old rows first and starts the new ones at zero")

# --- the declared bound ----------------------------------------------------------------------------------------------------

def bound_problem(deps:list[str], installed:str) -> str|None:
    "What is wrong with the fastai requirement among `deps` (pyproject.toml's [project] dependencies), or None"
    reqs = [Requirement(d) for d in deps if Requirement(d).name.lower() == 'fastai']
    if len(reqs) != 1: return f"pyproject.toml's [project] dependencies should name fastai once: {deps}"
    spec = reqs[0].specifier
    if not any(s.operator in ('<', '<=', '==', '===', '~=') for s in spec):
        return (f"pyproject.toml declares fastai{spec or ' (any version)'} with no upper bound: fastai_hardmine reads fastai's "
                f"internals (tests/test_fastai_internals.py) and is tested with fastai <={TESTED}; declare 'fastai>=2.8,<={TESTED}'")
    if not spec.contains(Version(installed), prereleases=True):
        return (f"installed fastai {installed} is outside the bound pyproject.toml declares (fastai{spec}): fastai_hardmine is "
                f"tested with fastai <={TESTED}; install a fastai within the bound")
    t = Version(TESTED)
    admitted = [v for v in (f'{t.major}.{t.minor}.{t.micro + 1}', f'{t.major}.{t.minor + 1}.0', f'{t.major + 1}.0.0')
                if spec.contains(v)]
    if admitted:
        return (f"pyproject.toml's bound fastai{spec} admits fastai {admitted[0]}, newer than {TESTED}, the release "
                f"tests/test_fastai_internals.py was checked against: run it with that fastai, then raise TESTED there with the bound")
    return None

def test_the_bound_check():
    assert bound_problem(['torch', 'fastai>=2.8,<=2.8.12'], '2.8.12') is None
    assert 'no upper bound' in bound_problem(['fastai>=2.8'], '2.8.12')
    assert 'outside the bound' in bound_problem(['fastai>=2.8,<=2.8.11'], '2.8.12')
    assert 'admits fastai 2.8.13' in bound_problem(['fastai>=2.8,<2.9'], '2.8.12')
    assert 'name fastai once' in bound_problem(['torch'], '2.8.12')

def test_installed_fastai_is_within_the_declared_bound():
    "pyproject.toml bounds fastai above by a release these tests were checked against, and the installed fastai is within it"
    problem = bound_problem(tomllib.loads(PYPROJECT.read_text())['project']['dependencies'], fastai.__version__)
    assert problem is None, problem
