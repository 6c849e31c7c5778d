"""Train a dataset's article model three ways and compare them.

The three variants share the architecture and (through the seed) the
initial weights of every non-normalization layer:

- `keras_bn`: with `keras_bn.BatchNormalization`,
- `keras`: with `keras.layers.BatchNormalization`,
- `none`: without batch normalization.

`python -m keras_bn demo` runs `run`, which trains the variants side by
side (`train_side_by_side`: one epoch of each in turn, so their epoch
times compare); `benchmarks/accuracy.py` reuses `load_data`,
`build_model` and `train`.
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
    return train_side_by_side({variant: model}, data, epochs, batch_size,
                              verbose=verbose, cosine_decay=cosine_decay,
                              order_seed=order_seed)[0]


def train_side_by_side(models: dict, data: tuple, epochs: int,
                       batch_size: int, verbose: int | str = "auto",
                       cosine_decay: bool = False,
                       order_seed: int | None = None) -> list[Result]:
    """Trains several models as `train` does, one epoch of each in turn.

    Each model trains exactly as it would alone (its own weights, optimizer
    and epochs); interleaving only puts their epochs side by side, so that
    drift in the load of a shared machine hits every model alike and their
    epoch times compare. The order rotates from one epoch to the next.

    Args:
        models: `{variant: uncompiled model}`, in the order of the results.
        data: As for `train`.
        epochs: Number of epochs of each model.
        batch_size: Batch size.
        verbose: Passed to `fit`; when not 0, each epoch of each model is
            announced by its variant's name.
        cosine_decay: As for `train`.
        order_seed: As for `train`; every model then sees the same batches
            in the same order.

    Returns:
        One `Result` per model, in the order of `models`.
    """
    check.integer("epochs", epochs)
    check.integer("batch_size", batch_size)
    if not isinstance(models, dict) or not models:
        raise ValueError("`models` must be a non-empty dict of variant name "
                         f"to model. Received: models={models!r}")
    for variant, model in models.items():
        if not isinstance(model, keras.Model):
            raise TypeError(f"`models[{variant!r}]` must be a keras.Model. "
                            f"Received: {model!r}")
    (x_train, y_train), validation_data = data
    learning_rate = 1e-3  # Keras's default for Adam
    if cosine_decay:
        steps = epochs * -(-len(x_train) // batch_size)
        learning_rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=steps)
    runs = []
    for variant, model in models.items():
        model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        runs.append((variant, model, Result(variant), {}))
    rng = None if order_seed is None else np.random.default_rng(order_seed)
    for epoch in range(epochs):
        x, y = x_train, y_train
        if rng is not None:
            order = rng.permutation(len(x_train))
            x, y = x_train[order], y_train[order]
        first = epoch % len(runs)
        for variant, model, result, history in runs[first:] + runs[:first]:
            if verbose:
                print(f"{VARIANTS.get(variant, variant)}, epoch {epoch + 1}"
                      f"/{epochs}")
            epoch_history = model.fit(
                x, y, batch_size=batch_size, initial_epoch=epoch,
                epochs=epoch + 1, shuffle=rng is None,
                validation_data=validation_data,
                callbacks=[_EpochTimer(result)], verbose=verbose).history
            for key, values in epoch_history.items():
                history.setdefault(key, []).extend(values)
    for _, model, result, history in runs:
        result.history = {k: [float(v) for v in vs]
                          for k, vs in history.items()}
        result.test_loss, result.test_accuracy = (
            float(v) for v in model.evaluate(*validation_data,
                                             batch_size=1024, verbose=0))
    return [result for _, _, result, _ in runs]


def time_ratios(result: Result, reference: Result) -> tuple[float, float]:
    """`result`'s epoch time over `reference`'s, from the epochs after the
    first (which include compilation).

    Returns:
        `(median, fastest)`: the median of the epoch-by-epoch ratios (epochs
        run side by side by `train_side_by_side`, so each ratio pairs
        epochs timed together), and the ratio of the fastest epochs.
    """
    pairs = list(zip(result.epoch_seconds, reference.epoch_seconds))
    pairs = pairs[1:] or pairs
    return (statistics.median(a / b for a, b in pairs),
            min(a for a, _ in pairs) / min(b for _, b in pairs))


def result_dict(result: Result) -> dict:
    """A JSON-ready dict of a `Result`, with its median epoch time."""
    return {**asdict(result), "seconds_per_epoch": result.seconds_per_epoch}


def _vs_keras(results: list[Result]) -> dict[str, tuple[float, float]]:
    """`{variant: time_ratios(result, Keras's layer's result)}`, empty
    where `results` hold no `"keras"` variant."""
    reference = next((r for r in results if r.variant == "keras"), None)
    if reference is None:
        return {}
    return {r.variant: time_ratios(r, reference) for r in results}


def format_table(results: list[Result]) -> str:
    """Formats results as a markdown table, one row per variant.

    The time column is each variant's epoch time over Keras's layer's
    (`time_ratios`: median of the epoch-by-epoch ratios; ratio of the
    fastest epochs), where a `"keras"` result is present.
    """
    ratios = _vs_keras(results)
    lines = ["| variant | s/epoch (excl. 1st) | time / Keras's layer "
             "(median; fastest) | final train loss | test loss "
             "| test accuracy |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = ("{:.2f}; {:.2f}".format(*ratios[r.variant]) if ratios
                 else "-")
        lines.append(
            f"| {VARIANTS[r.variant]} | {r.seconds_per_epoch:.2f} | {ratio} "
            f"| {r.history['loss'][-1]:.4f} | {r.test_loss:.4f} | "
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
            variant is built so all start from the same weights, and of
            the batch order, which all variants share.
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
    built = {}
    for variant in VARIANTS:
        keras.utils.set_random_seed(seed)  # the same initial weights
        built[variant] = build_model(dataset, variant)
    # One epoch of each variant in turn, on the same batches: epoch times
    # taken side by side compare, where whole runs one after another would
    # also compare the machine's load at different times.
    results = train_side_by_side(built, data, epochs, batch_size,
                                 verbose=verbose, order_seed=seed)
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
                   "timing": "variants interleaved epoch by epoch; "
                             "time_vs_keras: over the epochs after the "
                             "first, the median of the epoch-time ratios "
                             "and the ratio of the fastest epochs",
                   "time_vs_keras": {
                       variant: dict(zip(("median", "fastest"), ratios))
                       for variant, ratios in _vs_keras(results).items()},
                   "results": [result_dict(r) for r in results]}, f, indent=2)
    print(f"\nwrote {stem}.png and {stem}.json")
    return results
