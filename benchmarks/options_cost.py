"""Cost of a training step with the options that change a step's shape or its scoring, side by side in one run.

  buckets      Selective-Backprop (beta=1, keeps about half of each batch, a different count every batch) with the
               kept count rounded up to multiples of bs/8 (`buckets=None`, the default) against exact counts
               (`buckets=0`); plain fastai for reference. Models: the benchmark's 1-D ResNet (MNIST-1D-sized inputs,
               batch 128) and a convnet on 1x28x28 images (batch 512).
  score_scale  top_k(1/3) on 3x64x64 images scored at full size against half size (`score_scale=0.5`); plain fastai
               for reference.

Each figure is the median step time (ms) over all rounds, arms alternating every round so that drift hits them alike,
with its ratio to plain fastai. Usage:

    python benchmarks/options_cost.py [--rounds 5] [--steps 12] [--json PATH]
"""
import argparse, json, statistics, sys
from pathlib import Path
import torch
from torch import nn
from fastai_hardmine.callback import TopKCallback, SelectiveBackpropCallback
from fastai_hardmine.bench.models import ResNet1d
sys.path.insert(0, str(Path(__file__).parent))
from step_cost import fastai_steps, convnet  # noqa: E402

def image_convnet():
    def block(ni, nf): return [nn.Conv2d(ni, nf, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(nf), nn.ReLU()]
    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), *block(128, 256), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(256, 10))

CASES = {
    'buckets, 1-D ResNet, bs 128': (lambda: ResNet1d(64), (40,), 128, {
        'plain fastai': None,
        'exact counts (buckets=0)': lambda: SelectiveBackpropCallback(1, seed=0, buckets=0),
        'buckets (default, 8)': lambda: SelectiveBackpropCallback(1, seed=0)}),
    'buckets, convnet 1x28x28, bs 512': (convnet, (1, 28, 28), 512, {
        'plain fastai': None,
        'exact counts (buckets=0)': lambda: SelectiveBackpropCallback(1, seed=0, buckets=0),
        'buckets (default, 8)': lambda: SelectiveBackpropCallback(1, seed=0)}),
    'score_scale, convnet 3x64x64, bs 128': (image_convnet, (3, 64, 64), 128, {
        'plain fastai': None,
        'top_k(1/3)': lambda: TopKCallback(1 / 3),
        'top_k(1/3, score_scale=0.5)': lambda: TopKCallback(1 / 3, score_scale=0.5)}),
}

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=5, help='rounds, arms alternating (default 5)')
    p.add_argument('--steps', type=int, default=12, help='steps per measurement, the first two dropped (default 12)')
    p.add_argument('--json', help='write the figures as JSON to this path')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"options cost on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}; median ms per step "
          f"of {args.rounds} rounds x {args.steps - 2} steps, arms alternating")
    out = {}
    for case, (make_model, shape, bs, arms) in CASES.items():
        torch.manual_seed(0)
        x, y = torch.randn(bs * args.steps, *shape), torch.randint(0, 10, (bs * args.steps,))
        times = {a: [] for a in arms}
        for r in range(args.rounds):
            for a in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                cb = arms[a]() if arms[a] is not None else None
                times[a] += fastai_steps(make_model, x, y, bs, args.steps, device, cb=cb)
        med = {a: statistics.median(t) * 1e3 for a, t in times.items()}
        out[case] = med
        print(f"\n{case}")
        for a, m in med.items(): print(f"  {a:32s} {m:8.1f} ms  {m / med['plain fastai']:.2f}x plain")
    if args.json: Path(args.json).write_text(json.dumps(out, indent=1))

if __name__ == '__main__':
    main()
