"""Cost of the diagnostics: training epochs of a miner with them off, with the defaults (the `kept` column and the
per-epoch loss records behind the histograms) and with `track_samples=True` (per-sample counts), next to plain fastai.

Each figure is the median training time of an epoch (from `before_train` to the end of `after_train`, so the once-an-
epoch work of the column and the records is in it; validation is not) over all rounds, arms alternating every round.
The miner is Selective-Backprop (beta=1, about half of each batch kept) in subset mode. Usage:

    python benchmarks/diagnostics_cost.py [--rounds 5] [--epochs 3] [--json PATH]
"""
import argparse, json, statistics, time
from pathlib import Path
import torch
from torch import nn
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import SGD
from fastai_hardmine.callback import SelectiveBackpropCallback
from fastai_hardmine.data import TensorDataLoader, IndexedTensors
from fastai_hardmine.bench.models import ResNet1d

class EpochTimer(Callback):
    "Training time of each epoch, the callbacks' `after_train` work included"
    order = 1000
    def before_fit(self): self.times = []
    def before_train(self): self.start = time.perf_counter()
    def after_train(self): self.times.append(time.perf_counter() - self.start)

def diagnostics_off():
    cb = SelectiveBackpropCallback(1, seed=0, ignore_top=0, log_kept=False)
    cb.records.max_losses = 0
    return cb

ARMS = {'plain fastai': None,
        'miner, diagnostics off': diagnostics_off,
        'miner, default (kept column, loss records)': lambda: SelectiveBackpropCallback(1, seed=0, ignore_top=0),
        'miner, + track_samples=True': lambda: SelectiveBackpropCallback(1, seed=0, ignore_top=0, track_samples=True)}

CASES = {'1-D ResNet, 40 features, bs 128, 24 batches': (lambda: ResNet1d(64), (40,), 128, 24),
         'MLP 64-128-10, bs 64, 24 batches': (lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)),
                                              (64,), 64, 24)}

def epoch_times(make_model, x, y, bs, epochs, cb):
    dl = TensorDataLoader(IndexedTensors(x, y), bs=bs, shuffle=True, drop_last=True)
    valid = TensorDataLoader(IndexedTensors(x[:bs], y[:bs]), bs=bs)
    learn = Learner(DataLoaders(dl, valid), make_model(), loss_func=CrossEntropyLossFlat(), opt_func=SGD, lr=1e-3)
    if cb is not None: learn.add_cb(cb)
    timer = EpochTimer()
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, cbs=timer)
    return timer.times[1:]  # the first epoch pays the first calls

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=5, help='rounds, arms alternating (default 5)')
    p.add_argument('--epochs', type=int, default=3, help='epochs per measurement, the first dropped (default 3)')
    p.add_argument('--json', help='write the figures as JSON to this path')
    args = p.parse_args()
    print(f"diagnostics cost on cpu ({torch.get_num_threads()} threads), torch {torch.__version__}; median training "
          f"time per epoch of {args.rounds} rounds x {args.epochs - 1} epochs, arms alternating")
    out = {}
    for case, (make_model, shape, bs, batches) in CASES.items():
        torch.manual_seed(0)
        x, y = torch.randn(bs * batches, *shape), torch.randint(0, 10, (bs * batches,))
        times = {a: [] for a in ARMS}
        for r in range(args.rounds):
            for a in (list(ARMS) if r % 2 == 0 else list(ARMS)[::-1]):
                torch.manual_seed(r)
                times[a] += epoch_times(make_model, x, y, bs, args.epochs, ARMS[a]() if ARMS[a] else None)
        med = {a: statistics.median(t) * 1e3 for a, t in times.items()}
        out[case] = med
        off = med['miner, diagnostics off']
        print(f"\n{case}")
        for a, m in med.items(): print(f"  {a:44s} {m:8.1f} ms  {m / off:.3f}x diagnostics off")
    if args.json: Path(args.json).write_text(json.dumps(out, indent=1))

if __name__ == '__main__':
    main()
