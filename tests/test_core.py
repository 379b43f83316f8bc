"""Tests for `fastai_hardmine.core`: the selection rules against slow reference implementations on thousands of
seeded random draws, hand-computed adversarial cases, `LossHistory` against a `deque`, `per_sample_loss` against
sample-by-sample losses, argument checks and batch subsetting.

fastai patches tensor equality, so tensors are compared with `.tolist()`, `torch.equal` or `assert_close`."""
import math, random
from collections import deque, namedtuple
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close
from fastai.losses import (CrossEntropyLossFlat, BCEWithLogitsLossFlat, MSELossFlat, L1LossFlat,
                           LabelSmoothingCrossEntropyFlat, FocalLossFlat)

from fastai_hardmine.core import (check_unit_interval, check_top_k, batch_size, per_sample_loss, select_loss_fraction,
                                  top_k_count, select_top_k, selective_backprop_probs, select_selective_backprop,
                                  LossHistory, subset_batch)

N_DRAWS = 3000

# ---------------------------------------------------------------------------------------------------------------------
# Slow, obviously-correct references (plain Python over lists; nothing from the module under test)

def _ranking(losses):
    "Indices from highest to lowest loss, ties by lower index"
    return sorted(range(len(losses)), key=lambda i: (-losses[i], i))

def _exact(p):
    "The decimal the user wrote: 0.3 means 3/10, not the binary float nearest to it"
    return Fraction(str(p))

def ref_min_samples(min_sample_perc, n):
    return min(n, math.ceil(_exact(min_sample_perc) * n))

def ref_loss_fraction(losses, min_loss_perc, min_sample_perc):
    "Fewest highest-loss samples whose (double) running sum reaches at least min_loss_perc * total, inclusive cut"
    losses = [float(x) for x in losses]
    n, order = len(losses), _ranking(losses)
    total = 0.0
    for i in order: total += losses[i]
    if total == 0: k = n
    else:
        threshold = _exact(min_loss_perc) * Fraction(total)
        run, k = 0.0, 0
        for i in order:
            run += losses[i]
            k += 1
            if Fraction(run) >= threshold: break
    k = min(n, max(k, ref_min_samples(min_sample_perc, n)))
    return sorted(order[:k])

def ref_top_k_count(k, n):
    if isinstance(k, int): return min(k, n)
    return min(n, max(1, math.floor(_exact(k) * n + Fraction(1, 2))))  # round half up

def ref_top_k(losses, k):
    losses = [float(x) for x in losses]
    return sorted(_ranking(losses)[:ref_top_k_count(k, len(losses))])

def ref_probs(losses, history, beta):
    losses, history = [float(x) for x in losses], [float(x) for x in history]
    out = []
    for l in losses:
        below = 0
        for h in history:
            if h < l: below += 1
        out.append((below / len(history)) ** beta)
    return out

# ---------------------------------------------------------------------------------------------------------------------
# Random inputs

KINDS = ('uniform', 'exponential', 'heavy', 'int_ties', 'many_zeros', 'all_zero', 'constant', 'huge_range',
         'one_huge', 'single')

def draw_losses(rng, g, kind=None):
    "A float32 tensor of non-negative finite losses"
    kind = kind or rng.choice(KINDS)
    n = 1 if kind == 'single' else rng.randint(1, 64)
    if kind == 'single': x = torch.rand(1, generator=g) * rng.choice([0., 1., 1e30])
    elif kind == 'uniform': x = torch.rand(n, generator=g)
    elif kind == 'exponential': x = torch.empty(n).exponential_(generator=g)
    elif kind == 'heavy': x = torch.exp(torch.randn(n, generator=g) * 5)
    elif kind == 'int_ties': x = torch.randint(0, rng.choice([2, 3, 5, 10]), (n,), generator=g).float()
    elif kind == 'many_zeros': x = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.2)
    elif kind == 'all_zero': x = torch.zeros(n)
    elif kind == 'constant': x = torch.full((n,), rng.choice([0.5, 1., 3.7, 1e-20, 1e30]))
    elif kind == 'huge_range': x = torch.pow(10., torch.rand(n, generator=g, dtype=torch.float64) * 76 - 38).float()
    elif kind == 'one_huge':
        x = torch.rand(n, generator=g) * 1e-3
        x[rng.randrange(n)] = rng.choice([1e3, 1e20, 1e30])
    x = x.float()
    assert torch.isfinite(x).all() and (x >= 0).all()
    return x

def draw_min_loss_perc(rng):
    return 1.0 if rng.random() < 0.2 else 1 - rng.random()  # (0, 1]

def draw_min_sample_perc(rng):
    u = rng.random()
    if u < 0.3: return 0.0
    if u < 0.35: return 1.0
    if u < 0.6: return rng.randint(0, 10000) / 10000  # decimals whose share of n may be a whole number
    return rng.random()

def draw_k(rng):
    u = rng.random()
    if u < 0.45: return rng.randint(1, 80)
    if u < 0.5: return 1.0
    if u < 0.55: return rng.random() * 1e-3 + 1e-12
    return 1 - rng.random()

# ---------------------------------------------------------------------------------------------------------------------
# select_loss_fraction

def test_loss_fraction_matches_reference_random():
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    seen = set()
    for i in range(N_DRAWS):
        kind = KINDS[i % len(KINDS)]
        x = draw_losses(rng, g, kind)
        mlp, msp = draw_min_loss_perc(rng), draw_min_sample_perc(rng)
        got = select_loss_fraction(x, mlp, msp)
        exp = ref_loss_fraction(x.tolist(), mlp, msp)
        assert got.dtype == torch.int64
        assert got.tolist() == exp, f"draw {i} ({kind}): losses={x.tolist()!r}, min_loss_perc={mlp!r}, " \
                                    f"min_sample_perc={msp!r}: got {got.tolist()}, expected {exp}"
        seen.add((kind, len(exp) == len(x), len(exp) == 1))
    # the draws reach both extremes (one sample kept, all kept) as well as the middle
    assert {s[1] for s in seen} == {True, False} and {s[2] for s in seen} == {True, False}

LOSS_FRACTION_CASES = [
    # (losses, min_loss_perc, min_sample_perc, expected) -- computed by hand
    ([1., 6., 0., 3.], 0.6, 0., [1]),                  # 6 is exactly 60% of 10: inclusive cut
    ([1., 6., 0., 3.], 0.61, 0., [1, 3]),
    ([1., 6., 0., 3.], 1.0, 0., [0, 1, 3]),            # the zero adds nothing
    ([3., 1., 3., 1., 2.], 0.3, 0., [0]),              # 3 of 10
    ([3., 1., 3., 1., 2.], 0.31, 0., [0, 2]),          # tie at the cut: the lower index goes first
    ([3., 1., 3., 1., 2.], 0.6, 0., [0, 2]),
    ([3., 1., 3., 1., 2.], 0.8, 0., [0, 2, 4]),
    ([3., 1., 3., 1., 2.], 0.81, 0., [0, 1, 2, 4]),    # of the tied 1s, index 1 before index 3
    ([3., 1., 3., 1., 2.], 0.9, 0., [0, 1, 2, 4]),
    ([3., 1., 3., 1., 2.], 0.91, 0., [0, 1, 2, 3, 4]),
    ([2., 2., 2.], 0.5, 0., [0, 1]),                   # all equal
    ([5., 5., 5., 5.], 0.5, 0., [0, 1]),
    ([5., 5., 5., 5.], 0.51, 0., [0, 1, 2]),
    ([5., 5., 5., 5.], 1.0, 0., [0, 1, 2, 3]),
    ([0., 0., 0., 0., 0.], 0.1, 0., [0, 1, 2, 3, 4]),  # all zero: keep all
    ([0., 0., 0., 0., 0.], 1.0, 0., [0, 1, 2, 3, 4]),
    ([0.], 0.5, 0., [0]),                              # one sample
    ([3.], 0.01, 0., [0]),
    ([3.], 1.0, 1.0, [0]),
    ([1e-3] * 4 + [1e30] + [1e-3] * 5, 0.5, 0., [4]),  # one huge loss among tiny ones
    ([1e-3] * 4 + [1e3] + [1e-3] * 5, 0.99999, 0., [4]),
    ([1e-3] * 4 + [1e3] + [1e-3] * 5, 1.0, 0., list(range(10))),
    ([0., 4., 0., 1., 0.], 1.0, 0., [1, 3]),           # min_loss_perc=1: trailing zeros not kept...
    ([0., 4., 0., 1., 0.], 1.0, 0.6, [0, 1, 3]),       # ...unless min_sample_perc asks (3 of 5; zeros by index)
    ([0., 4., 0., 1., 0.], 1.0, 0.61, [0, 1, 2, 3]),   # ceil(3.05) = 4
    ([10., 1., 1., 1.], 0.5, 0., [0]),
    ([10., 1., 1., 1.], 0.5, 0.5, [0, 1]),             # min_sample_perc forces more samples
    ([10., 1., 1., 1.], 0.5, 0.51, [0, 1, 2]),
    ([10., 1., 1., 1.], 0.5, 1.0, [0, 1, 2, 3]),
    ([10.] + [0.] * 9, 0.1, 0.3, [0, 1, 2]),           # 0.3 * 10 is 3 samples, not 4
    ([10.] + [0.] * 9, 0.1, 0.7, list(range(7))),      # 0.7 * 10 = 7.000000000000001 in floats: still 7
    ([10.] + [0.] * 99, 0.1, 0.07, list(range(7))),    # 0.07 * 100 = 7.000000000000001: still 7
    ([1., 2., 3., 4., 5., 6.], 1.0, 0., [0, 1, 2, 3, 4, 5]),  # every nonzero loss is needed for 100%
    ([1., 2., 3., 4., 5., 6.], 0.95, 0., [1, 2, 3, 4, 5]),    # 20 >= 19.95
    ([1., 2., 3., 4., 5., 6.], 0.96, 0., [0, 1, 2, 3, 4, 5]),
]

@pytest.mark.parametrize('losses,mlp,msp,expected', LOSS_FRACTION_CASES)
def test_loss_fraction_hand_cases(losses, mlp, msp, expected):
    got = select_loss_fraction(torch.tensor(losses), mlp, msp).tolist()
    assert got == expected, f"losses={losses}, min_loss_perc={mlp}, min_sample_perc={msp}: got {got}"
    assert ref_loss_fraction(torch.tensor(losses).tolist(), mlp, msp) == expected  # the reference agrees

@pytest.mark.parametrize('losses,mlp,expected', [
    ([7., 7., 7., 4.], 0.28, [0]),        # 7 is exactly 28% of 25, but 0.28 * 25 = 7.000000000000001 in floats
    ([7., 7., 7., 4.], 0.56, [0, 1]),     # 14 is exactly 56% of 25, 0.56 * 25 = 14.000000000000002
    ([7.] * 7 + [1.], 0.14, [0]),         # 7 of 50, 0.14 * 50 = 7.000000000000001
])
def test_loss_fraction_decimal_share_reached_exactly_is_inclusive(losses, mlp, expected):
    "The inclusive cut must not depend on float noise in `min_loss_perc * total` (as `_ceil` already ensures for `min_sample_perc`)"
    got = select_loss_fraction(torch.tensor(losses), mlp).tolist()
    assert got == expected, f"losses={losses}, min_loss_perc={mlp}: got {got}, expected {expected}"

def test_loss_fraction_decimal_shares_integer_losses_sweep():
    "Integer losses and percentages written as decimals (0.01 .. 1.00), against the exact reference"
    cases = [(torch.ones(n), i / 100) for n in range(1, 101) for i in range(1, 101)]  # p * n samples exactly
    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    cases += [(torch.randint(0, rng.choice([3, 8, 20]), (rng.randint(1, 64),), generator=g).float(), rng.randint(1, 100) / 100)
              for _ in range(N_DRAWS)]
    bad = []
    for x, mlp in cases:
        got, exp = select_loss_fraction(x, mlp).tolist(), ref_loss_fraction(x.tolist(), mlp, 0.)
        if got != exp: bad.append((x.tolist() if len(x) <= 12 else f'{len(x)} losses, sum {x.sum().item()}', mlp, len(got), len(exp)))
    assert not bad, f"{len(bad)} mismatches of {len(cases)}, e.g. (losses, min_loss_perc, kept, expected kept): {bad[:3]}"

def test_loss_fraction_result_properties():
    rng, g = random.Random(2), torch.Generator().manual_seed(2)
    for _ in range(300):
        x = draw_losses(rng, g)
        mlp, msp = draw_min_loss_perc(rng), draw_min_sample_perc(rng)
        got = select_loss_fraction(x, mlp, msp).tolist()
        assert got == sorted(set(got)) and 1 <= len(got) <= len(x) and all(0 <= i < len(x) for i in got)
        kept = sum(x.double()[got].tolist())
        assert kept >= mlp * sum(x.double().tolist()) * (1 - 1e-12), (x.tolist(), mlp, msp, got)
        assert len(got) >= ref_min_samples(msp, len(x))

def test_loss_fraction_more_loss_keeps_more():
    x = torch.tensor([0.3, 5., 0.1, 2., 2., 0.7, 1.1, 0., 4.])
    sizes = [len(select_loss_fraction(x, p / 100)) for p in range(1, 101)]
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == 8
    counts = [len(select_loss_fraction(x, 0.01, q / 100)) for q in range(0, 101)]
    assert counts == sorted(counts) and counts[-1] == 9

def test_loss_fraction_accepts_double_and_grad_losses():
    x = torch.tensor([1., 6., 0., 3.], requires_grad=True)
    assert select_loss_fraction(x * 1, 0.61).tolist() == [1, 3]
    assert select_loss_fraction(x.detach().double(), 0.61).tolist() == [1, 3]

@pytest.mark.parametrize('losses,kw,match', [
    ([1., -0.5, 2.], {}, 'non-negative'),
    ([1., 2.], {'min_loss_perc': 0}, '`min_loss_perc` must be a number in \\(0, 1\\]'),
    ([1., 2.], {'min_loss_perc': 1.01}, '`min_loss_perc`'),
    ([1., 2.], {'min_sample_perc': -0.1}, '`min_sample_perc` must be a number in \\[0, 1\\]'),
    ([1., 2.], {'min_sample_perc': 1.5}, '`min_sample_perc`'),
])
def test_loss_fraction_rejects_bad_input(losses, kw, match):
    with pytest.raises(ValueError, match=match): select_loss_fraction(torch.tensor(losses), **kw)

@pytest.mark.parametrize('fn', [lambda x: select_loss_fraction(x), lambda x: select_top_k(x, 2),
                                lambda x: select_selective_backprop(x, torch.ones(3))])
@pytest.mark.parametrize('x', [torch.zeros(0), torch.ones(2, 3), torch.tensor(1.)])
def test_rules_reject_non_1d_or_empty_losses(fn, x):
    with pytest.raises(ValueError, match='non-empty 1-D'): fn(x)

# ---------------------------------------------------------------------------------------------------------------------
# select_top_k / top_k_count

def test_top_k_matches_reference_random():
    rng, g = random.Random(3), torch.Generator().manual_seed(3)
    for i in range(N_DRAWS):
        kind = KINDS[i % len(KINDS)]
        x, k = draw_losses(rng, g, kind), draw_k(rng)
        got, exp = select_top_k(x, k), ref_top_k(x.tolist(), k)
        assert got.dtype == torch.int64
        assert got.tolist() == exp, f"draw {i} ({kind}): losses={x.tolist()!r}, k={k!r}: got {got.tolist()}, expected {exp}"
        assert top_k_count(k, len(x)) == len(exp), (k, len(x))

@pytest.mark.parametrize('losses,k,expected', [
    ([0.5, 3., 1., 3.], 2, [1, 3]),
    ([0.5, 3., 1., 3.], 1, [1]),                   # tie: lower index
    ([1., 3., 3., 2.], 2, [1, 2]),
    ([1., 3., 3., 3.], 2, [1, 2]),
    ([2., 2., 2., 2.], 3, [0, 1, 2]),              # all equal
    ([0., 0., 0.], 1, [0]),
    ([0.5, 3., 1., 3.], 0.75, [1, 2, 3]),
    ([0.5, 3., 1., 3.], 9, [0, 1, 2, 3]),          # capped at n
    ([0.5, 3., 1., 3.], 1.0, [0, 1, 2, 3]),        # float 1.0: the whole batch
    ([0.5, 3., 1., 3.], 1e-9, [1]),                # at least one
    ([0.5, 3., 1., 3.], 0.375, [1, 3]),            # 1.5 rounds up to 2
    ([0.5, 3., 1., 3.], 0.374, [1]),
    ([7.], 1, [0]), ([7.], 0.01, [0]), ([7.], 5, [0]),
    ([1e-30, 1e30, 0., 1e-20], 2, [1, 3]),
])
def test_top_k_hand_cases(losses, k, expected):
    assert select_top_k(torch.tensor(losses), k).tolist() == expected

@pytest.mark.parametrize('k,n,expected', [
    (0.25, 10, 3), (0.5, 3, 2), (0.5, 1, 1), (0.05, 10, 1), (0.15, 10, 2), (0.01, 10, 1), (0.1, 3, 1),
    (0.35, 10, 4), (0.45, 10, 5), (1.0, 7, 7), (0.999, 7, 7), (3, 2, 2), (1, 100, 1), (np.int64(4), 9, 4),
    # k * n is a half in decimals, just below it in floats: 0.29 * 50 = 14.499999999999998
    (0.29, 50, 15), (0.57, 50, 29), (0.58, 25, 15), (0.7, 45, 32),
])
def test_top_k_count_rounds_half_up(k, n, expected):
    assert top_k_count(k, n) == expected, f"top_k_count({k}, {n}): {k}*{n} = {k * n!r}"
    assert select_top_k(torch.arange(float(n)), k).tolist() == list(range(n - expected, n))

def test_top_k_count_decimal_shares_exhaustive():
    bad = [(k, n, top_k_count(k, n), ref_top_k_count(k, n))
           for k in (i / 100 for i in range(1, 101)) for n in range(1, 65) if top_k_count(k, n) != ref_top_k_count(k, n)]
    assert not bad, f"(k, n, got, expected): {bad}"

# ---------------------------------------------------------------------------------------------------------------------
# selective_backprop_probs

def test_probs_match_reference_random():
    rng, g = random.Random(4), torch.Generator().manual_seed(4)
    for i in range(N_DRAWS):
        kind = KINDS[i % len(KINDS)]
        x = draw_losses(rng, g, kind)
        u = rng.random()
        if u < 0.3: hist = torch.cat([draw_losses(rng, g, kind)[:rng.randint(0, 64)], x])  # current batch included
        elif u < 0.6: hist = draw_losses(rng, g, kind)
        else: hist = draw_losses(rng, g)
        hist = hist[torch.randperm(len(hist), generator=g)][:128]
        beta = rng.choice([0, 0.5, 1, 2, 3, 3., rng.random() * 5])
        got, exp = selective_backprop_probs(x, hist, beta), ref_probs(x.tolist(), hist.tolist(), beta)
        assert got.shape == x.shape and got.dtype == torch.float32
        assert_close(got, torch.tensor(exp), rtol=1e-5, atol=0, msg=lambda m: f"draw {i}: losses={x.tolist()!r}, "
                     f"history={hist.tolist()!r}, beta={beta!r}: got {got.tolist()}, expected {exp}\n{m}")

def test_probs_hand_cases():
    hist = torch.tensor([2., 3., 4., 5.])
    assert_close(selective_backprop_probs(torch.tensor([1., 3.5, 9.]), hist, beta=2), torch.tensor([0., 0.25, 1.]))
    # strictly below: a loss equal to history values does not count them
    assert_close(selective_backprop_probs(torch.tensor([2., 3., 5.]), torch.tensor([2., 2., 3., 5.]), beta=1),
                 torch.tensor([0., 0.5, 0.75]))
    assert_close(selective_backprop_probs(torch.tensor([3.5]), torch.tensor([1., 2., 3., 4., 5., 6., 7., 8., 9., 10.]),
                                          beta=3), torch.tensor([0.3 ** 3]))
    # beta = 0 keeps everything, even below the whole history
    assert selective_backprop_probs(torch.tensor([0., 1., 9.]), hist, beta=0).tolist() == [1., 1., 1.]
    # default beta is 3
    assert_close(selective_backprop_probs(torch.tensor([4.5]), hist), torch.tensor([(3 / 4) ** 3]))

def test_probs_ignore_grad_and_dtype():
    x = torch.tensor([1., 3.5, 9.], requires_grad=True) * 1
    p = selective_backprop_probs(x, torch.tensor([2., 3., 4., 5.], dtype=torch.float64), 1)
    assert not p.requires_grad and p.dtype == torch.float32 and p.tolist() == [0., 0.5, 1.]

@pytest.mark.parametrize('beta', [-1, -1e-9, float('nan'), True, '3', None])
def test_probs_reject_bad_beta(beta):
    with pytest.raises(ValueError, match='`beta` must be a number >= 0'):
        selective_backprop_probs(torch.ones(3), torch.ones(3), beta)

@pytest.mark.parametrize('hist', [torch.zeros(0), torch.ones(2, 2), torch.tensor(1.)])
def test_probs_reject_bad_history(hist):
    with pytest.raises(ValueError, match='`history` must be a non-empty 1-D'):
        selective_backprop_probs(torch.ones(3), hist, 1.)

# ---------------------------------------------------------------------------------------------------------------------
# select_selective_backprop

def test_selective_backprop_never_empty_sorted_unique():
    rng, g, gen = random.Random(5), torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    for i in range(1000):
        x, hist = draw_losses(rng, g), draw_losses(rng, g)
        beta = rng.choice([1., 3., 10., 50.])
        got = select_selective_backprop(x, hist, beta, gen).tolist()
        p = ref_probs(x.tolist(), hist.tolist(), beta)
        assert got and got == sorted(set(got)) and all(0 <= j < len(x) for j in got), (x.tolist(), hist.tolist(), got)
        top = _ranking(x.tolist())[0]
        # only samples with a chance to be drawn, or the highest loss as the fallback
        assert all(p[j] > 0 or j == top for j in got), (x.tolist(), hist.tolist(), beta, got)

def test_selective_backprop_beta_zero_keeps_everything():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64):
        x = torch.rand(n, generator=g)
        assert select_selective_backprop(x, x + 10, 0, g).tolist() == list(range(n))

def test_selective_backprop_deterministic_for_a_seed():
    x, hist = torch.rand(50, generator=torch.Generator().manual_seed(1)), torch.rand(300)
    runs = [[select_selective_backprop(x, hist, 1., torch.Generator().manual_seed(s)).tolist() for s in (7, 7, 8)]
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0][0] == runs[0][1] and runs[0][0] != runs[0][2]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [select_selective_backprop(x, hist, 2., g1).tolist() for _ in range(5)] == \
           [select_selective_backprop(x, hist, 2., g2).tolist() for _ in range(5)]

@pytest.mark.parametrize('losses,hist,expected', [
    ([1., 1., 1.], [1., 1., 5.], [0]),            # nothing strictly below: every probability is 0
    ([0.5, 2., 2., 1.], [2., 3.], [1]),           # the first of the tied highest losses
    ([0., 0.], [5.], [0]),
    ([3.], [3.], [0]),
])
def test_selective_backprop_all_zero_probs_keeps_first_argmax(losses, hist, expected):
    x, h = torch.tensor(losses), torch.tensor(hist)
    assert max(ref_probs(losses, hist, 3.)) == 0
    g = torch.Generator().manual_seed(0)
    for _ in range(50): assert select_selective_backprop(x, h, 3., g).tolist() == expected

@pytest.mark.parametrize('losses,beta', [([0.5, 2.5, 4.5, 6.5, 8.5], 1.), ([8.5, 0.5, 5., 5., 3.], 1.5)])
def test_selective_backprop_keep_frequencies(losses, beta):
    "Independent draws with the reference probabilities; the highest loss also gets the 'none kept' fallback"
    hist, n_draws = torch.arange(10.), 20000
    p = ref_probs(losses, hist.tolist(), beta)
    top = _ranking(losses)[0]
    none_drawn = math.prod(1 - q for q in p)
    expected = [q + (none_drawn if j == top else 0) for j, q in enumerate(p)]
    g, x = torch.Generator().manual_seed(11), torch.tensor(losses)
    counts, both01 = [0] * len(losses), 0
    for _ in range(n_draws):
        kept = select_selective_backprop(x, hist, beta, g).tolist()
        for j in kept: counts[j] += 1
        both01 += 0 in kept and 1 in kept
    for j, (c, e) in enumerate(zip(counts, expected)):
        tol = 5 * math.sqrt(e * (1 - e) / n_draws) + 1e-3
        assert abs(c / n_draws - e) <= tol, f"sample {j}: kept {c / n_draws:.4f} of draws, expected {e:.4f} ± {tol:.4f}"
    e01 = p[0] * p[1] if top not in (0, 1) else None
    if e01 is not None:  # independence of the draws
        assert abs(both01 / n_draws - e01) <= 5 * math.sqrt(e01 * (1 - e01) / n_draws) + 1e-3

# ---------------------------------------------------------------------------------------------------------------------
# LossHistory

def test_loss_history_matches_deque_random():
    rng = random.Random(7)
    for trial in range(300):
        size = rng.randint(1, 20)
        h, ref = LossHistory(size), deque(maxlen=size)
        for step in range(rng.randint(1, 15)):
            m = rng.choice([0, 1, 1, 2, size - 1, size, size + 1, 2 * size + 3, rng.randint(0, 3 * size)])
            batch = [float(rng.randint(0, 10 ** 6)) for _ in range(max(m, 0))]
            h.update(torch.tensor(batch))
            ref.extend(batch)
            assert sorted(h.values.tolist()) == sorted(ref), \
                f"trial {trial} step {step}: size={size}, last update {batch}: got {h.values.tolist()}, expected {list(ref)}"
            assert h.count == len(ref) and h.values.dtype == torch.float32

def test_loss_history_basics():
    h = LossHistory(4)
    h.update(torch.tensor([1., 2., 3.]))
    assert sorted(h.values.tolist()) == [1., 2., 3.]
    h.update(torch.tensor([4., 5.]))
    assert sorted(h.values.tolist()) == [2., 3., 4., 5.]
    h.update(torch.tensor([[6., 7.], [8., 9.], [10., 11.]], dtype=torch.float64, requires_grad=True))  # flattened
    assert sorted(h.values.tolist()) == [8., 9., 10., 11.]
    assert not h.values.requires_grad and h.values.dtype == torch.float32
    h.update(torch.tensor([12, 13]))  # ints become floats
    assert sorted(h.values.tolist()) == [10., 11., 12., 13.]

def test_loss_history_size_one():
    h = LossHistory(1)
    for v in ([3.], [4., 5.], [], [6.]):
        h.update(torch.tensor(v))
    assert h.values.tolist() == [6.]

def test_loss_history_reset():
    h = LossHistory(3)
    h.update(torch.tensor([1., 2., 3., 4.]))
    h.reset()
    h.update(torch.tensor([9.]))
    assert h.values.tolist() == [9.]
    h.update(torch.tensor([7., 8.]))
    assert sorted(h.values.tolist()) == [7., 8., 9.]
    h.reset()
    h.update(torch.tensor([5., 6.]))
    assert sorted(h.values.tolist()) == [5., 6.]

def test_loss_history_values_empty_before_any_update():
    "A fresh (or reset) history holds no losses: `values` should be empty, not raise"
    h = LossHistory(4)
    assert h.values.numel() == 0
    h.update(torch.tensor([1.]))
    h.reset()
    assert h.values.numel() == 0

@pytest.mark.parametrize('size', [0, -1, 1.5, True, False, '3', None, 2.0])
def test_loss_history_rejects_bad_size(size):
    with pytest.raises(ValueError, match='`history_size` must be an int >= 1'): LossHistory(size)

def test_loss_history_accepts_integral_sizes():
    assert LossHistory(np.int64(3)).size == 3 and type(LossHistory(np.int64(3)).size) is int
    assert LossHistory().size == 1024

# ---------------------------------------------------------------------------------------------------------------------
# per_sample_loss

def _ce_cls(g):  return torch.randn(6, 5, generator=g), (torch.randint(0, 5, (6,), generator=g),)
def _ce_seg(g):  return torch.randn(4, 3, 5, 6, generator=g), (torch.randint(0, 3, (4, 5, 6), generator=g),)
def _ce_seq(g):  return torch.randn(4, 7, 5, generator=g), (torch.randint(0, 5, (4, 7), generator=g),)
def _ce_seq_ct(g): return torch.randn(4, 5, 7, generator=g), (torch.randint(0, 5, (4, 7), generator=g),)
def _multilabel(g): return torch.randn(6, 4, generator=g), ((torch.rand(6, 4, generator=g) < 0.5).float(),)
def _soft_multilabel(g): return torch.randn(6, 4, generator=g), (torch.rand(6, 4, generator=g),)
def _reg_k(g):   return torch.randn(6, 3, generator=g), (torch.randn(6, 3, generator=g),)
def _reg_1(g):   return torch.randn(6, generator=g), (torch.randn(6, generator=g),)
def _one(g):     return torch.randn(1, 5, generator=g), (torch.randint(0, 5, (1,), generator=g),)

PER_SAMPLE_CASES = {
    'CrossEntropyLossFlat-cls': (CrossEntropyLossFlat, _ce_cls),
    'CrossEntropyLossFlat-seg-axis1': (lambda: CrossEntropyLossFlat(axis=1), _ce_seg),
    'CrossEntropyLossFlat-seq': (CrossEntropyLossFlat, _ce_seq),   # classes on the last axis: axis=-1, the default
    'CrossEntropyLossFlat-one-sample': (CrossEntropyLossFlat, _one),
    'BCEWithLogitsLossFlat-multilabel': (BCEWithLogitsLossFlat, _multilabel),
    'BCEWithLogitsLossFlat-soft': (BCEWithLogitsLossFlat, _soft_multilabel),
    'MSELossFlat-k': (MSELossFlat, _reg_k),
    'MSELossFlat-1': (MSELossFlat, _reg_1),
    'L1LossFlat-k': (L1LossFlat, _reg_k),
    'LabelSmoothingCrossEntropyFlat-cls': (LabelSmoothingCrossEntropyFlat, _ce_cls),
    'LabelSmoothingCrossEntropyFlat-seq': (LabelSmoothingCrossEntropyFlat, _ce_seq),
    'FocalLossFlat-cls': (FocalLossFlat, _ce_cls),
    'FocalLossFlat-seg-axis1': (lambda: FocalLossFlat(axis=1), _ce_seg),
    'nn.CrossEntropyLoss-cls': (nn.CrossEntropyLoss, _ce_cls),
    'nn.CrossEntropyLoss-seg': (nn.CrossEntropyLoss, _ce_seg),
    'nn.CrossEntropyLoss-seq': (nn.CrossEntropyLoss, _ce_seq_ct),
    'nn.CrossEntropyLoss-smoothing': (lambda: nn.CrossEntropyLoss(label_smoothing=0.1), _ce_cls),
    'nn.MSELoss-k': (nn.MSELoss, _reg_k),
    'nn.MSELoss-1': (nn.MSELoss, _reg_1),
    'nn.BCEWithLogitsLoss-multilabel': (nn.BCEWithLogitsLoss, _multilabel),
    'nn.L1Loss-k': (nn.L1Loss, _reg_k),
    'F.cross_entropy-cls': (lambda: F.cross_entropy, _ce_cls),
    'F.cross_entropy-seg': (lambda: F.cross_entropy, _ce_seg),
    'F.mse_loss-k': (lambda: F.mse_loss, _reg_k),
    'F.l1_loss-1': (lambda: F.l1_loss, _reg_1),
    'F.binary_cross_entropy_with_logits': (lambda: F.binary_cross_entropy_with_logits, _multilabel),
}

def _sample_by_sample(lf, pred, yb):
    return torch.stack([lf(pred[i:i + 1], *(y[i:i + 1] for y in yb)) for i in range(len(pred))]).float()

@pytest.mark.parametrize('name', list(PER_SAMPLE_CASES))
def test_per_sample_loss_matches_sample_by_sample(name):
    make_loss, make_batch = PER_SAMPLE_CASES[name]
    lf = make_loss()
    pred, yb = make_batch(torch.Generator().manual_seed(sum(map(ord, name))))
    n = len(pred)
    pred.requires_grad_(True)
    before = getattr(lf, 'reduction', None)
    got = per_sample_loss(lf, pred, *yb)
    assert getattr(lf, 'reduction', None) == before
    assert isinstance(got, torch.Tensor) and got.shape == (n,) and got.dtype == torch.float32
    got.sum().backward()
    grad, pred.grad = pred.grad.clone(), None
    ref = _sample_by_sample(lf, pred, yb)
    assert_close(got.detach().as_subclass(torch.Tensor), ref.detach().as_subclass(torch.Tensor))
    ref.sum().backward()
    assert_close(grad, pred.grad)
    # the values are not all the same, so the comparison above tells samples apart
    assert n == 1 or ref.detach().std() > 0

@pytest.mark.parametrize('make_loss', [lambda r: nn.CrossEntropyLoss(reduction=r),
                                       lambda r: CrossEntropyLossFlat(reduction=r),
                                       lambda r: FocalLossFlat(reduction=r)], ids=['nn', 'fastai', 'focal'])
@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_per_sample_loss_restores_reduction(make_loss, reduction):
    lf = make_loss(reduction)
    pred, (targ,) = _ce_cls(torch.Generator().manual_seed(0))
    got = per_sample_loss(lf, pred, targ)
    assert lf.reduction == reduction
    # one mean loss per sample whatever the reduction (with 'sum' too: the values are per-sample means)
    assert_close(got.as_subclass(torch.Tensor), _sample_by_sample(make_loss('mean'), pred, (targ,)).as_subclass(torch.Tensor))
    with pytest.raises(ValueError, match="batch_size"):
        per_sample_loss(lf, pred, targ[:4])     # wrong target batch size: the loss raises
    assert lf.reduction == reduction
    assert getattr(lf, 'func', lf).reduction == reduction
    assert lf(pred, targ).ndim == 0           # and the loss still reduces as before

def abs_mean_loss(p, t): return (p - t).abs().mean()

class NoReductionLoss:
    def __call__(self, p, t): return (p - t).abs().mean()

@pytest.mark.parametrize('lf,name', [(lambda p, t: (p - t).abs().mean(), '<lambda>'), (abs_mean_loss, 'abs_mean_loss'),
                                     (NoReductionLoss(), 'NoReductionLoss')])
def test_per_sample_loss_without_reduction_raises(lf, name):
    pred, (targ,) = _reg_k(torch.Generator().manual_seed(0))
    with pytest.raises(TypeError) as e: per_sample_loss(lf, pred, targ)
    assert name in str(e.value) and 'per_sample_loss_func=' in str(e.value) and 'reduction' in str(e.value)

def mean_only_loss(p, t, reduction='mean'): return F.mse_loss(p, t)  # ignores `reduction`

class MeanOnlyModule(nn.Module):
    reduction = 'mean'
    def forward(self, p, t): return F.mse_loss(p, t)

@pytest.mark.parametrize('lf,name', [(mean_only_loss, 'mean_only_loss'), (MeanOnlyModule(), 'MeanOnlyModule')])
def test_per_sample_loss_scalar_for_batch_raises(lf, name):
    pred, (targ,) = _reg_k(torch.Generator().manual_seed(0))
    with pytest.raises(TypeError) as e: per_sample_loss(lf, pred, targ)
    msg = str(e.value)
    assert name in msg and 'per_sample_loss_func=' in msg and 'batch of 6' in msg
    assert getattr(lf, 'reduction', 'mean') == 'mean'
    # with one sample a scalar is one value per sample
    assert_close(per_sample_loss(lf, pred[:1], targ[:1]), F.mse_loss(pred[:1], targ[:1])[None])

@pytest.mark.parametrize('out', [lambda p, t: (p - t).abs().mean(),             # scalar
                                 lambda p, t: (p - t).abs()[:-1],               # (n-1, k)
                                 lambda p, t: (p - t).abs().T,                  # (k, n), k != n
                                 lambda p, t: (p - t).abs().flatten()[:-1],     # not a multiple of n
                                 lambda p, t: 1.5,                              # not a tensor
                                 ], ids=['scalar', 'short', 'transposed', 'ragged', 'float'])
def test_per_sample_loss_is_per_sample_bad_shapes_raise(out):
    pred, (targ,) = _reg_k(torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=r'`per_sample_loss_func` \(.+\) returned a .+ for a batch of 6 samples; expected a tensor of shape \(6,\)'):
        per_sample_loss(out, pred, targ, is_per_sample=True)

def test_per_sample_loss_is_per_sample():
    pred, (targ,) = _reg_k(torch.Generator().manual_seed(0))
    pred.requires_grad_(True)
    got = per_sample_loss(lambda p, t: ((p - t) ** 2).sum(1), pred, targ, is_per_sample=True)        # (n,)
    assert_close(got, ((pred - targ) ** 2).sum(1))
    got = per_sample_loss(lambda p, t: (p - t).abs(), pred, targ, is_per_sample=True)                # (n, k)
    assert got.shape == (6,)
    assert_close(got, (pred - targ).abs().mean(1))
    got.sum().backward()
    assert_close(pred.grad, torch.sign(pred - targ).detach() / 3)
    # a function with a `reduction` argument is called as given when is_per_sample
    assert_close(per_sample_loss(lambda p, t, reduction='mean': (p - t).abs().sum(1), pred, targ, is_per_sample=True),
                 (pred - targ).abs().sum(1))

def test_per_sample_loss_output_is_float32_for_double_losses():
    pred, (targ,) = _reg_k(torch.Generator().manual_seed(0))
    got = per_sample_loss(nn.MSELoss(), pred.double(), targ.double())
    assert got.dtype == torch.float32
    assert_close(got, ((pred - targ) ** 2).mean(1))

def test_per_sample_loss_batch_size_from_targets():
    "n comes from the targets, so a pred with a different leading layout still gets one loss per sample"
    pred, (targ,) = _ce_cls(torch.Generator().manual_seed(0))
    got = per_sample_loss(lambda p, t: F.cross_entropy(p[0], t, reduction='none'), (pred,), targ, is_per_sample=True)
    assert_close(got, F.cross_entropy(pred, targ, reduction='none'))

# ---------------------------------------------------------------------------------------------------------------------
# check_unit_interval / check_top_k

BAD_UNIT = [-0.1, 1.0001, float('nan'), float('inf'), -float('inf'), True, False, '0.5', None, [0.5]]

@pytest.mark.parametrize('value', BAD_UNIT)
@pytest.mark.parametrize('low_open', [False, True])
def test_check_unit_interval_rejects(value, low_open):
    rng = '(0, 1]' if low_open else '[0, 1]'
    with pytest.raises(ValueError) as e: check_unit_interval('min_sample_perc', value, low_open=low_open)
    assert '`min_sample_perc`' in str(e.value) and rng in str(e.value) and repr(value) in str(e.value)

def test_check_unit_interval_open_low_end():
    for v in (0, 0.0, -0.0):
        with pytest.raises(ValueError, match=r'`min_loss_perc` must be a number in \(0, 1\]'):
            check_unit_interval('min_loss_perc', v, low_open=True)

@pytest.mark.parametrize('value,low_open', [(0, False), (0.0, False), (1, False), (1.0, False), (0.5, False),
                                            (1, True), (1.0, True), (1e-300, True), (5e-324, True),
                                            (np.float64(0.25), False), (np.float32(1.0), True)])
def test_check_unit_interval_accepts_edges(value, low_open):
    out = check_unit_interval('x', value, low_open=low_open)
    assert type(out) is float and out == float(value)

@pytest.mark.parametrize('k', [0, -1, -0.1, 0.0, 1.0001, 1.5, 2.0, float('nan'), float('inf'), True, False, '0.5', '3',
                               None])
def test_check_top_k_rejects(k):
    with pytest.raises(ValueError) as e: check_top_k(k)
    msg = str(e.value)
    assert '`k`' in msg and 'positive int' in msg and '(0, 1]' in msg and repr(k) in msg

@pytest.mark.parametrize('k,expected,typ', [(1, 1, int), (3, 3, int), (10 ** 6, 10 ** 6, int), (np.int64(5), 5, int),
                                            (1.0, 1.0, float), (0.5, 0.5, float), (1e-12, 1e-12, float),
                                            (np.float64(0.25), 0.25, float)])
def test_check_top_k_accepts(k, expected, typ):
    out = check_top_k(k)
    assert out == expected and isinstance(out, typ)

def test_top_k_int_and_float_one_differ():
    "int 1 is one sample, float 1.0 the whole batch"
    assert top_k_count(1, 10) == 1 and top_k_count(1.0, 10) == 10

# ---------------------------------------------------------------------------------------------------------------------
# subset_batch

Batch = namedtuple('Batch', 'cat cont')

def _equal(a, b):
    return type(a) is type(b) and a.dtype == b.dtype and torch.equal(a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor))

@pytest.mark.parametrize('idx', [torch.tensor([0, 2, 3]), torch.tensor([4]), torch.tensor([3, 1, 1]),
                                 torch.tensor([], dtype=torch.long), torch.arange(5)])
def test_subset_batch_nested(idx):
    g = torch.Generator().manual_seed(0)
    cat, cont = torch.randint(0, 9, (5, 3), generator=g), torch.randn(5, 4, generator=g)
    y, w, img = torch.randn(5, generator=g), torch.rand(5, 1, generator=g).double(), torch.rand(5, 3, 2, 2, generator=g)
    mask, scale = torch.rand(5, generator=g) < 0.5, torch.tensor(2.)
    b = (Batch(cat, cont), [y, {'w': w, 'meta': 'abc', 'scale': scale, 'n': 5}, img], mask, None, 3, ('a', 'b'))
    out = subset_batch(b, idx)
    assert type(out) is tuple and len(out) == 6
    assert type(out[0]) is Batch and _equal(out[0].cat, cat[idx]) and _equal(out[0].cont, cont[idx])
    assert out[0].cat.dtype == torch.int64 and out[0].cont.dtype == torch.float32
    assert type(out[1]) is list and _equal(out[1][0], y[idx]) and _equal(out[1][2], img[idx])
    d = out[1][1]
    assert type(d) is dict and list(d) == ['w', 'meta', 'scale', 'n']
    assert _equal(d['w'], w[idx]) and d['meta'] == 'abc' and d['n'] == 5
    assert d['scale'] is scale                     # 0-d tensors are left alone
    assert _equal(out[2], mask[idx])
    assert out[3] is None and out[4] == 3 and out[5] == ('a', 'b')
    assert len(out[0].cat) == len(idx)
    # the input is not modified
    assert b[0].cat is cat and b[1][1]['w'] is w

def test_subset_batch_plain_tensor_and_subclass():
    from fastai.torch_core import TensorCategory, TensorImage
    x = torch.arange(10).reshape(5, 2)
    assert subset_batch(x, torch.tensor([1, 3])).tolist() == [[2, 3], [6, 7]]
    t = TensorCategory(torch.tensor([4, 3, 2, 1]))
    out = subset_batch((TensorImage(torch.rand(4, 3)), t), torch.tensor([0, 3]))
    assert isinstance(out[0], TensorImage) and isinstance(out[1], TensorCategory) and out[1].tolist() == [4, 1]
    z = torch.tensor(5.)
    assert subset_batch(z, torch.tensor([0])) is z
    assert subset_batch('text', torch.tensor([0])) == 'text'

def test_subset_batch_matches_selection_rule():
    x, y = torch.arange(8.)[:, None] * torch.ones(8, 3), torch.arange(8)
    idx = select_top_k(torch.tensor([5., 1., 7., 0., 7., 2., 3., 9.]), 3)
    xs, ys = subset_batch((x, y), idx)
    assert ys.tolist() == [2, 4, 7] and xs[:, 0].tolist() == [2., 4., 7.]

# ---------------------------------------------------------------------------------------------------------------------
# batch_size

@pytest.mark.parametrize('b,expected', [
    (torch.zeros(7, 3), 7),
    (torch.zeros(0, 3), 0),
    (torch.tensor(3.), None),
    ((torch.tensor(3.), torch.zeros(4)), 4),                 # 0-d tensors are skipped
    ([(), [torch.tensor(1)], {'a': torch.zeros(5, 2)}], 5),
    ({'x': None, 'y': [torch.zeros(2), torch.zeros(9)]}, 2),  # the first tensor wins
    (Batch(torch.zeros(6, 1), torch.zeros(3)), 6),
    ((), None), ([], None), ({}, None), (None, None), (5, None), ('abc', None), ([1, 2, 3], None),
    ((np.zeros((4, 2)), torch.zeros(3)), 3),                 # arrays are not tensors
])
def test_batch_size(b, expected):
    assert batch_size(b) == expected

def test_per_sample_loss_of_fastai_loss_is_a_plain_tensor_with_its_graph():
    "fastai losses return `TensorBase`; the rules' ops on it would each pay its Python `__torch_function__`"
    from fastai.losses import CrossEntropyLossFlat
    pred, y = torch.randn(6, 4, requires_grad=True), torch.randint(0, 4, (6,))
    losses = per_sample_loss(CrossEntropyLossFlat(), pred, y)
    assert type(losses) is torch.Tensor
    losses.sum().backward()
    expected = torch.autograd.grad(F.cross_entropy(pred, y, reduction='sum'), pred)[0]
    torch.testing.assert_close(pred.grad, expected)

@pytest.mark.parametrize('sizes', [[1], [2, 3], [4, 1, 2]])
def test_concat_batches_undoes_subset_batch(sizes):
    from fastai_hardmine.core import concat_batches
    n = sum(sizes)
    b = ((torch.arange(n)[:, None].repeat(1, 3), torch.arange(n).double()), {'y': [torch.arange(n) % 2]}, torch.tensor(7.))
    cuts = torch.arange(n).split(sizes)
    parts = [subset_batch(b, c) for c in cuts]
    out = concat_batches(parts)
    assert torch.equal(out[0][0], b[0][0]) and out[0][1].dtype == torch.float64 and torch.equal(out[0][1], b[0][1])
    assert torch.equal(out[1]['y'][0], b[1]['y'][0]) and out[2].item() == 7.
    assert type(out) is tuple and type(out[1]['y']) is list
