"""What `learn.export()` keeps of a miner (its settings, none of its run state), the package's own loaders exported without
their data and predicting after `load_learner`, and errors of the user's model met in the scoring forward."""
import pickle, subprocess, sys
import pytest
import torch
from torch import nn
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
from fastcore.test import test_close as close, test_eq as equal
from fastai_hardmine.callback import TopKCallback, BatchLossFilterCallback, SelectiveBackpropCallback
from fastai_hardmine.steps import PlainStep
from fastai_hardmine.data import tensor_dls, digits_dls, digits_image_dls, digits_data, IndexedTensors
from test_callback import make_learner, digits, mlp_bn, quiet
from test_subset import one_thread  # noqa: F401 (fixture)

MINERS = {
    'top_k subset': lambda: TopKCallback(16), 'top_k mask': lambda: TopKCallback(16, mode='mask'),
    'loss_filter subset': lambda: BatchLossFilterCallback(0.6), 'loss_filter mask': lambda: BatchLossFilterCallback(0.6, mode='mask'),
    'selective subset': lambda: SelectiveBackpropCallback(2, seed=0),
    'selective mask': lambda: SelectiveBackpropCallback(2, seed=0, mode='mask'),
    'selective staleness fill': lambda: SelectiveBackpropCallback(2, seed=0, staleness=1, fill_batch=True),
}

def bigger_digits(times):
    xt, yt, xv, yv = digits()
    return xt.repeat(times, 1), yt.repeat(times), xv, yv

@pytest.mark.parametrize('name', MINERS)
def test_export_keeps_settings_not_run_state(name, tmp_path):
    sizes = []
    for times in (1, 4):
        learn = make_learner(cbs=MINERS[name](), data=bigger_digits(times))
        learn.fit(1, 1e-2)
        miner = learn.hard_miner
        assert len(miner.kept) > 0
        learn.export(tmp_path/'with.pkl')
        learn.remove_cb(miner)
        learn.export(tmp_path/'without.pkl')
        sizes.append((tmp_path/'with.pkl').stat().st_size - (tmp_path/'without.pkl').stat().st_size)
        # the callback in the Learner is untouched by the export
        assert len(miner.kept) > 0 and (miner.store is not None) == ('staleness' in name)
        loaded = load_learner(tmp_path/'with.pkl').hard_miner
        assert type(loaded) is type(miner) and loaded.mode == miner.mode and len(loaded.kept) == 0
        # a fit's run state (records, store, queue) is made afresh: the step of a miner that has not started a fit
        assert loaded.store is None and type(loaded.batch_step) is PlainStep
        for attr in ('k', 'min_loss_perc', 'min_sample_perc', 'beta', 'seed', 'staleness', 'fill_batch'):
            assert getattr(loaded, attr, None) == getattr(miner, attr, None)
        if isinstance(miner, SelectiveBackpropCallback):
            assert loaded.generator is None and len(loaded.history.values) == 0
            assert loaded.history.size == miner.history.size
    # the miner adds under 1.5 KB to the export, whatever the size of the training set
    assert all(0 < s < 1536 for s in sizes), sizes

SCRIPT = """
import sys, torch
from fastai.learner import load_learner
learn = load_learner(sys.argv[1])
torch.save(torch.stack([learn.predict(i)[2] for i in range(1437, 1447)]), sys.argv[2])
"""

@pytest.mark.parametrize('name', ['top_k subset', 'selective staleness fill'])
def test_load_learner_in_a_fresh_process_predicts_as_before(name, tmp_path):
    learn = make_learner(cbs=MINERS[name]())
    learn.fit(1, 1e-2)
    # items of the validation split are indices 1437.. of the data set
    expected = torch.stack([learn.predict(i)[2] for i in range(1437, 1447)])
    learn.export(tmp_path/'export.pkl')
    subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path/'export.pkl'), str(tmp_path/'preds.pt')], check=True,
                   capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path/'preds.pt'), expected)

# ---------------------------------------------------------------------------------------------------------------
# errors of the user's model

def one_sample_last_batch():
    "digits with 1 + a multiple of 64 training samples: the last training batch holds one sample"
    xt, yt, xv, yv = digits()
    n = len(xt) // 64 * 64 + 1
    return xt[:n], yt[:n], xv, yv

@pytest.mark.parametrize('make, scores', [(lambda: TopKCallback(16), False), (lambda: BatchLossFilterCallback(0.6), True),
                                          (lambda: SelectiveBackpropCallback(2, seed=0), True)])
def test_model_error_in_scoring_forward_surfaces_as_the_model_raised_it(make, scores):
    "A batch of one through BatchNorm fails as in plain fastai, not as the miner's error, with a note saying where"
    # top-k keeps a batch of one whole, so fastai's own forward meets the error (no scoring forward, no note)
    plain = make_learner(model_fn=mlp_bn, data=one_sample_last_batch(), shuffle=False)
    with pytest.raises(ValueError) as expected: plain.fit(1, 1e-2)
    learn = make_learner(cbs=make(), model_fn=mlp_bn, data=one_sample_last_batch(), shuffle=False)
    loss_func = learn.loss_func
    with pytest.raises(ValueError) as got: learn.fit(1, 1e-2)
    assert got.value.args == expected.value.args and 'Expected more than 1 value per channel' in str(got.value)
    assert 'Exception occured in' not in str(got.value)
    notes = getattr(got.value, '__notes__', [])
    assert any("hard-mining callback's scoring forward" in n for n in notes) == scores
    assert learn.loss_func is loss_func and loss_func.reduction == 'mean'

def test_shape_mismatch_in_the_model_surfaces_as_the_model_raised_it():
    class Wrong(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(63, 10)
        def forward(self, x): return self.lin(x)
    with pytest.raises(RuntimeError) as expected: make_learner(model_fn=Wrong).fit(1)
    with pytest.raises(RuntimeError) as got: make_learner(cbs=TopKCallback(16), model_fn=Wrong).fit(1)
    assert got.value.args == expected.value.args and 'Exception occured in' not in str(got.value)

def test_the_miners_own_errors_still_name_the_miner():
    "An error of the miner itself (a loss it cannot make per-sample) keeps fastai's note naming the callback"
    def loss(pred, y): return nn.functional.cross_entropy(pred, y)
    with pytest.raises(TypeError, match=r'Exception occured in `TopKCallback`[\s\S]*Cannot compute a per-sample loss'):
        make_learner(cbs=TopKCallback(16), loss_func=loss).fit(1)

def test_export_of_a_language_model_miner_holds_no_hidden_state(tmp_path):
    "The state a fit sets up (recurrent rows, the scoring forward's hidden state, accumulation counts) is not exported"
    from test_text import lm_learner
    from fastai.callback.training import GradientAccumulation
    learn = lm_learner(TopKCallback(3))
    learn.fit(1, 1e-2, cbs=GradientAccumulation(16))
    miner = learn.hard_miner
    step = miner.batch_step
    assert step.current[0].reached and step.rows.modules and step.accumulation.accumulators
    state = miner.__getstate__()
    assert not {'batch_step', 'records', 'store'} & set(state)
    # unpickled, the callback starts with a fit's state made afresh
    loaded = type(miner).__new__(type(miner))
    # without the Learner and the progress-table companion (`EpochColumns`, which holds the Learner too): a real export
    # pickles both anyway, and `test_export_keeps_settings_not_run_state` measures the whole difference a miner makes
    own = {k: v for k, v in state.items() if k not in ('learn', '_learn', '_columns')}
    loaded.__setstate__(pickle.loads(pickle.dumps(own)))
    assert type(loaded.batch_step) is PlainStep and loaded.store is None
    assert len(loaded.records.kept) == 0 and loaded.k == miner.k
    # (this hand-built LM's loaders cannot be exported by fastai itself: the callback's own state is measured instead)
    assert len(pickle.dumps(own)) < 1536

# ---------------------------------------------------------------------------------------------------------------
# the package's own loaders: export without their data, load, predict

XT, YT, XV, YV = digits_data()
LOADERS = {'tensor_dls': lambda xt=XT, yt=YT: tensor_dls(xt, yt, XV, YV, bs=64),
           'digits_dls': lambda: digits_dls(bs=64), 'digits_image_dls': lambda: digits_image_dls(bs=64)}

def package_learner(dls):
    set_seed(0)
    # `Flatten` lets the same model take the 8x8 images and the rows of 64 pixels
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    learn = quiet(Learner(dls, model, CrossEntropyLossFlat())).top_k(0.5)
    learn.fit(1, 1e-2)
    return learn

@pytest.mark.parametrize('name', LOADERS)
def test_package_loaders_export_without_data_and_predict_as_before(name, tmp_path):
    learn = package_learner(LOADERS[name]())
    valid_preds = learn.get_preds()[0]
    rows = [learn.predict(XV[i]) for i in range(5)]
    learn.export(tmp_path/'export.pkl')
    # the training pixels alone are 368 KB (the image loaders' export was over 500 KB when a transform held them); the
    # export is the model (19 KB of weights here), the miner's settings and the empty loaders: 46 KB for the tensor
    # loaders, 70 KB for the images (their empty `Datasets` keep the split's indices, as fastai's `new_empty` does)
    size = (tmp_path/'export.pkl').stat().st_size
    assert size < 96 * 1024 < XT.nbytes, size
    loaded = load_learner(tmp_path/'export.pkl')
    assert len(loaded.dls.train_ds) == len(loaded.dls.valid_ds) == 0
    assert type(loaded.hard_miner) is TopKCallback and loaded.hard_miner.k == 0.5
    # the export leaves the Learner's own loaders in place
    assert len(learn.dls.train_ds) == len(XT)
    # a test set of raw input rows gives the validation predictions again, in order
    close(loaded.get_preds(dl=loaded.dls.test_dl(XV))[0], valid_preds)
    for i, (decoded, idx, probs) in enumerate(rows):
        got_decoded, got_idx, got_probs = loaded.predict(XV[i])
        equal(got_idx, idx); close(got_probs, probs); assert got_decoded == decoded
        equal(idx, probs.argmax())
        # tensor loaders have no vocab: the decoded prediction is the class index; the images' is the category
        assert (decoded == idx) if name != 'digits_image_dls' else (decoded == str(int(idx)))

def test_tensor_loader_export_size_does_not_grow_with_the_training_set(tmp_path):
    sizes = []
    for times in (1, 4):
        learn = package_learner(LOADERS['tensor_dls'](XT.repeat(times, 1), YT.repeat(times)))
        learn.export(tmp_path/f'{times}.pkl')
        sizes.append((tmp_path/f'{times}.pkl').stat().st_size)
    assert abs(sizes[1] - sizes[0]) < 256, sizes

def test_tensor_loader_test_dl_with_labels_and_wrong_items():
    learn = package_learner(LOADERS['tensor_dls']())
    preds, targs = learn.get_preds(dl=learn.dls.test_dl(IndexedTensors(XV, YV), with_labels=True))
    equal(targs, YV); close(preds, learn.get_preds()[0])
    # a list of rows (what `predict` passes) is stacked; anything else is refused by name
    close(learn.get_preds(dl=learn.dls.test_dl([XV[0], XV[1]]))[0], preds[:2])
    with pytest.raises(TypeError, match='TensorDataLoader needs'): learn.dls.test_dl([1, 2])

FRESH = """
import sys, torch
from fastai.learner import load_learner
learn = load_learner(sys.argv[1])
x = torch.load(sys.argv[2])
torch.save(torch.stack([learn.predict(r)[2] for r in x]), sys.argv[3])
"""

@pytest.mark.parametrize('name', ['tensor_dls', 'digits_image_dls'])
def test_package_loaders_load_in_a_fresh_process(name, tmp_path):
    learn = package_learner(LOADERS[name]())
    expected = torch.stack([learn.predict(r)[2] for r in XV[:5]])
    learn.export(tmp_path/'export.pkl')
    torch.save(XV[:5].clone(), tmp_path/'x.pt')
    subprocess.run([sys.executable, '-c', FRESH, *(str(tmp_path/f) for f in ('export.pkl', 'x.pt', 'preds.pt'))], check=True,
                   capture_output=True)
    close(torch.load(tmp_path/'preds.pt'), expected)
