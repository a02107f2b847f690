"""Train a small MLP on scikit-learn's digits with E(AdamW) and AdamW; print the losses.

    python examples/quickstart.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

from adaptor import E, preset


def train(explored: bool, epochs: int = 60, batch_size: int = 1024, seed: int = 0) -> float:
    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if explored:
        optimizer = E(optimizer, **preset(batch_size))  # α = -5, β = 0.99 for batch >= 1024
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return loss_fn(model(x), y).item()


if __name__ == "__main__":
    for explored in (False, True):
        name = "E(AdamW)" if explored else "AdamW   "
        print(f"{name}  final train loss {train(explored):.4f}")
