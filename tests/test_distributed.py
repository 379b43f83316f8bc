"Every rule in both modes, and Selective-Backprop's fill_batch and staleness, under real DDP (two CPU processes, gloo): no deadlock, same weights."
import os, socket, subprocess, sys
from pathlib import Path
import pytest
import torch

CASES = [('selective', 'subset', True, 0), ('selective', 'subset', True, 1), ('selective', 'subset', False, 1),
         ('selective', 'subset', False, 0), ('selective', 'mask', False, 0), ('loss_filter', 'subset', False, 0),
         ('loss_filter', 'mask', False, 0), ('top_k_uneven', 'subset', False, 0), ('top_k_uneven', 'mask', False, 0)]

def torchrun(out, script, *args):
    "Run tests/`script` in two processes with `torch.distributed.run`, writing to `out`"
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port),
           str(Path(__file__).parent / script), str(out), *args]
    # a process that steps while the other skips waits forever in DDP's gradient all-reduce: the timeout catches it
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, 'OMP_NUM_THREADS': '1'})

@pytest.mark.parametrize('rule, mode, fill_batch, staleness', CASES)
def test_ddp_processes_step_together(tmp_path, rule, mode, fill_batch, staleness):
    res = torchrun(tmp_path, 'ddp_train.py', rule, mode, str(int(fill_batch)), str(staleness))
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1))
    # the processes kept different samples, yet took the same steps and ended with the same weights
    assert not torch.equal(r0['kept'], r1['kept'])
    assert torch.equal(r0['trained'] > 0, r1['trained'] > 0)
    if fill_batch: assert (r0['trained'] == 0).any()
    # one process keeps 48 of each batch of 64, the other 2: both still step every batch
    if rule == 'top_k_uneven': assert (r0['kept'] >= 15).all() and (r1['kept'] == 2).all() and (r1['trained'] > 0).all()
    for k in r0['weights']: torch.testing.assert_close(r0['weights'][k], r1['weights'][k], msg=k)

FASTAI_CASES = [('top_k', 'subset', 0), ('top_k', 'mask', 0), ('loss_filter', 'subset', 0), ('selective', 'subset', 1)]

@pytest.mark.parametrize('rule, mode, staleness', FASTAI_CASES)
def test_fastai_distrib_ctx_on_cpu(tmp_path, rule, mode, staleness):
    "fastai's own `learn.distrib_ctx()` (Accelerate's DDP wrap, `DistributedDL`), with gloo on the CPU: see ddp_fastai.py"
    res = torchrun(tmp_path, 'ddp_fastai.py', rule, mode, str(staleness))
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1))
    assert r0['wrapped'] == 'DistributedDataParallel'
    # `DistributedDL` gave each process its own share of each batch order, and the miner kept from it
    assert len(r0['ys']) == len(r1['ys']) == len(r0['kept']) and not torch.equal(torch.cat(r0['ys']), torch.cat(r1['ys']))
    sizes = torch.tensor([len(y) for y in r0['ys']])
    assert (r0['kept'] <= sizes).all() and r0['kept'].sum() < sizes.sum()
    if staleness:
        # the per-sample store is indexed through `DistributedDL`'s order: the second epoch reuses the first's losses
        n = len(r0['ys']) // 2
        assert r0['scored'][:n].sum() > 0 and r0['scored'][n:].sum() < r0['scored'][:n].sum()
        assert r0['times_scored'].sum() == r0['scored'].sum()
    for k in r0['weights']: torch.testing.assert_close(r0['weights'][k], r1['weights'][k], msg=k)
