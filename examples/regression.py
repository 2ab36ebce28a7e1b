"""A regression network (the paper's air-pollution case): the score is the network's output.

The paper ranks the channels of a CNN that regresses NO2/PM2.5 levels from street images.
That model and its data are not public, so this script builds the same situation from data
that ships with the tools: it trains a small CNN to regress a continuous quantity from the
image -- by default the "ink" of a handwritten digit (its mean intensity, a scalar the network
has to estimate from the picture) on scikit-learn's digits -- then ranks both conv layers by
their maximal correlation with the network's scalar output (no class index needed).

Usage::

    python examples/regression.py --out runs/regression
"""

import argparse

import torch
from torch import nn

import pcace
from pcace.inputs.data import sklearn_digits
from pcace.inputs.targets import RegressionOutput


class SmallRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5, padding=2)
        self.conv2 = nn.Conv2d(8, 16, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(),
                                  nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(x)  # (N, 1): one regression output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="runs/regression")
    args = parser.parse_args()

    images, _ = sklearn_digits().tensors
    target = images.mean(dim=(1, 2, 3), keepdim=False)[:, None]
    target = (target - target.mean()) / target.std()
    torch.manual_seed(0)
    model = SmallRegressor()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    train, test = slice(0, 1400), slice(1400, None)
    for _ in range(args.epochs):
        for i in range(0, 1400, 64):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(images[train][i:i + 64]),
                                          target[train][i:i + 64])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(images[test])
    r = torch.corrcoef(torch.stack([pred[:, 0], target[test][:, 0]]))[0, 1]
    print(f"held-out correlation of prediction and target: {r:.3f}")

    res = pcace.rank(model, images[test], RegressionOutput(), progress=True)
    res.save(args.out)
    print(res.layers[["layer", "channels", "median", "q90", "max", "top_channels"]])


if __name__ == "__main__":
    main()
