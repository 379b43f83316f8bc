"""Wall time and accuracy of plain fastai vs InfoBatch pruning (`learn.info_batch`), side by side in one run.

Task: MNIST-1D (generated locally), the package's 1-D ResNet, Adam, `fit_one_cycle`. Arms:

  plain       plain fastai, `--epochs` epochs
  info_batch  `learn.info_batch(--ratio, --final)`, `--epochs` epochs
  plain-short plain fastai with as many epochs as info_batch's sample passes, rounded (the same data budget)

The arms are interleaved and their order rotates every repeat; every run is seeded, so accuracies are the same in
every repeat. Time: each epoch's fastest duration over the repeats (noise only adds time), summed. Usage:

    python benchmarks/prune_cost.py [--epochs 12] [--repeats 2] [--samples 10000] [--bs 128] [--ratio 0.5] [--final 0.125]
"""
import argparse, time
import torch
from fastcore.basics import noop
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import Adam
from fastai.torch_core import set_seed
from fastai_hardmine.bench.data import mnist1d_data
from fastai_hardmine.bench.models import ResNet1d
from fastai_hardmine.data import tensor_dls
import fastai_hardmine.prune  # noqa: F401 (patches Learner.info_batch)

class EpochTimes(Callback):
    "Wall time of each epoch's training and validation"
    order = 100
    def __init__(self): self.times = []
    def before_epoch(self): self.start = time.perf_counter()
    def after_epoch(self): self.times.append(time.perf_counter() - self.start)

def run(data, epochs, bs, lr, ratio=None, final=0.125):
    set_seed(0)
    timer = EpochTimes()
    learn = Learner(tensor_dls(*data, bs=bs, device='cpu'), ResNet1d(64), loss_func=CrossEntropyLossFlat(), opt_func=Adam,
                    metrics=accuracy, cbs=timer)
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    if ratio is not None: learn.info_batch(ratio, final, seed=0)
    learn.fit_one_cycle(epochs, lr)
    acc = float(learn.recorder.values[-1][2])
    kept = learn.info_batch_pruner.kept.sum().item() if ratio is not None else epochs * learn.dls.train.n
    return timer.times, acc, kept

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--epochs', type=int, default=12); p.add_argument('--repeats', type=int, default=2)
    p.add_argument('--samples', type=int, default=10_000); p.add_argument('--bs', type=int, default=128)
    p.add_argument('--lr', type=float, default=1e-2); p.add_argument('--ratio', type=float, default=0.5)
    p.add_argument('--final', type=float, default=0.125)
    a = p.parse_args()
    torch.set_num_threads(1)
    data = mnist1d_data(a.samples)
    n = len(data[0])
    # the data budget of info_batch is known only after a run: one untimed run first
    _, _, kept = run(data, a.epochs, a.bs, a.lr, a.ratio, a.final)
    short = max(1, round(kept / n))
    arms = {'plain': dict(epochs=a.epochs), 'info_batch': dict(epochs=a.epochs, ratio=a.ratio, final=a.final),
            f'plain-{short}ep': dict(epochs=short)}
    results = {name: [] for name in arms}
    names = list(arms)
    for r in range(a.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(run(data, bs=a.bs, lr=a.lr, **arms[name]))
    print(f"MNIST-1D, {n} training samples, ResNet1d(64), bs {a.bs}, fit_one_cycle lr {a.lr}, {a.repeats} repeats, "
          f"1 thread; info_batch(prune_ratio={a.ratio}, final_phase={a.final})")
    print(f"{'arm':<14}{'epochs':>7}{'samples':>10}{'time (s)':>10}{'x plain':>9}{'accuracy':>10}  per-repeat totals")
    base = None
    for name in names:
        runs = results[name]
        best = [min(t[0][e] for t in runs) for e in range(len(runs[0][0]))]
        total = sum(best)
        base = base or total
        print(f"{name:<14}{len(best):>7}{runs[0][2]:>10}{total:>10.2f}{total / base:>9.2f}{runs[0][1]:>10.4f}  "
              f"{[round(sum(t[0]), 1) for t in runs]}")

if __name__ == '__main__': main()
