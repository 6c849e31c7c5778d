"""Command line: `python -m keras_bn demo [options]`.

`--backend` selects the Keras backend without exporting `KERAS_BACKEND`:
importing `keras_bn` has already imported Keras (and fixed its backend), so
when the requested backend differs from the running one the command runs
itself again in a child process with `KERAS_BACKEND` set.
"""

from __future__ import annotations

import argparse
import os
import sys

from keras_bn._processes import BACKENDS
from keras_bn._processes import run_python


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keras_bn")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train a model with keras_bn's BN, Keras's BN and no BN",
        description="Trains the dataset's article model with "
        "keras_bn.BatchNormalization, with keras.layers.BatchNormalization "
        "and without batch normalization; prints a comparison table and "
        "writes a PNG of the learning curves. Data come from "
        "$KERAS_BN_DATA_DIR/{mnist,cifar10}.npz if set, else keras.datasets.",
    )
    demo.add_argument("--backend", choices=BACKENDS,
                      help="Keras backend (default: KERAS_BACKEND or Keras's "
                      "configured backend)")
    demo.add_argument("--dataset", choices=("mnist", "cifar10"),
                      default="mnist")
    demo.add_argument("--epochs", type=_positive_int, default=None,
                      help="epochs per model (default: 5 for mnist, 3 for "
                      "cifar10)")
    demo.add_argument("--batch-size", type=_positive_int, default=128)
    demo.add_argument("--train-size", type=_positive_int, default=None,
                      help="use only the first N training examples")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="demo_out",
                      help="folder for the PNG and JSON (default: demo_out)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)

    import keras  # already imported by keras_bn/__init__.py

    if args.backend and keras.backend.backend() != args.backend:
        if os.environ.get("KERAS_BACKEND") == args.backend:
            raise RuntimeError(f"KERAS_BACKEND={args.backend} is set but Keras "
                               f"runs {keras.backend.backend()}.")
        # The user's own OpenMP setting: the demo times what they would run.
        return run_python(args.backend, ["-m", "keras_bn", *argv],
                          user_openmp=True).returncode

    from keras_bn import demo

    demo.run(dataset=args.dataset, epochs=args.epochs,
             batch_size=args.batch_size, out_dir=args.out,
             train_size=args.train_size, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
