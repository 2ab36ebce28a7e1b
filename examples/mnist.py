"""The paper's MNIST experiment: a two-conv CNN, channels ranked for one digit.

Usage::

    python examples/mnist.py                       # scikit-learn digits, no download
    python examples/mnist.py --data ../shared/data/mnist --digit 7 --out runs/mnist-7

Trains the small CNN with a fixed seed, ranks both conv layers over the held-out images of
the digit, prints each layer's top and bottom channels and writes a run directory.
"""

import argparse

from pcace.cli.demo import run_demo, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder with MNIST IDX files (default: sklearn digits)")
    parser.add_argument("--digit", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default="runs/mnist")
    args = parser.parse_args()
    result = run_demo(out=args.out, data=args.data, digit=args.digit, epochs=args.epochs)
    print(f"held-out accuracy {result.manifest['demo']['held_out_accuracy']:.1%}")
    print(summary(result))
    print(result.layers[["layer", "channels", "mean", "median", "q90", "max"]])


if __name__ == "__main__":
    main()
