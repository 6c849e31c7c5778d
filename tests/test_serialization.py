"""Configs, .keras files, weights from Keras's layer, and other backends."""

import json
import os
import textwrap

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn._processes import BACKENDS
from keras_bn._processes import run_python
from tests.bn_models import randomize_bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_CONFIG = dict(
    axis=[1, -1], momentum=0.9, epsilon=1e-4, center=False, scale=True,
    gamma_initializer="he_normal", moving_variance_initializer="ones",
    gamma_regularizer=keras.regularizers.L2(0.01),
    gamma_constraint=keras.constraints.NonNeg(), renorm=True,
    renorm_clipping={"rmax": 3.0, "rmin": 0.5, "dmax": 1.0},
    renorm_momentum=0.95, synchronized=True, synchronized_group_size=2,
    virtual_batch_size=4,
    skip_nonfinite_updates=False, fused=False, name="bn_full",
)


def _model(layer_factory, shape=(6, 5)):
    inputs = keras.Input(shape)
    x = keras.layers.Dense(5)(inputs)
    x = layer_factory()(x)
    x = keras.layers.Dense(3)(x)
    return keras.Model(inputs, x)


def test_config_round_trip():
    layer = keras_bn.BatchNormalization(**FULL_CONFIG)
    config = layer.get_config()
    json.dumps(config)  # plain JSON
    clone = keras_bn.BatchNormalization.from_config(config)
    assert clone.get_config() == config
    for key, value in FULL_CONFIG.items():
        if isinstance(value, (bool, int, float, list, dict)):
            assert config[key] == value, key
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, keras_bn.BatchNormalization)
    assert restored.get_config() == config


def test_keras_file_safe_mode_without_custom_objects(tmp_path):
    rng = np.random.default_rng(0)
    model = _model(lambda: keras_bn.BatchNormalization(renorm=True))
    randomize_bn(model, rng)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.layers[2], keras_bn.BatchNormalization)
    x = rng.normal(size=(4, 6, 5)).astype("float32")
    np.testing.assert_array_equal(model.predict(x, verbose=0),
                                  loaded.predict(x, verbose=0))


@pytest.mark.parametrize("renorm", [False, True])
def test_same_weights_as_keras_layer(renorm):
    ours = _model(lambda: keras_bn.BatchNormalization(renorm=renorm))
    theirs = _model(lambda: keras.layers.BatchNormalization(renorm=renorm))
    a, b = ours.layers[2], theirs.layers[2]
    assert [(w.path.split("/")[-1], w.shape, w.trainable) for w in a.weights] == [
        (w.path.split("/")[-1], w.shape, w.trainable) for w in b.weights]


@pytest.mark.parametrize("direction", ["keras_to_ours", "ours_to_keras"])
def test_weights_files_move_between_layers(tmp_path, direction):
    rng = np.random.default_rng(1)
    make_ours = lambda: _model(lambda: keras_bn.BatchNormalization(momentum=0.5))  # noqa
    make_keras = lambda: _model(lambda: keras.layers.BatchNormalization(momentum=0.5))  # noqa
    source, target = (make_keras(), make_ours()) if direction == "keras_to_ours" \
        else (make_ours(), make_keras())
    randomize_bn(source, rng)
    path = str(tmp_path / "w.weights.h5")
    source.save_weights(path)
    target.load_weights(path)
    x = rng.normal(size=(8, 6, 5)).astype("float32")
    for training in (False, True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(source(x, training=training)),
            keras.ops.convert_to_numpy(target(x, training=training)), atol=1e-5)
    for wa, wb in zip(source.get_weights(), target.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


OTHER_BACKEND_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, keras, keras_bn
    model = keras.saving.load_model(sys.argv[1], safe_mode=True)
    x = np.load(sys.argv[2])
    np.save(sys.argv[3], model.predict(x, verbose=0))
    print(keras.backend.backend(), "ok")
""")


def test_keras_file_loads_on_the_other_backends(tmp_path):
    rng = np.random.default_rng(2)
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3),
        keras_bn.BatchNormalization(renorm=True),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
        keras_bn.BatchNormalization(virtual_batch_size=2),
    ])
    randomize_bn(model, rng)
    x = rng.normal(size=(5, 8, 8, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    model.save(str(tmp_path / "m.keras"))
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "load.py"
    script.write_text(OTHER_BACKEND_SCRIPT)
    for backend in set(BACKENDS) - {keras.backend.backend()}:
        path = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        out = tmp_path / f"{backend}.npy"
        result = run_python(
            backend, [str(script), str(tmp_path / "m.keras"),
                      str(tmp_path / "x.npy"), str(out)],
            extra_env=path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        np.testing.assert_allclose(np.load(out), expected, atol=1e-5,
                                   err_msg=backend)
