"""Two Learner factories for `hardmine-bench --learner`, on scikit-learn's digits (no download), run from the repository root:

    hardmine-bench --learner benchmarks.learners:digits_cnn --epochs 10 --lr 1e-2 --out nbs/results/learner_digits_cnn
    hardmine-bench --learner benchmarks.learners:wide_mlp --epochs 10 --lr 1e-3 --out nbs/results/learner_wide_mlp

`digits_cnn` is the walkthrough's model (nbs/09_will_it_pay.ipynb): a small CNN over the 8x8 images, whose step is mostly
fastai's per-item loading and loop. `wide_mlp` is its opposite, a step dominated by the backward: three hidden layers of
1024 units over batches of 512 in-memory tensors (the package's `TensorDataLoader`, which builds a batch with one
indexing), so that loading and the loop are a small share of a step and the backward, about twice the forward, the
largest part (`learn.mining_profile()` prints the shares).
"""
import torch
from torch import nn
from fastai.torch_core import set_seed
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai_hardmine.data import digits_data, digits_image_dls, tensor_dls

def _block(c_in, c_out): return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

def digits_cnn() -> Learner:
    "A small CNN on the digits images, batches of 64"
    set_seed(0)
    model = nn.Sequential(*_block(1, 32), *_block(32, 64), nn.MaxPool2d(2), *_block(64, 64), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, 10))
    return Learner(digits_image_dls(bs=64), model, CrossEntropyLossFlat(), metrics=accuracy)

def wide_mlp() -> Learner:
    "Three hidden layers of 1024 units on the digits as in-memory tensors (each image 8 times, with pixel noise), batches of 512"
    set_seed(0)
    x, y, xv, yv = digits_data()
    g = torch.Generator().manual_seed(0)
    # 8 noisy copies of each training image: enough batches per epoch for the loop to reach a steady state
    x = torch.cat([x + 0.05 * torch.randn(x.shape, generator=g) for _ in range(8)]); y = y.repeat(8)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 10))
    return Learner(tensor_dls(x, y, xv, yv, bs=512), model, CrossEntropyLossFlat(), metrics=accuracy)
