"""Train a dataset's article model three ways and compare them.

The three variants share the architecture and (through the seed) the
initial weights of every non-normalization layer:

- `keras_bn`: with `keras_bn.BatchNormalization`,
- `keras`: with `keras.layers.BatchNormalization`,
- `none`: without batch normalization.

`python -m keras_bn demo` runs `main`; `benchmarks/accuracy.py` reuses
`load_data`, `build_model`, `train` and `format_table`.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field

import keras
import numpy as np

from keras_bn import _validation as check
from keras_bn import datasets
from keras_bn import models
from keras_bn.layers import BatchNormalization

VARIANTS = {
    "keras_bn": "keras_bn.BatchNormalization",
    "keras": "keras.layers.BatchNormalization",
    "none": "no batch normalization",
}
DATASETS = ("mnist", "cifar10")
DEFAULT_EPOCHS = {"mnist": 5, "cifar10": 3}


@dataclass
class Result:
    """One variant's training run.

    Attributes:
        variant: Key of `VARIANTS`.
        epoch_seconds: Wall time of each epoch's training (validation
            excluded; the first epoch includes tracing/compilation).
        history: Per-epoch `loss`, `accuracy`, `val_loss`, `val_accuracy`.
        test_loss: Loss on the test split after training.
        test_accuracy: Accuracy on the test split after training.
    """

    variant: str
    epoch_seconds: list = field(default_factory=list)
    history: dict = field(default_factory=dict)
    test_loss: float = float("nan")
    test_accuracy: float = float("nan")

    @property
    def seconds_per_epoch(self) -> float:
        """Median epoch time after the first (which includes compilation)."""
        return statistics.median(self.epoch_seconds[1:] or self.epoch_seconds)


class _EpochTimer(keras.callbacks.Callback):
    """Times each epoch's training; the clock stops when validation starts."""

    def __init__(self, result: Result):
        super().__init__()
        self._result = result
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_test_begin(self, logs=None):
        if self._start is not None:  # validation inside fit, not evaluate()
            self._result.epoch_seconds.append(time.perf_counter() - self._start)
            self._start = None

    def on_epoch_end(self, epoch, logs=None):
        self.on_test_begin()  # no validation data: the epoch ends here


def load_data(dataset: str, train_size: int | None = None,
              test_size: int | None = None) -> tuple:
    """Loads a dataset scaled to `[0, 1]` in the shape its model takes.

    Args:
        dataset: `"mnist"` (flattened to 784 features) or `"cifar10"`.
        train_size: Use only the first `train_size` training examples.
        test_size: Use only the first `test_size` test examples.

    Returns:
        `((x_train, y_train), (x_test, y_test))`, `float32` images and
        integer labels of shape `(n,)`.
    """
    check.choice("dataset", dataset, DATASETS)
    check.integer("train_size", train_size, allow_none=True)
    check.integer("test_size", test_size, allow_none=True)
    loader = {"mnist": datasets.load_mnist,
              "cifar10": datasets.load_cifar10}[dataset]
    (x_train, y_train), (x_test, y_test) = loader()
    flatten = dataset == "mnist"
    return (
        (datasets.prepare(x_train[:train_size], flatten=flatten),
         y_train[:train_size].reshape(-1).astype("int32")),
        (datasets.prepare(x_test[:test_size], flatten=flatten),
         y_test[:test_size].reshape(-1).astype("int32")),
    )


def build_model(dataset: str, variant: str) -> keras.Model:
    """Builds the dataset's article model for one of `VARIANTS`.

    Args:
        dataset: `"mnist"` (`models.mnist_dense()`, the Keras article's
            model) or `"cifar10"` (`models.cifar10_conv()`).
        variant: `"keras_bn"`, `"keras"` or `"none"`.

    Returns:
        The uncompiled model.
    """
    check.choice("dataset", dataset, DATASETS)
    check.choice("variant", variant, VARIANTS)
    norm = (keras.layers.BatchNormalization if variant == "keras"
            else BatchNormalization)
    builder = models.mnist_dense if dataset == "mnist" else models.cifar10_conv
    return builder(batch_norm=variant != "none", norm_layer=norm)


def portable_init(model: keras.Model, seed: int) -> None:
    """Redraws the model's kernels with NumPy, the same on every backend.

    Keras's initializers draw from each backend's own random generator, so
    one seed gives different weights on TensorFlow, JAX and PyTorch. This
    draws every `kernel` from Keras's default Glorot uniform distribution
    with a NumPy generator (in the order of `model.weights`) and zeroes
    every `bias`; normalization weights keep their constant initializers.
    Models that differ only in their normalization layers get the same
    kernels.

    Args:
        model: A built model.
        seed: Seed of the NumPy generator.
    """
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        name = weight.path.rsplit("/", 1)[-1]
        shape = tuple(weight.shape)
        if name == "kernel":
            receptive = int(np.prod(shape[:-2], dtype=np.int64))
            fans = receptive * (shape[-2] + shape[-1])
            limit = np.sqrt(6.0 / fans)
            weight.assign(rng.uniform(-limit, limit, shape).astype("float32"))
        elif name == "bias":
            weight.assign(np.zeros(shape, "float32"))


def train(model: keras.Model, data: tuple, variant: str, epochs: int,
          batch_size: int, verbose: int | str = "auto",
          cosine_decay: bool = False,
          order_seed: int | None = None) -> Result:
    """Compiles a model as the articles do (Adam) and trains it.

    Args:
        model: An uncompiled model from `build_model`.
        data: `((x_train, y_train), (x_test, y_test))` from `load_data`;
            the test split is also the per-epoch validation data.
        variant: Variant name, recorded in the result.
        epochs: Number of epochs.
        batch_size: Batch size.
        verbose: Passed to `fit` (`1` shows Keras progress bars).
        cosine_decay: Decay Adam's learning rate (Keras's default 1e-3)
            to 0 over the run with a cosine schedule, so that the final
            weights, and the test accuracy measured on them, settle
            instead of moving by several points from epoch to epoch.
        order_seed: If set, each epoch's batches follow a NumPy
            permutation drawn from this seed, the same on every backend
            (`fit`'s own shuffling uses the backend's generator).

    Returns:
        The `Result`.
    """
    check.integer("epochs", epochs)
    check.integer("batch_size", batch_size)
    (x_train, y_train), (x_test, y_test) = data
    learning_rate = 1e-3  # Keras's default for Adam
    if cosine_decay:
        steps = epochs * -(-len(x_train) // batch_size)
        learning_rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=steps)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    result = Result(variant)
    fit_args = dict(batch_size=batch_size, validation_data=(x_test, y_test),
                    callbacks=[_EpochTimer(result)], verbose=verbose)
    if order_seed is None:
        history = model.fit(x_train, y_train, epochs=epochs,
                            **fit_args).history
    else:
        rng = np.random.default_rng(order_seed)
        history = {}
        for epoch in range(epochs):
            order = rng.permutation(len(x_train))
            epoch_history = model.fit(
                x_train[order], y_train[order], initial_epoch=epoch,
                epochs=epoch + 1, shuffle=False, **fit_args).history
            for key, values in epoch_history.items():
                history.setdefault(key, []).extend(values)
    result.history = {k: [float(v) for v in vs] for k, vs in history.items()}
    result.test_loss, result.test_accuracy = (
        float(v) for v in model.evaluate(x_test, y_test, batch_size=1024,
                                         verbose=0)
    )
    return result


def result_dict(result: Result) -> dict:
    """A JSON-ready dict of a `Result`, with its median epoch time."""
    return {**asdict(result), "seconds_per_epoch": result.seconds_per_epoch}


def format_table(results: list[Result]) -> str:
    """Formats results as a markdown table, one row per variant."""
    lines = ["| variant | s/epoch (excl. 1st) | final train loss | test loss "
             "| test accuracy |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {VARIANTS[r.variant]} | {r.seconds_per_epoch:.2f} | "
            f"{r.history['loss'][-1]:.4f} | {r.test_loss:.4f} | "
            f"{100 * r.test_accuracy:.2f}% |"
        )
    return "\n".join(lines)


def plot_curves(results: list[Result], path: str, title: str) -> None:
    """Writes a PNG of training loss and test accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot as plt

    from matplotlib.ticker import MaxNLocator

    # Ours and Keras's layer often overlap: distinct markers and dashes.
    styles = {"keras_bn": dict(marker="o", linestyle="-"),
              "keras": dict(marker="x", linestyle="--"),
              "none": dict(marker="s", linestyle=":")}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        epochs = np.arange(1, len(r.history["loss"]) + 1)
        style = dict(styles[r.variant], label=VARIANTS[r.variant])
        ax_loss.plot(epochs, r.history["loss"], **style)
        ax_acc.plot(epochs, np.asarray(r.history["val_accuracy"]) * 100,
                    **style)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(dataset: str = "mnist", epochs: int | None = None,
        batch_size: int = 128, out_dir: str = "demo_out",
        train_size: int | None = None, seed: int = 0,
        verbose: int | str = "auto") -> list[Result]:
    """Trains the three variants, prints the table, writes PNG and JSON.

    Args:
        dataset: `"mnist"` or `"cifar10"`.
        epochs: Epochs per variant; defaults to `DEFAULT_EPOCHS[dataset]`.
        batch_size: Batch size.
        out_dir: Folder for `<dataset>_<backend>.png` and `.json`.
        train_size: Use only the first `train_size` training examples.
        seed: Seed for `keras.utils.set_random_seed`, reset before each
            variant so all start from the same weights.
        verbose: Passed to `fit`.

    Returns:
        The three `Result`s.
    """
    check.choice("dataset", dataset, DATASETS)
    epochs = DEFAULT_EPOCHS[dataset] if epochs is None else epochs
    backend = keras.backend.backend()
    data = load_data(dataset, train_size=train_size)
    print(f"keras_bn demo: {dataset}, backend {backend}, {epochs} epochs, "
          f"batch {batch_size}, {len(data[0][0])} training / "
          f"{len(data[1][0])} test examples")
    results = []
    for variant, label in VARIANTS.items():
        keras.utils.set_random_seed(seed)
        model = build_model(dataset, variant)
        print(f"\n== {label} ({model.name}) ==")
        results.append(train(model, data, variant, epochs, batch_size,
                             verbose=verbose))
    table = format_table(results)
    print(f"\n{dataset}, backend {backend}, {epochs} epochs:\n{table}")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{dataset}_{backend}")
    plot_curves(results, stem + ".png",
                f"{dataset}, {backend} backend, batch {batch_size}")
    with open(stem + ".json", "w") as f:
        json.dump({"dataset": dataset, "backend": backend, "epochs": epochs,
                   "batch_size": batch_size,
                   "train_examples": len(data[0][0]),
                   "test_examples": len(data[1][0]),
                   "results": [result_dict(r) for r in results]}, f, indent=2)
    print(f"\nwrote {stem}.png and {stem}.json")
    return results
