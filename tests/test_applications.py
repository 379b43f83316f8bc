"""Each fastai application trains a few batches with each rule in both modes: vision, segmentation, tabular
classification, regression and multi-label, text classifier and language model (their hidden state in detail:
tests/test_text.py). Data is generated; nothing downloads."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from fastcore.basics import noop
from fastai.callback.progress import ProgressCallback
from fastai.data.block import DataBlock, CategoryBlock, MultiCategoryBlock, RegressionBlock
from fastai.data.transforms import get_image_files, parent_label, RandomSplitter
from fastai.vision.data import ImageBlock, MaskBlock
from fastai.vision.augment import Resize
from fastai.vision.learner import vision_learner, unet_learner
from fastai.tabular.data import TabularDataLoaders
from fastai.tabular.core import Categorify, Normalize
from fastai.tabular.learner import tabular_learner
from fastai.torch_core import set_seed
from torchvision.models import resnet18
from fastai_hardmine.callback import TopKCallback, BatchLossFilterCallback, SelectiveBackpropCallback
from test_subset import one_thread  # noqa: F401 (fixture)

MINERS = {'top_k': lambda mode: TopKCallback(0.5, mode=mode), 'loss_filter': lambda mode: BatchLossFilterCallback(0.6, mode=mode),
          'selective': lambda mode: SelectiveBackpropCallback(1, seed=0, mode=mode)}

@pytest.fixture(scope='module')
def images(tmp_path_factory):
    "Two classes of 24x24 images (bright on the left or on the right), with a two-class mask each"
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for cls in ('left', 'right'):
        (root/'img'/cls).mkdir(parents=True)
        (root/'mask').mkdir(exist_ok=True)
        for i in range(20):
            a = rng.integers(0, 80, (24, 24, 3), dtype=np.uint8)
            half = slice(0, 12) if cls == 'left' else slice(12, 24)
            a[:, half] += 120
            Image.fromarray(a).save(root/'img'/cls/f'{i}.png')
            m = np.zeros((24, 24), dtype=np.uint8)
            m[:, half] = 1
            Image.fromarray(m).save(root/'mask'/f'{cls}_{i}.png')
    return root

def quiet(learn):
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    return learn

def check_trained(learn, mode):
    miner = learn.hard_miner
    assert len(miner.kept) == len(learn.dls.train) and (miner.kept <= miner.batch_sizes).all()
    assert miner.kept.sum() < miner.batch_sizes.sum()
    if mode == 'subset': assert miner.trained.tolist() == miner.kept.tolist()
    else: assert miner.trained.tolist() == miner.batch_sizes.tolist()
    assert all(np.isfinite(v) for v in learn.recorder.values[-1][:2])

@pytest.mark.parametrize('mode', ['subset', 'mask'])
@pytest.mark.parametrize('rule', MINERS)
def test_vision_classifier(images, rule, mode):
    set_seed(0)
    dls = DataBlock((ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                    splitter=RandomSplitter(0.25, seed=0), item_tfms=Resize(24)).dataloaders(images/'img', bs=8, num_workers=0)
    learn = quiet(vision_learner(dls, resnet18, pretrained=False, cbs=MINERS[rule](mode)))
    loss_func = learn.loss_func
    learn.fit(1, 1e-3)
    check_trained(learn, mode)
    assert learn.loss_func is loss_func and learn.loss_func.reduction == 'mean'
    pred, _, probs = learn.predict(get_image_files(images/'img')[0])
    assert pred in ('left', 'right') and len(probs) == 2

@pytest.mark.parametrize('mode', ['subset', 'mask'])
@pytest.mark.parametrize('rule', MINERS)
def test_segmentation(images, rule, mode):
    "unet_learner: one loss per image (the mean over its pixels)"
    set_seed(0)
    dblock = DataBlock((ImageBlock, MaskBlock(codes=['background', 'bright'])), get_items=get_image_files,
                       get_y=lambda p: images/'mask'/f'{p.parent.name}_{p.name}', splitter=RandomSplitter(0.25, seed=0),
                       item_tfms=Resize(24))
    dls = dblock.dataloaders(images/'img', bs=8, num_workers=0)
    learn = quiet(unet_learner(dls, resnet18, pretrained=False, n_out=2, cbs=MINERS[rule](mode)))
    learn.fit(1, 1e-3)
    check_trained(learn, mode)

def table(n=200, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(dict(a=rng.normal(size=n), b=rng.normal(size=n), c=rng.choice(['x', 'y', 'z'], n)))
    df['cls'] = np.where(df.a + (df.c == 'x') > 0.3, 'hi', 'lo')
    df['target'] = (2 * df.a - df.b + (df.c == 'y')).astype('float32')
    df['pos_a'], df['pos_b'] = (df.a > 0).astype('float32'), (df.b > 0).astype('float32')
    return df

def tab_dls(y_names, y_block, **kw):
    set_seed(0)
    return TabularDataLoaders.from_df(table(), procs=[Categorify, Normalize], cat_names=['c'], cont_names=['a', 'b'],
                                      y_names=y_names, y_block=y_block, bs=32, num_workers=0, **kw)

@pytest.mark.parametrize('mode', ['subset', 'mask'])
@pytest.mark.parametrize('rule', MINERS)
@pytest.mark.parametrize('task', ['classification', 'regression', 'multi-label'])
def test_tabular(rule, mode, task):
    if task == 'classification': dls, n_out = tab_dls('cls', CategoryBlock()), 2
    elif task == 'regression': dls, n_out = tab_dls('target', RegressionBlock()), 1
    else: dls, n_out = tab_dls(['pos_a', 'pos_b'], MultiCategoryBlock(encoded=True, vocab=['pos_a', 'pos_b'])), 2
    # n_out given: fastai 2.8.12 with pandas 3 infers `dls.c` wrongly (a list holding the categorical vocab)
    learn = quiet(tabular_learner(dls, layers=[16], n_out=n_out, cbs=MINERS[rule](mode)))
    loss_func = learn.loss_func
    learn.fit(2, 1e-2)
    miner = learn.hard_miner
    assert len(miner.kept) == 2 * len(learn.dls.train) and miner.kept.sum() < miner.batch_sizes.sum()
    assert learn.loss_func is loss_func and learn.loss_func.reduction == 'mean'
    assert np.isfinite(learn.recorder.values[-1][0])
    preds, targs = learn.get_preds()
    assert len(preds) == len(targs) == len(learn.dls.valid_ds) and preds.shape[1] == n_out

@pytest.fixture(scope='module')
def reviews():
    "Generated review-like texts (fastai's default tokenizer, spaCy's blank English, needs no download)"
    rng = np.random.default_rng(0)
    words = ['good', 'bad', 'movie', 'plot', 'great', 'awful', 'actor', 'scene', 'fun', 'boring']
    texts = [' '.join(rng.choice(words, 12)) for _ in range(96)]
    score = lambda t: t.count('good') + t.count('great') - t.count('bad') - t.count('awful')
    return pd.DataFrame(dict(text=texts, label=['pos' if score(t) > 0 else 'neg' for t in texts]))

@pytest.mark.parametrize('mode', ['subset', 'mask'])
@pytest.mark.parametrize('rule', MINERS)
def test_text_classifier_learner(reviews, rule, mode):
    from fastai.text.all import TextDataLoaders, text_classifier_learner, AWD_LSTM
    set_seed(0)
    dls = TextDataLoaders.from_df(reviews, text_col='text', label_col='label', valid_pct=0.25, bs=16, seed=0, num_workers=0)
    learn = quiet(text_classifier_learner(dls, AWD_LSTM, pretrained=False, cbs=MINERS[rule](mode)))
    learn.fit(1, 1e-3)
    check_trained(learn, mode)
    assert learn.predict(reviews.text[0])[0] in ('pos', 'neg')

@pytest.mark.parametrize('mode', ['subset', 'mask'])
@pytest.mark.parametrize('rule', MINERS)
def test_language_model_learner(reviews, rule, mode):
    from fastai.text.all import TextDataLoaders, language_model_learner, AWD_LSTM
    set_seed(0)
    dls = TextDataLoaders.from_df(reviews, text_col='text', is_lm=True, valid_pct=0.25, bs=8, seq_len=10, seed=0,
                                  num_workers=0)
    learn = quiet(language_model_learner(dls, AWD_LSTM, pretrained=False, cbs=MINERS[rule](mode)))
    learn.fit(1, 1e-3)
    check_trained(learn, mode)
