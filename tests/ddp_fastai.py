"""Run by tests/test_distributed.py under `torch.distributed.run --nproc_per_node 2`: fastai's own distributed path,
`learn.distrib_ctx()` (Hugging Face Accelerate's DDP wrap and fastai's `DistributedDL`), on the CPU. Writes each
process's final weights, records and batch contents to OUT/rank{r}.pt.

    ddp_fastai.py OUT RULE MODE STALENESS

Two things make fastai's path run on a CPU: `cpu=True`, which fastai passes on to Accelerate's `Accelerator` (a gloo
process group instead of NCCL), and `DistributedDL._broadcast` on CPU tensors: fastai's moves the index order to
CUDA (NCCL needs it there) and fails without a GPU. Nothing else of fastai's or Accelerate's is replaced."""
import os, sys
import torch
import torch.distributed as dist
from torch import nn
from fastcore.basics import noop
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.progress import ProgressCallback
import fastai.distributed
from fastai_hardmine.callback import SelectiveBackpropCallback, BatchLossFilterCallback, TopKCallback
from fastai_hardmine.data import digits_data, tensor_dls

def _cpu_broadcast(self, t, rank):
    "fastai's `DistributedDL._broadcast` with the tensor left on the CPU, where gloo takes it"
    t = torch.as_tensor(t, dtype=torch.long)
    dist.broadcast(t, rank)
    return t.tolist()
fastai.distributed.DistributedDL._broadcast = _cpu_broadcast

class BatchTargets(Callback):
    "The targets of each training batch as the process's loader gave it (before the miner cuts it)"
    order, run_valid = -10, False
    def before_fit(self): self.ys = []
    def before_train(self): self.wrapped = type(self.learn.model).__name__  # `DistributedTrainer` wraps it in before_fit
    def before_batch(self): self.ys.append(self.y.clone())

def make_rule(rule, mode, staleness):
    if rule == 'selective': return SelectiveBackpropCallback(beta=2, seed=100, mode=mode, staleness=staleness)
    if rule == 'loss_filter': return BatchLossFilterCallback(0.6, mode=mode)
    if rule == 'top_k': return TopKCallback(16, mode=mode)
    raise ValueError(rule)

def main(out, rule, mode, staleness):
    torch.set_num_threads(1)
    xt, yt, xv, yv = (torch.as_tensor(a) for a in digits_data(seed=0))
    torch.manual_seed(0)  # the same initial weights in both processes
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    # both processes load the whole training set: fastai's `DistributedDL` gives each its share of every epoch
    dls = tensor_dls(xt.float(), yt, xv.float(), yv, bs=32, device='cpu')
    cb, targets = make_rule(rule, mode, staleness), BatchTargets()
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[cb, targets])
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    with learn.distrib_ctx(sync_bn=False, cpu=True):
        learn.fit(2, 1e-2)
    rank = dist.get_rank()
    torch.save(dict(weights={k: v.detach().clone() for k, v in model.named_parameters()}, wrapped=targets.wrapped,
                    kept=cb.kept, trained=cb.trained, scored=cb.scored, ys=targets.ys,
                    times_scored=None if cb.store is None else cb.store.times_scored.clone()),
               os.path.join(out, f'rank{rank}.pt'))
    dist.destroy_process_group()

if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
    # see ddp_train.py: skip gloo's teardown at interpreter exit once everything is saved
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
