"""MNIST and CIFAR-10 loaders: a local directory or `keras.datasets`.

Both loaders return `((x_train, y_train), (x_test, y_test))` as `uint8`
NumPy arrays, exactly like `keras.datasets.mnist.load_data()` and
`keras.datasets.cifar10.load_data()`.

If the environment variable `KERAS_BN_DATA_DIR` is set, the arrays are read
from `mnist.npz` / `cifar10.npz` in that directory (keys `x_train`,
`y_train`, `x_test`, `y_test`, the `keras.datasets` layout) and nothing is
downloaded. Otherwise `keras.datasets` downloads the data once and caches it
under `~/.keras/datasets`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

DATA_DIR_ENV = "KERAS_BN_DATA_DIR"
_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class _Spec:
    name: str  # file stem and keras.datasets module name
    image_shape: tuple[int, ...]
    label_shape: tuple[int, ...]  # per-example label shape in keras.datasets

    @property
    def filename(self) -> str:
        return f"{self.name}.npz"

    def keras_loader(self) -> Callable:
        return getattr(keras.datasets, self.name).load_data


_MNIST = _Spec("mnist", (28, 28), ())
_CIFAR10 = _Spec("cifar10", (32, 32, 3), (1,))


def _validate(spec: _Spec, arrays: dict, source: str) -> tuple:
    """Checks keys, dtypes and shapes; returns the keras.datasets tuple."""
    missing = [k for k in _KEYS if k not in arrays]
    if missing:
        raise ValueError(
            f"{source} must hold the arrays {list(_KEYS)} (the keras.datasets "
            f"layout); missing {missing}. Received keys: {sorted(arrays)}"
        )
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        for key, value, shape in ((f"x_{split}", x, spec.image_shape),
                                  (f"y_{split}", y, spec.label_shape)):
            if value.dtype != np.uint8:
                raise ValueError(f"{source}: `{key}` must be uint8. Received "
                                 f"dtype {value.dtype}")
            if value.shape[1:] != shape or len(value) == 0:
                raise ValueError(f"{source}: `{key}` must have shape (n,) + "
                                 f"{shape} with n > 0. Received shape "
                                 f"{value.shape}")
        if len(x) != len(y):
            raise ValueError(f"{source}: `x_{split}` and `y_{split}` must "
                             f"have the same length. Received {len(x)} "
                             f"images and {len(y)} labels")
        if y.max() > 9:
            raise ValueError(f"{source}: `y_{split}` must hold class indices "
                             f"0..9. Received a maximum of {int(y.max())}")
    return ((arrays["x_train"], arrays["y_train"]),
            (arrays["x_test"], arrays["y_test"]))


def _load(spec: _Spec) -> tuple:
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        path = os.path.join(data_dir, spec.filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{DATA_DIR_ENV}={data_dir!r} has no {spec.filename}. Put "
                f"{spec.filename} (arrays {', '.join(_KEYS)} as returned by "
                f"keras.datasets.{spec.name}.load_data()) in that folder, or "
                f"unset {DATA_DIR_ENV} to download it with keras.datasets."
            )
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return _validate(spec, arrays, path)
    try:
        (x_train, y_train), (x_test, y_test) = spec.keras_loader()()
    except Exception as error:  # keras raises a bare Exception when offline
        raise OSError(
            f"Could not load {spec.name}: {DATA_DIR_ENV} is not set and "
            f"keras.datasets.{spec.name}.load_data() failed ({error}). Either "
            f"set {DATA_DIR_ENV} to a folder that holds {spec.filename} "
            f"(arrays {', '.join(_KEYS)}, uint8, the keras.datasets layout), "
            f"e.g. `export {DATA_DIR_ENV}=/path/to/datasets`, or connect to "
            f"the internet so keras.datasets can download it once."
        ) from error
    return _validate(spec, {"x_train": x_train, "y_train": y_train,
                            "x_test": x_test, "y_test": y_test},
                     f"keras.datasets.{spec.name}")


def load_mnist() -> tuple:
    """Loads MNIST in the `keras.datasets.mnist.load_data()` layout.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: `uint8` images of shape
        `(n, 28, 28)` and `uint8` labels of shape `(n,)`.

    Raises:
        FileNotFoundError: `KERAS_BN_DATA_DIR` is set but has no `mnist.npz`.
        ValueError: the arrays do not have the expected keys, shapes or dtype.
        OSError: `KERAS_BN_DATA_DIR` is not set and the download failed.
    """
    return _load(_MNIST)


def load_cifar10() -> tuple:
    """Loads CIFAR-10 in the `keras.datasets.cifar10.load_data()` layout.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: `uint8` images of shape
        `(n, 32, 32, 3)` and `uint8` labels of shape `(n, 1)`.

    Raises:
        FileNotFoundError: `KERAS_BN_DATA_DIR` is set but has no
            `cifar10.npz`.
        ValueError: the arrays do not have the expected keys, shapes or dtype.
        OSError: `KERAS_BN_DATA_DIR` is not set and the download failed.
    """
    return _load(_CIFAR10)


def prepare(images: np.ndarray, flatten: bool = False) -> np.ndarray:
    """Scales `uint8` images to `float32` in `[0, 1]`, the models' input.

    Args:
        images: `uint8` array of images, `(n, ...)`.
        flatten: If `True`, reshape to `(n, features)` (for the MNIST dense
            models, which take 784 features).

    Returns:
        A `float32` array: `images / 255`, flattened if asked.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"`images` must be uint8 (as loaded). Received "
                        f"dtype {images.dtype}")
    out = images.astype("float32") / np.float32(255.0)
    return out.reshape(len(out), -1) if flatten else out
