"""Probe (2026-12-05): mixing a robust classifier R (v9's, then v10's, served ensemble) with an accurate one S (v1's
classifier, trained on clean images) behind the same RT + purifier: out = log((1-a) softmax(S) + a softmax(b R)),
the `mixture` classifier's formula (its `mix_log_probabilities`). Clean grid on the first N of a class-balanced
test subset (one RT draw, shared by both), then PGD-EOT 20 x 4 through the whole mixture for each given "a,b"
on the first M of them (a = 1: R alone).

  python docs/robustness/probes/mixture_probe.py ROBUST_CLASSIFIER V1_CLASSIFIER N M a,b ...
"""

import json
import sys
import time

import torch
from torch import nn

from atop_models.attacks import PGD, EOTGradient
from atop_models.checkpoint import load_model
from atop_models.classifiers.mixture import mix_log_probabilities
from atop_models.data import load_split
from atop_models.defended import load_defended

torch.set_num_threads(2)
robust_path, std_path = sys.argv[1], sys.argv[2]
N, M = int(sys.argv[3]), int(sys.argv[4])
settings = [tuple(map(float, s.split(","))) for s in sys.argv[5:]]

data = load_split("../shared/datasets/cifar10-jpg.tar.gz", "test", 32, ".data", count=N)
x_all = data.images.float() / 255
y_all = data.labels
defense = load_defended(robust_path, "models/zoo/purifier").pipeline.eval().requires_grad_(False)
R = defense.classifier
S, _ = load_model(std_path, "classifier")
S = S.eval().requires_grad_(False)

torch.manual_seed(0)
rl, sl = [], []
with torch.no_grad():
    for i in range(0, N, 200):
        z = defense.purify(x_all[i : i + 200])
        rl.append(R(z))
        sl.append(S(z))
rl, sl = torch.cat(rl), torch.cat(sl)
print(f"R {(rl.argmax(1) == y_all).float().mean():.4f}  S {(sl.argmax(1) == y_all).float().mean():.4f}")


grid = {}
for a in (0.5, 0.6, 0.7, 0.8, 0.85, 0.875, 0.9, 0.925, 0.95):  # 0.85-0.95 added for v10 (its robust margin)
    for b in (1, 2, 4, 8):
        grid[f"{a},{b}"] = (mix_log_probabilities(rl, sl, a, b).argmax(1) == y_all).float().mean().item()
print(json.dumps(grid))


class Mixed(nn.Module):
    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return mix_log_probabilities(R(z), S(z), self.a, self.b)


results = {}
x, y = x_all[:M], y_all[:M]
for a, b in settings:
    defense.classifier = Mixed(a, b) if a < 1 else R
    started = time.monotonic()
    robust = 0
    clean = 0
    for i in range(0, M, 32):
        xb, yb = x[i : i + 32], y[i : i + 32]
        gen = torch.Generator().manual_seed(i)
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            ok = defense(xb).argmax(1) == yb
        adv = PGD(EOTGradient(defense, eot=4), 8 / 255, 1 / 255, 20, generator=gen)(xb, yb)
        with torch.no_grad():
            robust += (ok & (defense(adv).argmax(1) == yb)).sum().item()
        clean += ok.sum().item()
    results[f"{a},{b}"] = (clean / M, robust / M)
    print(a, b, clean / M, robust / M, f"{time.monotonic() - started:.0f}s", flush=True)
print(json.dumps(results))
