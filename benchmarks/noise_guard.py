"""Label noise and the `ignore_top` guard: final error of Selective-Backprop with and without the guard at 0, 10 and 20%
of training labels flipped, next to plain fastai, on the benchmark's selective task (MNIST-1D, 1-D ResNet).

The guard never selects the top `ignore_top` share of each batch's losses, where flipped labels gather once the model
has learned the clean ones. It is judged on accuracy, so the arms need not be timed on a quiet machine; each figure is
the median final error over the repeats (each repeat flips a different 10 or 20% of the labels), with its range.
Usage:

    python benchmarks/noise_guard.py [--seeds 3] [--num-samples 4000] [--epochs 12] [--json PATH]
"""
import argparse, json, statistics
from fastai_hardmine.bench.data import bench_config
from fastai_hardmine.bench.run import run_task

GUARDS = [0., .05, .1]

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--num-samples', type=int, default=4000)
    p.add_argument('--epochs', type=int, default=12)
    p.add_argument('--json', default=None)
    args = p.parse_args()
    arms = [dict(beta=3, **({'ignore_top': g} if g else {})) for g in GUARDS]
    cfg = bench_config('selective', num_samples=args.num_samples, epochs=args.epochs, noise=[0., .1, .2], arms=arms,
                       info_batch=0, plain_budgets=[], mining_budgets=[1.])
    res = run_task('selective', cfg, args.seeds, 'cpu', 'hardmine-bench-out', show_bar=False)
    print(f"\nFinal validation error (%), median [min-max] over {args.seeds} repeats; {res['n_train']} train samples, "
          f"{cfg['epochs']} epochs, bs {cfg['bs']}")
    names = list(res['groups'][0]['arms'])
    print('| arm | ' + ' | '.join(g['label'] for g in res['groups']) + ' |')
    print('| --- |' + ' ---: |' * len(res['groups']))
    table = {}
    for n in names:
        cells = []
        for g in res['groups']:
            errs = [100 * (1 - r['final_accuracy']) for r in g['arms'][n]['runs']]
            table.setdefault(n, {})[g['label']] = errs
            cells.append(f"{statistics.median(errs):.2f} [{min(errs):.2f}-{max(errs):.2f}]")
        print(f"| {n} | " + ' | '.join(cells) + ' |')
    if args.json:
        with open(args.json, 'w') as f: json.dump(table, f, indent=1)

if __name__ == '__main__': main()
