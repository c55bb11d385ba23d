"""Seconds per PGD-2 adversarial training step of the served classifier's architecture (batch 512, random
images), as atop-train classifier takes it: eager, or with the model under torch.compile (inductor).
Usage: python training_step.py eager|compile"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from atop_models.classifiers import CLASSIFIERS
from atop_models.train.adversarial import AdversarialConfig


def main() -> None:
    mode = sys.argv[1]
    torch.manual_seed(0)
    model = CLASSIFIERS.create("airbench", flip_average=True, num_classes=10).to(memory_format=torch.channels_last)
    run = torch.compile(model) if mode == "compile" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    attack = AdversarialConfig(kind="pgd", steps=2)
    x, y = torch.rand(512, 3, 32, 32), torch.randint(0, 10, (512,))

    def step() -> None:
        x_adv = attack.perturb(run, x, y)
        model.train()
        loss = F.cross_entropy(run(x_adv.contiguous(memory_format=torch.channels_last)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    for _ in range(2):  # under compile, the first calls compile the attack's eval graph and the training graph
        step()
    print(f"{mode}: 2 warm-up steps {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    for _ in range(4):
        step()
    print(f"{mode}: {(time.perf_counter() - start) / 4:.2f} s per step", flush=True)


if __name__ == "__main__":
    main()
