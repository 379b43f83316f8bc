"""Why `selective_backprop(fill_batch=True, staleness=1)` fell short in the full benchmark run: final validation error
and optimizer steps of Selective-Backprop with and without `fill_batch` and `staleness`, at two data sizes, on the
benchmark's selective task (MNIST-1D, 1-D ResNet, 12 epochs of one-cycle, clean labels).

`fill_batch` trains only full batches of kept samples, so a fit takes about (kept share) x the steps of plain fastai
over the same one-cycle schedule. Accuracy, not time, is the question here: each figure is one seeded run. Usage:

    python benchmarks/fill_batch.py [--sizes 4000,10000] [--epochs 12]
"""
import argparse
from fastai_hardmine.bench.data import bench_config
from fastai_hardmine.bench.run import run_task

ARMS = [dict(beta=3), dict(beta=3, staleness=1), dict(beta=3, fill_batch=True), dict(beta=3, fill_batch=True, staleness=1)]

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--sizes', default='4000,10000', help='MNIST-1D samples generated (80%% train), comma-separated')
    p.add_argument('--epochs', type=int, default=12)
    args = p.parse_args()
    rows = []
    for n in map(int, args.sizes.split(',')):
        cfg = bench_config('selective', num_samples=n, epochs=args.epochs, noise=[0.], arms=ARMS, info_batch=0,
                           plain_budgets=[], mining_budgets=[1.])
        res = run_task('selective', cfg, 1, 'cpu', 'hardmine-bench-out', show_bar=False)
        batches = -(-res['n_train'] // cfg['bs'])
        for name, arm in res['groups'][0]['arms'].items():
            run = arm['runs'][0]
            trained = run['samples']['trained']
            # a fill_batch step trains one full batch (the epoch's last may hold up to two); other arms step every batch
            steps = f"~{trained // cfg['bs']}" if 'fill_batch' in name else str(args.epochs * batches)
            rows.append((res['n_train'], name, 100 * (1 - run['final_accuracy']), trained, steps))
    print(f"\nFinal validation error (%), one seeded run each, {args.epochs} epochs, bs {cfg['bs']}")
    print('| train samples | arm | error % | samples trained | steps |')
    print('| ---: | --- | ---: | ---: | ---: |')
    for r in rows: print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]} | {r[4]} |")

if __name__ == '__main__': main()
