"""keras_bn.datasets: the KERAS_BN_DATA_DIR path, download path, errors."""

import keras
import numpy as np
import pytest

from keras_bn import datasets

ENV = "KERAS_BN_DATA_DIR"

# Label counts of the 10,000 MNIST test images, as published with the
# database (LeCun, Cortes & Burges), digits 0..9.
MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                           1009]


def _arrays(name, n_train=6, n_test=4):
    rng = np.random.default_rng(1)
    image = (28, 28) if name == "mnist" else (32, 32, 3)
    label = () if name == "mnist" else (1,)
    return {
        "x_train": rng.integers(0, 256, (n_train,) + image, dtype=np.uint8),
        "y_train": rng.integers(0, 10, (n_train,) + label, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test,) + image, dtype=np.uint8),
        "y_test": rng.integers(0, 10, (n_test,) + label, dtype=np.uint8),
    }


LOADERS = {"mnist": datasets.load_mnist, "cifar10": datasets.load_cifar10}


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_reads_npz_from_data_dir(name, tmp_path, monkeypatch):
    arrays = _arrays(name)
    np.savez(tmp_path / f"{name}.npz", **arrays)
    monkeypatch.setenv(ENV, str(tmp_path))
    # The download path must not be taken when the directory is set.
    monkeypatch.setattr(getattr(keras.datasets, name), "load_data",
                        lambda: pytest.fail("downloaded despite " + ENV))
    (x_train, y_train), (x_test, y_test) = LOADERS[name]()
    for key, got in (("x_train", x_train), ("y_train", y_train),
                     ("x_test", x_test), ("y_test", y_test)):
        np.testing.assert_array_equal(got, arrays[key])
        assert got.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_data_dir_without_file_says_what_is_missing(name, tmp_path,
                                                    monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        LOADERS[name]()
    message = str(info.value)
    assert ENV in message and f"{name}.npz" in message
    assert str(tmp_path) in message


def _corrupt(arrays, how):
    if how == "missing key":
        del arrays["y_test"]
    elif how == "float images":
        arrays["x_train"] = arrays["x_train"].astype("float32")
    elif how == "wrong image shape":
        arrays["x_test"] = arrays["x_test"][:, :20]
    elif how == "label count":
        arrays["y_train"] = arrays["y_train"][:-1]
    elif how == "label out of range":
        arrays["y_test"] = arrays["y_test"].copy()
        arrays["y_test"][0] = 10
    return arrays


@pytest.mark.parametrize("how,key", [
    ("missing key", "y_test"),
    ("float images", "x_train"),
    ("wrong image shape", "x_test"),
    ("label count", "y_train"),
    ("label out of range", "y_test"),
])
def test_invalid_npz_is_rejected_naming_the_array(how, key, tmp_path,
                                                  monkeypatch):
    path = tmp_path / "mnist.npz"
    np.savez(path, **_corrupt(_arrays("mnist"), how))
    monkeypatch.setenv(ENV, str(tmp_path))
    with pytest.raises(ValueError) as info:
        datasets.load_mnist()
    assert key in str(info.value) and str(path) in str(info.value)


def test_cifar_labels_must_keep_the_keras_shape(tmp_path, monkeypatch):
    arrays = _arrays("cifar10")
    arrays["y_train"] = arrays["y_train"].reshape(-1)  # keras gives (n, 1)
    np.savez(tmp_path / "cifar10.npz", **arrays)
    monkeypatch.setenv(ENV, str(tmp_path))
    with pytest.raises(ValueError, match="y_train"):
        datasets.load_cifar10()


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_offline_without_data_dir_says_what_to_do(name, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)

    def offline():
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setattr(getattr(keras.datasets, name), "load_data", offline)
    with pytest.raises(OSError) as info:
        LOADERS[name]()
    message = str(info.value)
    assert f"{ENV} to a folder that holds {name}.npz" in message
    assert "connect to the internet" in message
    assert "URL fetch failure" in message  # the cause is not hidden
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_without_data_dir_uses_keras_datasets(name, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    arrays = _arrays(name)
    monkeypatch.setattr(
        getattr(keras.datasets, name), "load_data",
        lambda: ((arrays["x_train"], arrays["y_train"]),
                 (arrays["x_test"], arrays["y_test"])),
    )
    (x_train, _), (_, y_test) = LOADERS[name]()
    np.testing.assert_array_equal(x_train, arrays["x_train"])
    np.testing.assert_array_equal(y_test, arrays["y_test"])


def test_prepare_scales_to_unit_interval_and_flattens():
    images = np.array([[[0, 51], [102, 255]]], dtype=np.uint8)
    out = datasets.prepare(images)
    assert out.dtype == np.float32 and out.shape == (1, 2, 2)
    np.testing.assert_allclose(out, [[[0.0, 0.2], [0.4, 1.0]]], rtol=1e-7)
    flat = datasets.prepare(images, flatten=True)
    np.testing.assert_allclose(flat, [[0.0, 0.2, 0.4, 1.0]], rtol=1e-7)


def test_prepare_rejects_float_images():
    with pytest.raises(TypeError, match="float64"):
        datasets.prepare(np.zeros((2, 3)))


def test_real_mnist_matches_the_published_database():
    # Uses KERAS_BN_DATA_DIR (set by .ci/run) or keras.datasets.
    (x_train, y_train), (x_test, y_test) = datasets.load_mnist()
    assert x_train.shape == (60000, 28, 28) and y_train.shape == (60000,)
    assert x_test.shape == (10000, 28, 28)
    assert np.bincount(y_test, minlength=10).tolist() == \
        MNIST_TEST_LABEL_COUNTS
    assert x_test.min() == 0 and x_test.max() == 255


def test_real_cifar10_has_the_keras_layout():
    (x_train, y_train), (x_test, y_test) = datasets.load_cifar10()
    assert x_train.shape[1:] == (32, 32, 3) and y_train.shape[1:] == (1,)
    assert len(x_test) >= 1000 and len(x_train) >= 5000
    # CIFAR-10 has 5,000 training images per class; any split keeps all ten.
    assert sorted(np.unique(y_test)) == list(range(10))
    assert x_train.min() == 0 and x_train.max() == 255
