"""Cost of one training step with and without hard mining, side by side in one run.

For each model and keep share, the median time of one step (after warm-up, several rounds with the
arms alternating so that machine drift hits them alike) of:

  fastai      plain fastai step on the whole batch (no callback)
  floor       plain PyTorch: no-grad forward of the batch + training step on the kept samples
  subset      fastai step with TopKCallback(k, mode='subset')
  mask        fastai step with TopKCallback(k, mode='mask')
  stale       fastai step with SelectiveBackpropCallback(beta, mode='subset', staleness=1) in its second
              epoch, where every loss comes from the first epoch's table (no scoring forward); beta =
              1/keep - 1, so that the expected kept share, 1/(beta+1), is the row's keep share (the share
              it really kept is printed)
  k-step      fastai step on a batch of k samples: a plain step of the kept size, for reference

Ratios are to the plain fastai step, and subset/floor. Usage:

    python benchmarks/step_cost.py [--json PATH] [--steps 12] [--rounds 3] [--device cpu]
"""
import argparse, json, statistics, time
import torch
from torch import nn
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback  # noqa: F401 (adds Learner.no_bar)
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import SGD
from fastai_hardmine.callback import TopKCallback, SelectiveBackpropCallback
from fastai_hardmine.data import TensorDataLoader, IndexedTensors

BS = 512
SHARES = {'1': 1., '3/4': 0.75, '1/2': 0.5, '1/3': 1 / 3, '1/8': 1 / 8}

def mlp(): return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 10))

def convnet():
    def block(ni, nf): return [nn.Conv2d(ni, nf, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(nf), nn.ReLU()]
    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))

MODELS = {'mlp 784-1024-10': (mlp, (784,)), 'convnet 1x28x28 (BatchNorm)': (convnet, (1, 28, 28))}

def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()

class StepTimer(Callback):
    "Times each training step from the first `before_batch` to the last `after_batch`"
    order = -1000
    def __init__(self, device): self.device, self.times = device, []
    def before_batch(self):
        if self.training: sync(self.device); self.start = time.perf_counter()

class StepTimerEnd(Callback):
    order = 1000
    def __init__(self, timer): self.timer = timer
    def after_batch(self):
        if self.training:
            sync(self.timer.device)
            self.timer.times.append(time.perf_counter() - self.timer.start)

def fastai_steps(make_model, x, y, bs, steps, device, cb=None, epochs=1):
    "Per-step times of the last epoch's `steps` fastai training steps (the first two are warm-up and dropped)"
    dl = TensorDataLoader(IndexedTensors(x, y), bs=bs, shuffle=True, drop_last=True, device=device)
    valid = TensorDataLoader(IndexedTensors(x[:bs], y[:bs]), bs=bs, device=device)
    learn = Learner(DataLoaders(dl, valid, device=device), make_model().to(device), loss_func=CrossEntropyLossFlat(),
                    opt_func=SGD, lr=1e-3)
    if cb is not None: learn.add_cb(cb)
    timer = StepTimer(device)
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs, cbs=[timer, StepTimerEnd(timer)])
    if cb is not None and epochs > 1: fastai_steps.kept_share = cb.kept[-len(dl):].sum().item() / (bs * len(dl))
    return timer.times[-len(dl):][2:]

def floor_steps(make_model, x, y, k, steps, device):
    "Per-step times in plain PyTorch: no-grad forward of the batch, then a training step on its top k"
    model = make_model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps):
        xb, yb = x[i * BS:(i + 1) * BS].to(device), y[i * BS:(i + 1) * BS].to(device)
        sync(device); start = time.perf_counter()
        if k < BS:
            with torch.no_grad(): losses = F.cross_entropy(model(xb), yb, reduction='none')
            idx = losses.topk(k).indices
            xb, yb = xb[idx], yb[idx]
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step(); opt.zero_grad()
        sync(device); times.append(time.perf_counter() - start)
    return times[2:]

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--json', help='write the table as JSON to this path')
    p.add_argument('--steps', type=int, default=12, help='steps per measurement, the first two dropped (default 12)')
    p.add_argument('--rounds', type=int, default=3, help='rounds, arms alternating (default 3)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='torch device (default: cuda when available, else cpu)')
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"step cost, batch size {BS}, torch {torch.__version__} on {device} ({torch.get_num_threads()} threads); "
          f"median seconds per step of {args.rounds} rounds x {args.steps - 2} steps")
    results = []
    for model_name, (make_model, shape) in MODELS.items():
        x, y = torch.randn(BS * args.steps, *shape), torch.randint(0, 10, (BS * args.steps,))
        for share_name, share in SHARES.items():
            k = max(1, round(share * BS))
            arms = {
                'fastai': lambda: fastai_steps(make_model, x, y, BS, args.steps, device),
                'floor': lambda: floor_steps(make_model, x, y, k, args.steps, device),
                'subset': lambda: fastai_steps(make_model, x, y, BS, args.steps, device, TopKCallback(k, mode='subset')),
                'mask': lambda: fastai_steps(make_model, x, y, BS, args.steps, device, TopKCallback(k, mode='mask')),
                'stale': lambda: fastai_steps(make_model, x, y, BS, args.steps, device, epochs=2, cb=SelectiveBackpropCallback(
                    1 / share - 1, seed=0, mode='subset', staleness=1)),
                'k-step': lambda: fastai_steps(make_model, x[:k * args.steps], y[:k * args.steps], k, args.steps, device),
            }
            times, stale_kept = {a: [] for a in arms}, []
            for _ in range(args.rounds):
                for a, run in arms.items():
                    fastai_steps.kept_share = 1.
                    times[a] += run()
                    if a == 'stale': stale_kept.append(fastai_steps.kept_share)
            med = {a: statistics.median(t) for a, t in times.items()}
            row = dict(model=model_name, keep=share_name, k=k, **{f'{a}_s': v for a, v in med.items()},
                       subset_vs_fastai=med['subset'] / med['fastai'], subset_vs_floor=med['subset'] / med['floor'],
                       mask_vs_fastai=med['mask'] / med['fastai'], stale_vs_fastai=med['stale'] / med['fastai'],
                       stale_kept_share=statistics.mean(stale_kept), kstep_vs_fastai=med['k-step'] / med['fastai'])
            results.append(row)
    head = ('| model | keep | fastai (ms) | floor (ms) | subset (ms) | mask (ms) | stale (ms) | k-step (ms) | subset/fastai | '
            'subset/floor | mask/fastai | stale/fastai (kept) | k-step/fastai |')
    print(head)
    print('|' + ' --- |' * 2 + ' ---: |' * 11)
    for r in results:
        print(f"| {r['model']} | {r['keep']} | {r['fastai_s']*1e3:.1f} | {r['floor_s']*1e3:.1f} | {r['subset_s']*1e3:.1f} | "
              f"{r['mask_s']*1e3:.1f} | {r['stale_s']*1e3:.1f} | {r['k-step_s']*1e3:.1f} | {r['subset_vs_fastai']:.2f} | "
              f"{r['subset_vs_floor']:.2f} | {r['mask_vs_fastai']:.2f} | {r['stale_vs_fastai']:.2f} ({r['stale_kept_share']:.2f}) | "
              f"{r['kstep_vs_fastai']:.2f} |")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(), batch_size=BS,
                           rounds=args.rounds, steps=args.steps - 2, results=results), f, indent=1)

if __name__ == '__main__':
    main()
