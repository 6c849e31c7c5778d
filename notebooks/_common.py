"""Plumbing shared by the tutorial notebooks, kept out of the way of the lessons.

- `QUICK` / `pick`: quick mode (`KERAS_BN_QUICK=1`) shrinks data and training;
- `setup_plots`, `COLORS`: one look for every figure;
- `gradient`: autodiff on whichever backend Keras runs on;
- `cifar_curves` / `on_backends`: train in a fresh process per Keras backend
  (the backend is fixed when Keras is imported);
- `execute_notebook`: run a notebook top to bottom with this Python (used by
  the tests and to refresh the committed outputs).

Command line: `python notebooks/_common.py execute [--quick] [--backend B]
[notebook ...]` runs notebooks and saves their outputs in place.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import tempfile
import time

import numpy as np

from keras_bn._processes import BACKENDS
from keras_bn._processes import run_python

HERE = pathlib.Path(__file__).resolve().parent
QUICK_ENV = "KERAS_BN_QUICK"
QUICK = os.environ.get(QUICK_ENV, "0") not in ("", "0")
# TensorFlow's C++ start-up log lines (absl), printed to stderr on import
# even with TF_CPP_MIN_LOG_LEVEL=3.
_TF_LOG_LINE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)"
    r"|[IWE]\d{4} [\d:.]+\s+\d+ \S+:\d+\]"
    r"|To enable the following instructions|$)"
)
COLORS = {
    "bn": "#1f5fbf",       # with batch normalization
    "none": "#d9534f",     # without
    "renorm": "#2a9d8f",
    "ghost": "#e9a23b",
    "group": "#7b4fa0",
    "tensorflow": "#ff8f00",
    "jax": "#5b8def",
    "torch": "#ee4c2c",
}


def pick(full, quick):
    """Returns `quick` in quick mode, `full` otherwise."""
    return quick if QUICK else full


def setup_plots() -> None:
    """A light, readable matplotlib style for every figure."""
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "figure.dpi": 100,
        "figure.figsize": (7.5, 4.0),
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titleweight": "bold",
        "legend.frameon": False,
        "font.size": 10,
    })


def gradient(fn, x: np.ndarray) -> np.ndarray:
    """The gradient of `sum(fn(x))` with respect to `x`, as NumPy.

    Args:
        fn: A function of one backend tensor, written with `keras.ops` or
            Keras layers.
        x: The point, a float NumPy array.

    Returns:
        `d sum(fn(x)) / dx`, a NumPy array shaped like `x`.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: jax.numpy.sum(fn(v)))(x))
    if backend == "tensorflow":
        import tensorflow as tf

        v = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(v)
            total = tf.reduce_sum(fn(v))
        return tape.gradient(total, v).numpy()
    if backend == "torch":
        import torch

        v = torch.tensor(x, requires_grad=True)
        torch.sum(fn(v)).backward()
        return v.grad.numpy()
    raise ValueError(f"No gradient helper for backend {backend!r}")


def cifar_curves(epochs: int, train_size: int, batch_size: int = 128,
                 seed: int = 0, recalibration_size: int = 5_000) -> dict:
    """Trains the articles' CIFAR-10 model with and without BN, this backend.

    `keras_bn.models.cifar10_conv`, Adam (learning rate 1e-3), sparse
    categorical cross-entropy, inputs scaled to [0, 1], the first
    `train_size` training images; the held-out split (the last 5,000
    training images of CIFAR-10) is evaluated after every epoch. For the BN
    model the held-out split is also evaluated by a copy of the model whose
    moving statistics are recomputed exactly (`keras_bn.recalibrate`) on
    the first `recalibration_size` training images; the trained model's own
    statistics are left alone.

    Returns:
        `{"backend", "runs": {"bn" | "none": {"history", "epoch_seconds"}}}`:
        the Keras history (a list of floats per metric; for "bn" also
        `val_accuracy_recalibrated`) and the wall time of each epoch,
        held-out evaluation included, recalibration excluded.
    """
    import keras

    from keras_bn import datasets
    from keras_bn import models
    from keras_bn.recalibrate import recalibrate

    (x, y), (x_val, y_val) = datasets.load_cifar10()
    x, y = datasets.prepare(x[:train_size]), y[:train_size]
    x_val = datasets.prepare(x_val)
    runs = {}
    for name, batch_norm in (("bn", True), ("none", False)):
        keras.utils.set_random_seed(seed)
        model = models.cifar10_conv(batch_norm=batch_norm)
        model.compile(keras.optimizers.Adam(1e-3),
                      "sparse_categorical_crossentropy", metrics=["accuracy"])
        starts, seconds, recalibrated = [], [], []
        callbacks = [keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: starts.append(time.perf_counter()),
            on_epoch_end=lambda epoch, logs: seconds.append(
                time.perf_counter() - starts[-1]),
        )]
        if batch_norm:
            copy = models.cifar10_conv(batch_norm=True)
            copy.compile(loss="sparse_categorical_crossentropy",
                         metrics=["accuracy"])

            def evaluate_recalibrated(epoch, logs):
                copy.set_weights(model.get_weights())
                recalibrate(copy, x[:recalibration_size], batch_size=500,
                            verbose=0)
                recalibrated.append(float(copy.evaluate(
                    x_val, y_val, batch_size=500, verbose=0)[1]))

            callbacks.append(keras.callbacks.LambdaCallback(
                on_epoch_end=evaluate_recalibrated))
        history = model.fit(x, y, batch_size=batch_size, epochs=epochs,
                            validation_data=(x_val, y_val), callbacks=callbacks,
                            verbose=0)
        history = {k: [float(v) for v in values]
                   for k, values in history.history.items()}
        if batch_norm:
            history["val_accuracy_recalibrated"] = recalibrated
        runs[name] = {"history": history, "epoch_seconds": seconds}
    return {"backend": keras.backend.backend(), "runs": runs}


def on_backends(function: str, backends=BACKENDS, **kwargs) -> dict:
    """Runs `function(**kwargs)` of this module once per backend.

    Each run is a fresh Python process with `KERAS_BACKEND` set, since Keras
    fixes its backend when it is imported.

    Returns:
        `{backend: result}`, each result as returned by the function (it
        must be JSON-serializable).
    """
    results = {}
    for backend in backends:
        proc = run_python(
            backend, [str(HERE / "_common.py"), "call", function,
                      json.dumps(kwargs)],
            cwd=HERE, capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{function}({kwargs}) failed on {backend}:\n"
                               f"{proc.stderr[-4000:]}")
        results[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def execute_notebook(path, backend: str, quick: bool, timeout: int = 1800):
    """Runs a notebook top to bottom in a kernel of this Python interpreter.

    The kernel gets `KERAS_BACKEND=backend` and `KERAS_BN_QUICK`, and runs
    in the notebook's folder. A temporary kernelspec points at
    `sys.executable`, so no kernel needs to be installed beforehand.

    Stderr outputs made only of TensorFlow's C++ start-up log lines are
    dropped, so the saved notebook shows what the cells print.

    Returns:
        The executed `nbformat` notebook (the file is not written).

    Raises:
        nbclient.exceptions.CellExecutionError: a cell raised.
    """
    import nbclient
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    path = pathlib.Path(path)
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        spec_dir = pathlib.Path(tmp, "keras-bn-notebook")
        spec_dir.mkdir()
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                     "{connection_file}"],
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
            "env": {"KERAS_BACKEND": backend, QUICK_ENV: "1" if quick else "0",
                    "TF_CPP_MIN_LOG_LEVEL": "3"},
        }))
        specs = KernelSpecManager(kernel_dirs=[tmp])
        km = KernelManager(kernel_name="keras-bn-notebook",
                           kernel_spec_manager=specs)
        client = nbclient.NotebookClient(
            nb, km=km, timeout=timeout, record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        try:
            client.execute()
        finally:  # nbclient leaves a kernel it did not create running
            if km.has_kernel:
                km.shutdown_kernel(now=True)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [out for out in cell.outputs if not _is_tf_log(out)]
    # Keep the standard kernelspec in the saved file.
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)",
                                 "language": "python", "name": "python3"}
    return nb


def _is_tf_log(output) -> bool:
    return (output.get("output_type") == "stream"
            and output.get("name") == "stderr"
            and all(_TF_LOG_LINE.match(line)
                    for line in output.get("text", "").splitlines()))


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    call = sub.add_parser("call", help="internal: run one function, print JSON")
    call.add_argument("function")
    call.add_argument("kwargs")
    run = sub.add_parser("execute", help="run notebooks, save their outputs")
    run.add_argument("notebooks", nargs="*")
    run.add_argument("--backend", default="jax", choices=BACKENDS)
    run.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "call":
        if args.function not in ("cifar_curves",):
            raise SystemExit(f"unknown function {args.function!r}")
        result = globals()[args.function](**json.loads(args.kwargs))
        print(json.dumps(result))
        return
    import nbformat

    paths = args.notebooks or sorted(str(p) for p in HERE.glob("[0-9]*.ipynb"))
    for path in paths:
        start = time.time()
        nb = execute_notebook(path, args.backend, args.quick)
        nbformat.write(nb, path)
        print(f"{path}: {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
