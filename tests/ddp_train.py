"""Run by tests/test_distributed.py under `torch.distributed.run --nproc_per_node 2`: each process trains its own
shard of the digits with a DDP-wrapped model and one hard-mining rule, so the processes keep different numbers of
samples per batch. Writes its final weights and records to OUT/rank{r}.pt.

    ddp_train.py OUT RULE MODE FILL_BATCH STALENESS

RULE: 'selective' (seeded differently per process), 'loss_filter', or 'top_k_uneven' (process 0 keeps 48 of each
batch, process 1 keeps 2)."""
import os, sys
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from fastcore.basics import noop
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.progress import ProgressCallback
from fastai_hardmine.callback import SelectiveBackpropCallback, BatchLossFilterCallback, TopKCallback
from fastai_hardmine.data import digits_data, tensor_dls

def make_rule(rule, rank, mode, fill_batch, staleness):
    if rule == 'selective':
        return SelectiveBackpropCallback(beta=2, seed=100 + rank, mode=mode, fill_batch=fill_batch, staleness=staleness)
    if rule == 'loss_filter': return BatchLossFilterCallback(0.6, mode=mode)
    if rule == 'top_k_uneven': return TopKCallback(48 if rank == 0 else 2, mode=mode)
    raise ValueError(rule)

def main(out, rule, mode, fill_batch, staleness):
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    xt, yt, xv, yv = digits_data(seed=0)
    xt, yt = torch.as_tensor(xt, dtype=torch.float32)[rank::world], torch.as_tensor(yt)[rank::world]
    torch.manual_seed(0)  # same initial weights on every process (DDP also broadcasts them)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10)))
    torch.manual_seed(rank)  # a different data order per process
    dls = tensor_dls(xt, yt, torch.as_tensor(xv, dtype=torch.float32), torch.as_tensor(yv), bs=64, device='cpu')
    cb = make_rule(rule, rank, mode, fill_batch, staleness)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=cb)
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    learn.fit(3, 1e-2)
    torch.save(dict(weights={k: v.detach().clone() for k, v in model.module.named_parameters()},
                    kept=cb.kept, trained=cb.trained, scored=cb.scored), os.path.join(out, f'rank{rank}.pt'))
    dist.destroy_process_group()

if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == '1', int(sys.argv[5]))
    # torch 2.14's gloo teardown sometimes aborts at interpreter exit ("terminate called without an active
    # exception", seen in about 1 run of 10 here, with the results already written): skip the C++ static
    # destructors once everything is saved and the process group is gone
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
