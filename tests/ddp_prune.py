"""Run by tests/test_prune_distributed.py under `torch.distributed.run --nproc_per_node 2`: each process trains its own
shard of the digits with a DDP-wrapped model and InfoBatch pruning (seeded differently per process), so the processes
keep different numbers of samples. Writes its final weights, kept counts and batch counts to OUT/rank{r}.pt.

    ddp_prune.py OUT BS"""
import os, sys
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from fastcore.basics import noop
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
from fastai_hardmine import prune
from fastai_hardmine.prune import InfoBatchCallback
from fastai_hardmine.data import digits_data, tensor_dls

class CountBatches(Callback):
    "Training batches run in each epoch"
    def __init__(self): self.batches = []
    def before_train(self): self.batches.append(0)
    def after_batch(self):
        if self.training: self.batches[-1] += 1

def main(out, bs):
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    # each process's own batch count before the processes agree, to show that they did need to
    local, agree = [], prune.across_processes
    def recording(value, op='min', device=None):
        local.append(value)
        return agree(value, op, device)
    prune.across_processes = recording
    xt, yt, xv, yv = digits_data(seed=0)
    xt, yt = xt[rank::world], yt[rank::world]
    torch.manual_seed(0)  # same initial weights on every process (DDP also broadcasts them)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10)))
    torch.manual_seed(rank)  # a different data order per process
    dls = tensor_dls(xt, yt, xv, yv, bs=bs, device='cpu')
    cb, count = InfoBatchCallback(0.5, final_phase=0.25, seed=100 + rank), CountBatches()
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[cb, count])
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    learn.fit_one_cycle(6, 1e-2)
    torch.save(dict(weights={k: v.detach().clone() for k, v in model.module.named_parameters()}, kept=cb.kept,
                    batches=count.batches, local=local, n=dls.train.n), os.path.join(out, f'rank{rank}.pt'))
    dist.destroy_process_group()

if __name__ == '__main__':
    main(sys.argv[1], int(sys.argv[2]))
    # torch 2.14's gloo teardown sometimes aborts at interpreter exit (see tests/ddp_train.py): skip the C++ static
    # destructors once everything is saved and the process group is gone
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
