"""What each scorer costs per step, side by side in one run: the model's own scoring forward against a proxy.

For each model, at batch size 512, the median time (after warm-up, several rounds with the arms
alternating) of:

  plain step        plain fastai training step on the whole batch
  model forward     a no-grad forward of the model over the batch (what the default scorer pays)
  proxy step        the default proxy's forward and backward over the batch (what `Proxy()` pays)
  k-step            a plain fastai step on the kept half of the batch
  subset, model     fastai step with `top_k(0.5)`, scored by the model
  subset, proxy     fastai step with `top_k(0.5, scorer=Proxy(pretrain_epochs=0))`

Ratios are to the plain step. Usage:

    python benchmarks/scorer_cost.py [--steps 12] [--rounds 3] [--device cpu]
"""
import argparse, statistics, sys, time
from pathlib import Path
import torch
import torch.nn.functional as F
from fastai_hardmine.callback import TopKCallback
from fastai_hardmine.proxy import Proxy, default_proxy
from fastai_hardmine.bench.models import ResNet1d

sys.path.insert(0, str(Path(__file__).parent))
import step_cost as sc  # noqa: E402

MODELS = {'resnet1d (benchmark, MNIST-1D 40)': (lambda: ResNet1d(32), (40,)), **sc.MODELS}

def timed(fn, steps, device):
    "Per-call times of `fn` over `steps` calls, the first two dropped"
    times = []
    for _ in range(steps):
        sc.sync(device); start = time.perf_counter()
        fn()
        sc.sync(device); times.append(time.perf_counter() - start)
    return times[2:]

def model_forward(make_model, x, steps, device):
    model = make_model().to(device).train()
    xb = x[:sc.BS].to(device)
    def run():
        with torch.no_grad(): model(xb)
    return timed(run, steps, device)

def proxy_step(make_model, x, y, steps, device):
    xb, yb = x[:sc.BS].to(device), y[:sc.BS].to(device)
    with torch.no_grad(): out = make_model()(xb[:2].cpu())
    proxy = default_proxy(xb, (sc.BS, out.shape[1])).to(device).train()
    opt = torch.optim.Adam(proxy.parameters(), lr=1e-3)
    def run():
        loss = F.cross_entropy(proxy(xb), yb, reduction='none')
        opt.zero_grad(); loss.mean().backward(); opt.step()
    return timed(run, steps, device)

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=12, help='steps per measurement, the first two dropped (default 12)')
    p.add_argument('--rounds', type=int, default=3, help='rounds, arms alternating (default 3)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"scorer cost, batch size {sc.BS}, keep 1/2, torch {torch.__version__} on {device} ({torch.get_num_threads()} "
          f"threads); median ms per step of {args.rounds} rounds x {args.steps - 2} steps (ratio to the plain step)")
    print('| model | plain step | model forward | proxy step | k-step | subset, model | subset, proxy |')
    print('| --- |' + ' ---: |' * 6)
    k = sc.BS // 2
    for name, (make_model, shape) in MODELS.items():
        x, y = torch.randn(sc.BS * args.steps, *shape), torch.randint(0, 10, (sc.BS * args.steps,))
        arms = {
            'plain step': lambda: sc.fastai_steps(make_model, x, y, sc.BS, args.steps, device),
            'model forward': lambda: model_forward(make_model, x, args.steps, device),
            'proxy step': lambda: proxy_step(make_model, x, y, args.steps, device),
            'k-step': lambda: sc.fastai_steps(make_model, x[:k * args.steps], y[:k * args.steps], k, args.steps, device),
            'subset, model': lambda: sc.fastai_steps(make_model, x, y, sc.BS, args.steps, device, TopKCallback(k)),
            'subset, proxy': lambda: sc.fastai_steps(make_model, x, y, sc.BS, args.steps, device,
                                                     TopKCallback(k, scorer=Proxy(pretrain_epochs=0, seed=0))),
        }
        times = {a: [] for a in arms}
        for _ in range(args.rounds):
            for a, run in arms.items(): times[a] += run()
        med = {a: statistics.median(t) for a, t in times.items()}
        base = med['plain step']
        print(f"| {name} | " + ' | '.join(f"{med[a] * 1e3:.1f}" + ('' if a == 'plain step' else f" ({med[a] / base:.2f})")
                                          for a in arms) + ' |')

if __name__ == '__main__':
    main()
