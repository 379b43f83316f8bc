"""Diagnostics: the `kept` column in fastai's progress table and loggers, the train metrics of deferred batches, the
per-sample counts behind `hardest_indices`/`show_hardest` for images, tabular rows and text, and the mislabeled-sample
finder measured against chance. The plots' data is checked in nbs/03_diagnostics.ipynb."""
import math
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn
from fastai.callback.core import Callback
from fastai.callback.progress import CSVLogger
from fastai.data.block import CategoryBlock
from fastai.learner import Learner, Recorder
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.tabular.learner import tabular_learner
from fastai.torch_core import set_seed
from fastai.vision.learner import vision_learner
from fastai.data.block import DataBlock
from fastai.data.transforms import get_image_files, parent_label, RandomSplitter
from fastai.vision.data import ImageBlock
from fastai.vision.augment import Resize
from torchvision.models import resnet18
from fastai_hardmine.all import *
from fastai_hardmine.columns import EpochColumns
from fastai_hardmine.bench.data import flip_labels
from fastai_hardmine.diagnostics import precision_recall_at_k
from test_applications import images, reviews, tab_dls, quiet  # noqa: F401 (fixtures)
from test_subset import one_thread  # noqa: F401 (fixture)

def digits_learner(cbs=None, seed=0, dls=None, **kw):
    set_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return quiet(Learner(dls or digits_dls(bs=64, seed=seed), model, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                         cbs=cbs, **kw))

MINERS = {'loss_filter': lambda **kw: BatchLossFilterCallback(**kw), 'top_k': lambda **kw: TopKCallback(0.5, **kw),
          'selective': lambda **kw: SelectiveBackpropCallback(1, seed=0, **kw)}

@pytest.mark.parametrize('mode', ['subset', 'mask'])
@pytest.mark.parametrize('rule', MINERS)
def test_kept_column_reaches_recorder_and_csv_logger(rule, mode, tmp_path):
    learn = digits_learner(MINERS[rule](mode=mode, log_kept_loss=True))
    metrics = learn.metrics
    learn.fit(3, 1e-2, cbs=CSVLogger(tmp_path/'log.csv'))
    miner = learn.hard_miner
    names = ['epoch', 'train_loss', 'kept', 'kept_loss', 'valid_loss', 'accuracy', 'time']
    assert list(learn.recorder.metric_names) == names
    # the epoch's kept share and mean kept loss share, written out from the per-batch records
    per_epoch = len(learn.dls.train)
    kept, sizes, shares = miner.kept.view(3, per_epoch), miner.batch_sizes.view(3, per_epoch), miner.kept_loss_share.view(3, per_epoch)
    for e, values in enumerate(learn.recorder.values):
        assert math.isclose(values[1], kept[e].sum().item() / sizes[e].sum().item(), rel_tol=1e-9)
        assert math.isclose(values[2], shares[e].mean().item(), rel_tol=1e-5)
    lines = (tmp_path/'log.csv').read_text().splitlines()
    assert lines[0] == ','.join(names) and len(lines) == 4
    assert [float(l.split(',')[2]) for l in lines[1:]] == pytest.approx([v[1] for v in learn.recorder.values])
    # the Learner's own settings are as they were; `validate` has no column
    assert learn.metrics is metrics and len(learn.validate()) == 2
    assert 'kept' not in learn.recorder.metric_names

def test_column_follows_train_metrics_and_can_be_turned_off():
    learn = digits_learner(TopKCallback(0.5))
    learn.recorder.train_metrics = True
    learn.fit(1, 1e-2)
    assert list(learn.recorder.metric_names) == ['epoch', 'train_loss', 'train_accuracy', 'kept', 'valid_loss',
                                                 'valid_accuracy', 'time']
    assert len(learn.recorder.values[0]) == 5 and learn.recorder.values[0][2] == pytest.approx(0.5, abs=0.02)
    learn = digits_learner(TopKCallback(0.5, log_kept=False))
    learn.fit(1, 1e-2)
    assert list(learn.recorder.metric_names) == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time']
    with pytest.raises(ValueError, match='`log_kept`'): TopKCallback(0.5, log_kept=1)

def test_companion_joins_and_leaves_with_its_miner():
    learn = digits_learner()
    def companions(): return [cb for cb in learn.cbs if isinstance(cb, EpochColumns)]
    learn.batch_loss_filter()
    assert [c.source for c in companions()] == [learn.hard_miner]
    learn.top_k(0.5)   # replaces the filter, and its column
    assert [c.source for c in companions()] == [learn.hard_miner]
    learn.remove_cb(learn.hard_miner)
    assert companions() == []
    learn.fit(1, 1e-2, cbs=SelectiveBackpropCallback(seed=0))   # a miner for one fit only
    assert companions() == [] and learn.hard_miner is None
    assert 'kept' in learn.recorder.metric_names

def test_info_batch_column_is_the_share_trained():
    learn = digits_learner(InfoBatchCallback(0.5, seed=0))
    learn.fit(4, 1e-2)
    pruner = learn.info_batch_pruner
    assert [v[1] for v in learn.recorder.values] == pytest.approx((1 - pruner.pruned_share).tolist())
    assert learn.recorder.values[1][1] < 1

class MetricInputs(Callback):
    "Right after `Recorder`: what fastai's train metrics read in each training batch"
    order = Recorder.order + 0.1
    def before_fit(self): self.seen = []
    def after_batch(self):
        if self.training: self.seen.append((None if len(self.yb) == 0 else len(self.yb[0]), self.pred))

def test_deferred_batches_give_train_metrics_a_matching_prediction():
    learn = digits_learner(SelectiveBackpropCallback(3, seed=0, fill_batch=True, staleness=1))
    learn.recorder.train_metrics = True
    watch = MetricInputs()
    learn.fit(2, 1e-2, cbs=watch)
    miner, n = learn.hard_miner, len(learn.dls.train)
    deferred = (miner.trained == 0).tolist()
    assert any(deferred[:n]) and any(deferred[n:])
    for i, ((rows, pred), skipped) in enumerate(zip(watch.seen, deferred)):
        if rows is None:
            # no scoring forward ran (stored losses): the batch is hidden from the train metrics
            assert skipped and i >= n and miner.scored[i] < miner.batch_sizes[i]
        else: assert len(pred) == rows
    # the first epoch scores every batch, so its deferred batches show the scoring forward's prediction
    first = [i for i in range(n) if deferred[i]]
    assert all(watch.seen[i][0] == miner.batch_sizes[i] for i in first)
    assert all(np.isfinite(v) for v in learn.recorder.values[-1])

def test_hardest_indices_need_track_samples():
    learn = digits_learner(BatchLossFilterCallback())
    learn.fit(1, 1e-2)
    with pytest.raises(ValueError, match='track_samples=True'): learn.hardest_indices(3)
    with pytest.raises(ValueError, match='track_samples'): BatchLossFilterCallback(track_samples='yes')

@pytest.mark.parametrize('rule', MINERS)
def test_most_kept_samples_find_mislabeled_ones(rule):
    "5% of the digits training labels flipped: the 72 most-kept samples are mostly flipped ones (chance: 5%)"
    x, y, xv, yv = digits_data()
    noisy = flip_labels(y, .05, seed=0)
    flipped = (noisy != y).nonzero().flatten()
    kw = dict(ignore_top=0) if rule == 'selective' else {}
    learn = digits_learner(MINERS[rule](track_samples=True, **kw), dls=tensor_dls(x, noisy, xv, yv, bs=64))
    learn.fit_one_cycle(8, 1e-2)
    precision, recall = precision_recall_at_k(learn.hardest_indices(len(flipped)), flipped)
    chance = len(flipped) / len(y)
    assert precision == recall and precision > 8 * chance, (precision, chance)
    assert learn.hard_miner.store.times_scored.sum() == 8 * len(y)

def test_show_hardest_images(images):
    set_seed(0)
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                    splitter=RandomSplitter(0.25, seed=0), item_tfms=Resize(24)).dataloaders(images/'img', bs=8, num_workers=0)
    learn = quiet(vision_learner(dls, resnet18, pretrained=False, cbs=TopKCallback(0.5, track_samples=True)))
    learn.fit(2, 1e-3)
    plt.close('all')
    table = learn.show_hardest(4)
    titles = [ax.get_title() for ax in plt.gcf().axes[:4]]
    store = learn.hard_miner.store
    assert table['kept'].tolist() == store.times_kept[torch.tensor(table['index'].tolist())].tolist()
    assert all(t.endswith(f"kept {k} of {s}") for t, k, s in zip(titles, table['kept'], table['scored'])), titles
    assert table['kept'].is_monotonic_decreasing
    plt.close('all')

def test_show_hardest_tabular_rows_and_text(reviews):
    learn = quiet(tabular_learner(tab_dls('cls', CategoryBlock()), layers=[16], n_out=2,
                                  cbs=BatchLossFilterCallback(track_samples=True)))
    learn.fit(2, 1e-2)
    learn.model.train()
    table = learn.show_hardest(5)
    assert len(table) == 5 and learn.model.training
    from fastai.text.all import TextDataLoaders, text_classifier_learner, AWD_LSTM
    set_seed(0)
    dls = TextDataLoaders.from_df(reviews, text_col='text', label_col='label', valid_pct=0.25, bs=16, seed=0, num_workers=0)
    learn = quiet(text_classifier_learner(dls, AWD_LSTM, pretrained=False, cbs=TopKCallback(0.5, track_samples=True)))
    learn.fit(1, 1e-3)
    # fastai 2.8.12's text `show_results` fails under this fastcore: the table comes back, with a warning saying so
    with pytest.warns(UserWarning, match='show_results'): table = learn.show_hardest(3)
    assert len(table) == 3 and (table['scored'] == 1).all() and set(table['prediction']) <= {0, 1}
    assert table['target'].tolist() == [int(dls.train_ds[i][1]) for i in table['index']]

# ---------------------------------------------------------------------------------------------------------------
# the plots' data (the pictures themselves are on the diagnostics page, nbs/03_diagnostics.ipynb)

@pytest.fixture(scope='module')
def filtered():
    "The loss filter with per-sample counts, 8 epochs of one-cycle on the digits"
    miner = BatchLossFilterCallback(track_samples=True)
    learn = digits_learner(miner)
    learn.fit_one_cycle(8, 1e-2)
    return learn, miner

def test_plot_kept_draws_each_batch_a_smoothed_line_and_epoch_boundaries(filtered):
    learn, miner = filtered
    fig = learn.plot_kept(beta=.5)
    ax = fig.axes[0]
    share = miner.kept_share
    assert ax.lines[0].get_ydata().tolist() == pytest.approx(share.tolist())
    ref, avg = [], 0.   # a debiased moving average, written out
    for i, v in enumerate(share.tolist()):
        avg = .5 * avg + .5 * v
        ref.append(avg / (1 - .5 ** (i + 1)))
    assert ax.lines[1].get_ydata() == pytest.approx(ref)
    per_epoch = len(learn.dls.train)
    assert [l.get_xdata()[0] for l in ax.lines[2:]] == [per_epoch * e - .5 for e in range(1, 8)]
    plt.close(fig)

def test_plot_loss_histograms_counts_all_and_kept_losses(filtered):
    learn, miner = filtered
    fig = learn.plot_loss_histograms(epochs=[1, -1], bins=10)
    losses, kept = miner.records.epoch_losses[1]
    assert len(losses) == len(learn.dls.train_ds) and kept.sum() == miner.kept[len(learn.dls.train):2 * len(learn.dls.train)].sum()
    edges = torch.linspace(0, float(losses.max()), 11)
    def counts(x): return torch.histogram(x, bins=edges).hist.tolist()
    assert [p.get_height() for p in fig.axes[0].patches] == counts(losses)
    assert [p.get_height() for p in fig.axes[1].patches] == counts(losses[kept])
    assert len(fig.axes) == 4 and fig.axes[2].get_title().startswith('epoch 7:')
    with pytest.raises(ValueError, match='0 to 7'): learn.plot_loss_histograms(epochs=[8])
    plt.close('all')

def test_hardest_indices_sort_by_times_kept_then_last_loss(filtered):
    learn, miner = filtered
    store = miner.store
    ref = sorted(range(len(store)), key=lambda i: (store.times_kept[i].item(), store.loss[i].item()), reverse=True)[:20]
    assert learn.hardest_indices(20).tolist() == ref
    assert learn.hardest_table(3)['kept'].tolist() == store.times_kept[torch.tensor(ref[:3])].tolist()
    assert set(store.times_scored.tolist()) == {8}   # every sample scored once an epoch (no staleness)
    with pytest.raises(ValueError, match='`n`'): learn.hardest_indices(0)
    with pytest.raises(ValueError, match='needs a InfoBatchCallback'): learn.plot_pruned()
    with pytest.raises(ValueError, match='SelectiveBackpropCallback'): learn.plot_selection_probability()

def test_plot_selection_probability_draws_the_curve_and_the_realised_rate():
    miner = SelectiveBackpropCallback(beta=2, seed=0)
    learn = digits_learner(miner)
    learn.fit_one_cycle(3, 1e-2)
    fig = learn.plot_selection_probability(epochs=[0], bins=4)
    ax = fig.axes[0]
    assert ax.lines[0].get_ydata() == pytest.approx((np.linspace(0, 1, 101) ** 2).tolist())
    losses, kept = miner.records.epoch_losses[0]
    # a slow reference: rank each loss, bin by rank, count the kept
    order = sorted(range(len(losses)), key=lambda i: losses[i].item())
    rank = {i: r for r, i in enumerate(order)}
    ref = []
    for b in range(4):
        members = [i for i in range(len(losses)) if min(int((rank[i] + .5) / len(losses) * 4), 3) == b]
        ref.append(sum(bool(kept[i]) for i in members) / len(members))
    assert ax.lines[1].get_ydata() == pytest.approx(ref)
    assert ax.lines[1].get_xdata() == pytest.approx([.125, .375, .625, .875])
    plt.close(fig)

def test_plot_pruned_draws_each_epochs_pruned_share():
    pruner = InfoBatchCallback(0.5, seed=0)
    learn = digits_learner(pruner)
    learn.fit_one_cycle(8, 1e-2)
    fig = learn.plot_pruned()
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx(pruner.pruned_share.tolist())
    # no losses yet in the first epoch, and the final full-data phase (1/8 of the epochs) prunes nothing
    assert heights[0] == heights[-1] == 0 and all(h > .1 for h in heights[1:-1])
    plt.close(fig)
