"""Per-step cost of the callbacks in two versions of the package, side by side in one process.

Reshaping the engine must not make a step dearer. This loads a second copy of `fastai_hardmine` from
another checkout (for example `git worktree add /tmp/base <commit>`) under the name
`fastai_hardmine_baseline`, and times `benchmarks/step_cost.py`'s arms (the plain fastai step, and
top-k in subset and mask mode, Selective-Backprop with `staleness=1` in its stale epoch) with the
baseline's callbacks and this checkout's, alternating the two every round. Each cell is the fastest
round's median step (noise on this machine only ever adds time), in ms, with its ratio to the plain
fastai step. Usage:

    git worktree add /tmp/base 3f2b603
    python benchmarks/step_cost_versions.py /tmp/base [--rounds 6] [--device cpu]
"""
import argparse, importlib, shutil, statistics, sys, tempfile
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).parent))
import step_cost as sc  # noqa: E402

def load_baseline(checkout:Path):
    "The package of `checkout` imported as `fastai_hardmine_baseline` (its modules import each other relatively)"
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(checkout/'fastai_hardmine', tmp/'fastai_hardmine_baseline', ignore=shutil.ignore_patterns('__pycache__'))
    sys.path.insert(0, str(tmp))
    return importlib.import_module('fastai_hardmine_baseline.callback')

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('baseline', type=Path, help='checkout holding the baseline version (a folder with fastai_hardmine/ in it)')
    p.add_argument('--rounds', type=int, default=6, help='rounds, versions alternating (default 6)')
    p.add_argument('--steps', type=int, default=12, help='steps per measurement, the first two dropped (default 12)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()
    import fastai_hardmine.callback as current
    versions = {'baseline': load_baseline(args.baseline), 'this checkout': current}
    assert versions['baseline'].HardMiningCallback is not current.HardMiningCallback
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"step cost, batch size {sc.BS}, torch {torch.__version__} on {device} ({torch.get_num_threads()} threads); "
          f"baseline {args.baseline}; {args.rounds} rounds, versions alternating; per round the median of "
          f"{args.steps - 2} steps; the fastest round per cell, ms (ratio to plain fastai)", flush=True)
    cols = [(a, v) for a in ('subset', 'mask', 'stale') for v in versions]
    print('| model | keep | plain fastai | ' + ' | '.join(f'{a} {v}' for a, v in cols) + ' |')
    print('| --- | --- |' + ' ---: |' * (1 + len(cols)))
    for model_name, (make_model, shape) in sc.MODELS.items():
        x, y = torch.randn(sc.BS * args.steps, *shape), torch.randint(0, 10, (sc.BS * args.steps,))
        for share_name, share in sc.SHARES.items():
            k = max(1, round(share * sc.BS))
            def run(arm, v):
                if arm == 'fastai': return sc.fastai_steps(make_model, x, y, sc.BS, args.steps, device)
                if arm == 'stale':
                    cb = v.SelectiveBackpropCallback(1 / share - 1, seed=0, mode='subset', staleness=1)
                    return sc.fastai_steps(make_model, x, y, sc.BS, args.steps, device, cb=cb, epochs=2)
                return sc.fastai_steps(make_model, x, y, sc.BS, args.steps, device, v.TopKCallback(k, mode=arm))
            best = {}
            for r in range(args.rounds):
                names = list(versions) if r % 2 == 0 else list(versions)[::-1]
                for key in [('fastai', None)] + [(a, v) for a in ('subset', 'mask', 'stale') for v in names]:
                    t = statistics.median(run(key[0], versions.get(key[1])))
                    best[key] = min(best.get(key, float('inf')), t)
            base = best[('fastai', None)]
            cells = [f"{base * 1e3:.1f}"] + [f"{best[c] * 1e3:.1f} ({best[c] / base:.2f})" for c in cols]
            print(f"| {model_name.split(' (')[0]} | {share_name} | " + ' | '.join(cells) + ' |', flush=True)

if __name__ == '__main__':
    main()
