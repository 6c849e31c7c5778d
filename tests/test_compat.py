"""Every private name in keras_bn/_compat.py still does what we use it for.

When a Keras, TensorFlow or PyTorch release moves one of them, the failure
names the entry, so the fix starts in one file.
"""

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import _compat

BACKEND = keras.backend.backend()


def _moved(entry: str) -> str:
    return (f"keras_bn._compat.{entry}: the private name behind it moved or "
            f"changed (checked on {_compat.__doc__.split('Checked on ')[1]}")


def test_functional_is_the_class_of_functional_models():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert isinstance(model, _compat.Functional), _moved("Functional")
    clone = keras.models.clone_model(model)
    assert isinstance(clone, _compat.Functional), _moved("Functional")


def test_flatten_layers_reaches_nested_and_wrapped_layers():
    bn = keras_bn.BatchNormalization(name="inner_bn")
    inner = keras.Sequential([keras.Input((4, 3)),
                              keras.layers.TimeDistributed(bn)], name="inner")
    outer = keras.Sequential([keras.Input((4, 3)), inner], name="outer")
    names = [layer.name for layer in _compat.flatten_layers(outer)]
    assert names[0] == "outer" and "inner" in names, _moved("flatten_layers")
    assert "inner_bn" in names, _moved("flatten_layers")
    assert "outer" not in [layer.name for layer in
                           _compat.flatten_layers(outer, False)]


@pytest.mark.parametrize("axis,expected", [(-1, (0, 1, 2)), (1, (0, 2, 3))])
def test_reduction_axes_of_keras_layer(axis, expected):
    for cls in (keras.layers.BatchNormalization, keras_bn.BatchNormalization):
        layer = cls(axis=axis)
        layer.build((2, 3, 4, 5))
        got = tuple(sorted(_compat.reduction_axes(layer)))
        assert got == expected, (got, _moved("reduction_axes"))


def test_shadow_call_routes_one_instance():
    seen = []
    a, b = keras.layers.Identity(), keras.layers.Identity()
    original = a.call

    def call(inputs, **kwargs):
        seen.append("a")
        return original(inputs, **kwargs)

    _compat.shadow_call(a, call)
    x = np.ones((2, 3), "float32")
    a(x), b(x)
    assert seen == ["a"], _moved("shadow_call")
    _compat.unshadow_call(a)
    a(x)
    assert seen == ["a"], _moved("unshadow_call")


def test_in_stateless_scope_and_variable_storage():
    v = keras.Variable(np.ones(3, "float32"), trainable=False)
    assert not _compat.in_stateless_scope(), _moved("in_stateless_scope")
    with keras.StatelessScope(state_mapping=[(v, np.zeros(3, "float32"))]):
        assert _compat.in_stateless_scope(), _moved("in_stateless_scope")
        # The stored tensor, not the scope's value that `value` returns.
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(_compat.variable_storage(v)),
            np.ones(3), err_msg=_moved("variable_storage"))
    v.assign(np.full(3, 2.0, "float32"))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(_compat.variable_storage(v)),
        np.full(3, 2.0), err_msg=_moved("variable_storage"))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's XLA query")
def test_tf_in_xla_context_tells_xla_from_graph():
    import tensorflow as tf

    seen = {}

    def probe(x, key):
        seen[key] = _compat.tf_in_xla_context()
        return x

    tf.function(lambda x: probe(x, "xla"), jit_compile=True)(tf.ones(2))
    tf.function(lambda x: probe(x, "graph"))(tf.ones(2))
    assert seen == {"xla": True, "graph": False}, _moved("tf_in_xla_context")


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's private names")
def test_torch_names():
    import torch

    t = torch.zeros(3)
    before = _compat.torch_version(t)
    t.add_(1.0)
    assert _compat.torch_version(t) > before, _moved("torch_version")

    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (64, 5, 3)).astype("float32")
    mean, var = _compat.torch_batch_norm_update_stats(
        torch.as_tensor(x), None, None, 1.0)
    np.testing.assert_allclose(mean.numpy(), x.mean((0, 2)), rtol=1e-5,
                               err_msg=_moved("torch_batch_norm_update_stats"))
    np.testing.assert_allclose(var.numpy(), x.var((0, 2)), rtol=1e-4,
                               err_msg=_moved("torch_batch_norm_update_stats"))

    x2 = torch.as_tensor(x[:, :, 0])
    dy = torch.as_tensor(rng.normal(size=(64, 5)).astype("float32"))
    mu = x2.mean(0)
    _, sum_dyx, sum_dy = _compat.torch_native_batch_norm_backward(
        dy, x2, None, None, None, mu, torch.ones(5), True, 0.0,
        [False, True, True])
    np.testing.assert_allclose(sum_dy.numpy(), dy.numpy().sum(0), rtol=1e-5,
                               err_msg=_moved("torch_native_batch_norm_backward"))
    np.testing.assert_allclose(
        sum_dyx.numpy(), (dy.numpy() * (x2.numpy() - mu.numpy())).sum(0),
        rtol=1e-4, atol=1e-4,
        err_msg=_moved("torch_native_batch_norm_backward"))
