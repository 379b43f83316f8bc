"Which dataset indices make up each training batch: every kind of fastai loader, and loaders that cannot be mapped."
import pytest
import torch
from fastai.torch_core import set_seed
from fastai.data.block import DataBlock
from fastai.data.load import DataLoader
from fastai.data.core import DataLoaders
from fastai.data.transforms import IndexSplitter
from fastai.distributed import DistributedDL
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.core import Callback
from torch import nn
from fastai_hardmine.batch_indices import BatchIndices, dataset_size
from fastai_hardmine.callback import SelectiveBackpropCallback
from fastai_hardmine.data import TensorDataLoader, IndexedTensors
from test_callback import quiet

def mapped_epochs(dl, contents, epochs=2):
    "For each batch of `epochs` epochs: (indices the mapping gives, dataset indices the batch really holds)"
    indices, out = BatchIndices(dl), []
    for _ in range(epochs):
        indices.new_epoch()
        for i, b in enumerate(dl):
            out.append((indices(i, len(b[0])).tolist(), contents(b)))
    return out

def check(pairs, n, bs, drop_last, shuffle):
    for got, truth in pairs: assert got == truth
    per_epoch = n // bs if drop_last else -(-n // bs)
    assert len(pairs) == 2 * per_epoch
    sizes = [len(g) for g, _ in pairs[:per_epoch]]
    assert sizes == [bs] * (n // bs) + ([] if drop_last or n % bs == 0 else [n % bs])
    first = sum((g for g, _ in pairs[:per_epoch]), [])
    second = sum((g for g, _ in pairs[per_epoch:]), [])
    if shuffle: assert first != second and first != sorted(first)
    else: assert first == second == list(range(len(first)))
    if not drop_last: assert sorted(first) == list(range(n))

@pytest.mark.parametrize('shuffle', [True, False])
@pytest.mark.parametrize('n, bs, drop_last', [(10, 4, False), (10, 4, True), (12, 4, False), (12, 4, True)])
def test_tensor_dataloader(shuffle, n, bs, drop_last):
    set_seed(0)
    dl = TensorDataLoader(IndexedTensors(torch.arange(n), torch.arange(n) * 2), bs=bs, shuffle=shuffle, drop_last=drop_last)
    check(mapped_epochs(dl, lambda b: b[0].tolist()), n, bs, drop_last, shuffle)

@pytest.mark.parametrize('shuffle', [True, False])
@pytest.mark.parametrize('drop_last', [True, False])
def test_fastai_dataloader_over_a_list(shuffle, drop_last):
    "fastai's plain `DataLoader`, collating item by item from a list of `(x, y)` tuples"
    set_seed(0)
    items = [(torch.tensor(float(i)), torch.tensor(i % 3)) for i in range(11)]
    dl = DataLoader(items, bs=3, shuffle=shuffle, drop_last=drop_last)
    check(mapped_epochs(dl, lambda b: b[0].long().tolist()), 11, 3, drop_last, shuffle)

@pytest.mark.parametrize('shuffle', [True, False])
@pytest.mark.parametrize('drop_last', [True, False])
def test_tfmddl_from_datablock(shuffle, drop_last):
    "A `DataBlock`'s training `TfmdDL` indexes its own split: index j is item `dataset.items[j]` of that split"
    items = [i * 10 for i in range(40)]
    dblock = DataBlock(get_x=lambda o: torch.tensor(float(o)), get_y=lambda o: torch.tensor(o % 3),
                       splitter=IndexSplitter(list(range(0, 40, 4))))
    set_seed(0)
    dls = dblock.dataloaders(items, bs=7, shuffle=shuffle, drop_last=drop_last, num_workers=0, device='cpu')
    dl = dls.train
    assert type(dl).__name__ == 'TfmdDL' and dataset_size(dl) == 30
    split = dl.dataset.items
    pairs = mapped_epochs(dl, lambda b: [split.index(int(v)) for v in b[0].tolist()])
    check(pairs, 30, 7, drop_last, shuffle)
    for got, _ in pairs[:2]: assert len(got) == 7

class CpuDistributedDL(DistributedDL):
    "fastai's `DistributedDL` built by hand for one rank on the CPU: its broadcast (CUDA only) returns rank 0's order"
    def _broadcast(self, t, rank): return list(t)

@pytest.mark.parametrize('drop_last', [True, False])
def test_distributed_dl_shard(drop_last):
    "Each rank's shard maps to the dataset indices its batches hold; together the shards cover the data set"
    n, world, shards = 23, 2, []
    for rank in range(world):
        set_seed(0)   # the same shuffle on every rank, as rank 0's broadcast gives in a real run
        inner = TensorDataLoader(IndexedTensors(torch.arange(n)), bs=4, shuffle=True, drop_last=drop_last)
        dl = CpuDistributedDL(inner, rank=rank, world_size=world)
        assert dataset_size(dl) == n
        pairs = mapped_epochs(dl, lambda b: b[0].tolist(), epochs=1)
        for got, truth in pairs: assert got == truth
        shards.append(sum((g for g, _ in pairs), []))
    assert shards[0] != shards[1]
    # the order is padded to a multiple of the world size, then cut into one shard per rank
    assert len(shards[0]) == len(shards[1])
    if not drop_last: assert set(shards[0]) | set(shards[1]) == set(range(n))

def test_refuses_loaders_it_cannot_map():
    x = torch.arange(10)
    with pytest.raises(TypeError, match='which a DataLoader does not give: it is not a fastai `DataLoader`.*or turn X off'):
        BatchIndices(torch.utils.data.DataLoader(x, batch_size=4), needed_by='X')
    class OwnIter(TensorDataLoader):
        def __iter__(self): yield from super().__iter__()
    with pytest.raises(TypeError, match='OwnIter does not give: it overrides `__iter__`'):
        BatchIndices(OwnIter(IndexedTensors(x), bs=4))
    with pytest.raises(TypeError, match='no batch size'): BatchIndices(DataLoader(list(range(10)), bs=None))
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self): return iter(range(10))
    with pytest.raises(TypeError, match='iterable, not indexed'): BatchIndices(DataLoader(Stream(), bs=4))

def test_refuses_language_model_loader():
    from fastai.text.data import LMDataLoader
    dl = LMDataLoader([torch.arange(50)] * 4, bs=2, seq_len=10)
    with pytest.raises(TypeError, match='language-model loader'): BatchIndices(dl, needed_by='`staleness`')

def test_skipped_item_is_caught():
    "A batch whose size disagrees with its slice of the order (an item was dropped) raises instead of misaligning"
    dl = TensorDataLoader(IndexedTensors(torch.arange(10)), bs=4)
    indices = BatchIndices(dl)
    it = iter(dl)
    next(it)
    with pytest.raises(RuntimeError, match='has 5 samples'): indices(2, 5)

def test_unmappable_loader_fails_when_fit_starts():
    "The TypeError comes before the first batch, and the Learner is left as it was"
    class OwnIter(TensorDataLoader):
        def __iter__(self): yield from super().__iter__()
    class Batches(Callback):
        def __init__(self): self.n = 0
        def before_batch(self): self.n += 1
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    dls = DataLoaders(OwnIter(IndexedTensors(x, y), bs=8, shuffle=True), TensorDataLoader(IndexedTensors(x, y), bs=8))
    seen = Batches()
    learn = quiet(Learner(dls, nn.Linear(8, 3), loss_func=CrossEntropyLossFlat(),
                          cbs=[SelectiveBackpropCallback(1, staleness=1), seen]))
    with pytest.raises(TypeError, match='`staleness` needs the dataset indices of each training batch, which a OwnIter'):
        learn.fit(1)
    assert seen.n == 0 and learn.loss_func.reduction == 'mean'
