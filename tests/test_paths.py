"""`keras_bn.paths`: which implementation a call takes, and why.

The rules are read for every backend from `paths.Call` facts (no backend
needed), and `BatchNormalization.which_path` is checked on the current one.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import paths

BACKEND = keras.backend.backend()


def _call(backend, training=True, shape=(256, 32, 32, 16), axes=(3,),
          **facts):
    facts.setdefault("fused", None)
    facts.setdefault("dtype", "float32")
    return paths.Call(backend=backend, training=training, shape=shape,
                      axes=axes, **facts)


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fact,why", [
    ({"fused": False}, "fused=False"),
    ({"masked": True}, "a mask"),
    ({"axes": (1, 3)}, "several feature axes"),
    ({"dtype": "float64"}, "float32, float16 or bfloat16"),
])
def test_the_gate_leaves_the_reference_path(backend, training, fact, why):
    path = paths.choose(_call(backend, training, **fact))
    assert path.name == paths.REFERENCE, path
    assert all(why in reason for _, reason in path.declined), path


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
@pytest.mark.parametrize("fact", [{"renorm": True}, {"ghost": True},
                                  {"replicas": 2}])
def test_renorm_ghost_and_replicas_train_on_the_reference_path(backend, fact):
    assert paths.choose(_call(backend, **fact)).name == paths.REFERENCE
    # Inference does not depend on them.
    inference = paths.choose(_call(backend, training=False, **fact)).name
    assert inference == {"jax": paths.REFERENCE}.get(backend, paths.KERNEL)


@pytest.mark.parametrize("facts,expected", [
    ({}, paths.EXACT_KERNEL),
    ({"xla": True}, paths.XLA),
    ({"gpu": True}, paths.REFERENCE),
    ({"gpu": True, "fused": True}, paths.KERNEL),
    ({"fused": True}, paths.KERNEL),
    ({"shape": (256, 16, 16, 16), "axes": (1,)}, paths.REFERENCE),
    # Below the size floor: plain ops (tensorflow_backend._small_train).
    ({"shape": (128, 128), "axes": (1,)}, paths.EXACT_KERNEL),
    ({"shape": (None, 32, 32, 16)}, paths.EXACT_KERNEL),  # unknown batch
])
def test_tensorflow_training(facts, expected):
    assert paths.choose(_call("tensorflow", **facts)).name == expected


@pytest.mark.parametrize("shape,expected", [
    ((None, 128), paths.REFERENCE),  # model.fit's small dense batch
    ((None, paths.TF_MIN_KERNEL_SIZE_CPU // 128), paths.KERNEL),
    ((None, 32, 32, 16), paths.KERNEL),
])
def test_tensorflow_inference_counts_an_unknown_batch_as_128(shape, expected):
    call = _call("tensorflow", False, shape=shape, axes=(len(shape) - 1,))
    assert paths.choose(call).name == expected


def test_tensorflow_size_floor_is_the_constant():
    floor = paths.TF_MIN_KERNEL_SIZE_CPU
    for training in (True, False):
        small = _call("tensorflow", training, shape=(floor // 64 - 1, 64),
                      axes=(1,), fused=True)
        large = _call("tensorflow", training, shape=(floor // 64, 64),
                      axes=(1,), fused=True)
        assert paths.choose(small).name == paths.REFERENCE
        assert paths.choose(large).name == paths.KERNEL


@pytest.mark.parametrize("facts,expected", [
    ({}, paths.EXACT_KERNEL),
    ({"fused": True}, paths.KERNEL),
    ({"shape": (512, 64), "axes": (1,)}, paths.KERNEL),  # one group
    ({"shape": (513, 64), "axes": (1,)}, paths.EXACT_KERNEL),
    ({"shape": (1031, 64), "axes": (1,)}, paths.REFERENCE),  # a prime
    ({"shape": (8, 16, 32, 32), "axes": (1,)}, paths.KERNEL),  # NCHW
    ({"compiling": True}, paths.REFERENCE),
    ({"shape": (1, 64), "axes": (1,)}, paths.REFERENCE),  # one value
])
def test_torch_training(facts, expected):
    assert paths.choose(_call("torch", **facts)).name == expected


def test_jax_trains_on_xla_but_small_dense_inputs_and_infers_on_reference():
    assert paths.choose(_call("jax")).name == paths.XLA
    assert paths.choose(_call("jax", fused=True)).name == paths.XLA
    assert paths.choose(_call("jax", training=False)).name == paths.REFERENCE
    assert paths.choose(_call("jax", fused=False)).name == paths.REFERENCE
    # Conv inputs at any size; dense ones from JAX_MIN_XLA_SIZE values.
    for shape in ((128, 8, 8, 16), (2, 3, 3, 4), (0, 4, 4, 4), (512, 256)):
        call = _call("jax", shape=shape, axes=(len(shape) - 1,))
        assert paths.choose(call).name == paths.XLA, shape
    for shape in ((128, 128), (511, 256), (0, 4)):
        call = _call("jax", shape=shape, axes=(len(shape) - 1,))
        path = paths.choose(call)
        assert path.name == paths.REFERENCE and "dense input" in str(path)


def test_an_unknown_backend_takes_the_reference_path():
    assert paths.choose(_call("numpy")).name == paths.REFERENCE


def test_reasons_name_every_declined_candidate():
    path = paths.choose(_call("tensorflow", gpu=True))
    assert [name for name, _ in path.declined] == [
        paths.XLA, paths.EXACT_KERNEL, paths.KERNEL]
    text = str(path)
    assert text.startswith("reference:") and "on GPU" in text
    assert "fused=True asks for it" in text


def test_row_groups():
    assert paths.row_groups(512) == 4
    assert paths.row_groups(2048) == 16
    assert paths.row_groups(1031) is None  # prime: one group of 1031
    for rows in range(1, 3000, 7):
        groups = paths.row_groups(rows)
        if groups is not None:
            assert rows % groups == 0 and rows // groups <= 512


def test_the_rules_fit_on_one_screen():
    """The table and the function that reads it: one screen of source."""
    lines = (inspect.getsource(paths.choose).splitlines()
             + [line for line in inspect.getsource(paths).splitlines()
                if line.startswith(("RULES", "    (", "        ("))])
    assert len(lines) <= 60, len(lines)


def test_which_path_answers_for_the_current_backend():
    layer = keras_bn.BatchNormalization()
    x = np.zeros((256, 32, 32, 16), "float32")
    for training in (True, False):
        path = layer.which_path(x, training=training)
        expected = paths.choose(_call(BACKEND, training,
                                      **backend_context()))
        assert path == expected, (path, expected)
    masked = layer.which_path(x, training=True, mask=np.ones(x.shape[:-1]))
    assert masked.name == paths.REFERENCE and "a mask" in str(masked)
    # trainable=False puts the layer in inference, as its call does.
    layer.trainable = False
    assert layer.which_path(x, training=True) == layer.which_path(x)


def backend_context():
    from keras_bn import backends

    return backends.get().context()


def test_the_plan_is_made_once_per_signature(monkeypatch):
    chosen = []
    original = paths.choose
    monkeypatch.setattr(paths, "choose",
                        lambda call: chosen.append(call) or original(call))
    layer = keras_bn.BatchNormalization()
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    for _ in range(3):
        layer(x, training=True)
        layer(x, training=False)
    layer(x[:8], training=True)
    assert len(chosen) == 3, chosen
