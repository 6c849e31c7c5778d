"""Bad input fails early with a clear message naming the argument."""

import keras
import numpy as np
import pytest

import keras_bn

BN = keras_bn.BatchNormalization


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"momentum": 1.5}, ValueError, ["momentum", "1.5"]),
        ({"momentum": -0.1}, ValueError, ["momentum", "-0.1"]),
        ({"momentum": "0.9"}, TypeError, ["momentum", "'0.9'"]),
        ({"renorm_momentum": 2.0}, ValueError, ["renorm_momentum", "2.0"]),
        ({"epsilon": 0.0}, ValueError, ["epsilon", "0.0"]),
        ({"epsilon": -1e-3}, ValueError, ["epsilon", "-0.001"]),
        ({"epsilon": float("nan")}, ValueError, ["epsilon", "nan"]),
        ({"epsilon": None}, TypeError, ["epsilon", "None"]),
        ({"axis": [1, 1]}, ValueError, ["axis", "[1, 1]"]),
        ({"axis": 1.5}, TypeError, ["axis", "1.5"]),
        ({"axis": []}, TypeError, ["axis", "[]"]),
        ({"axis": True}, TypeError, ["axis", "True"]),
        ({"renorm": True, "renorm_clipping": {"rmax": 2, "foo": 1}},
         ValueError, ["renorm_clipping", "foo"]),
        ({"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 2.0}},
         ValueError, ["rmax", "0.5", "rmin", "2.0"]),
        ({"renorm": True, "renorm_clipping": {"dmax": -1}},
         ValueError, ["dmax", "-1"]),
        ({"renorm": True, "renorm_clipping": [1, 2]},
         TypeError, ["renorm_clipping", "[1, 2]"]),
        ({"renorm_clipping": {"rmax": 2.0}}, ValueError, ["renorm_clipping", "renorm"]),
        ({"data_format": "NHWC"}, ValueError, ["data_format", "NHWC"]),
        ({"data_format": "channels_first", "axis": 3}, ValueError,
         ["data_format", "channels_first", "axis=3"]),
        ({"virtual_batch_size": 0}, ValueError, ["virtual_batch_size", "0"]),
        ({"virtual_batch_size": 2.5}, TypeError, ["virtual_batch_size", "2.5"]),
        ({"fused": "yes"}, ValueError, ["fused", "yes"]),
        ({"synchronized": True, "synchronized_group_size": 0}, ValueError,
         ["synchronized_group_size", "0"]),
        ({"synchronized": True, "synchronized_group_size": 2.0}, TypeError,
         ["synchronized_group_size", "2.0"]),
        ({"synchronized_group_size": 2}, ValueError,
         ["synchronized_group_size", "synchronized=False"]),
    ],
)
def test_constructor_rejects(kwargs, error, words):
    with pytest.raises(error) as info:
        BN(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize(
    "kwargs, shape, words",
    [
        ({"axis": 3}, (None, 4, 5), ["axis", "3", "rank 3"]),
        ({"axis": -4}, (None, 4, 5), ["axis", "-4"]),
        ({"axis": [1, -2]}, (None, 4, 5), ["axis", "[1, -2]"]),
        ({"axis": -1}, (None, 4, None), ["axis", "None"]),
        ({"axis": 0, "virtual_batch_size": 2}, (8, 4), ["virtual_batch_size", "axis"]),
    ],
)
def test_build_rejects(kwargs, shape, words):
    layer = BN(**kwargs)
    with pytest.raises(ValueError) as info:
        layer.build(shape)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_data_format_agreeing_with_axis_is_fine():
    assert BN(data_format="channels_first", axis=1).axis == 1
    assert BN(data_format="channels_last").axis == -1


@pytest.mark.parametrize("dtype", ["complex64"])
def test_complex_inputs_rejected(dtype):
    if keras.backend.backend() == "jax":
        import jax.numpy as jnp

        x = jnp.ones((4, 3), dtype)
    elif keras.backend.backend() == "torch":
        import torch

        x = torch.ones((4, 3), dtype=torch.complex64)
    else:
        import tensorflow as tf

        x = tf.ones((4, 3), dtype)
    layer = BN()
    layer.build((4, 3))
    with pytest.raises(TypeError, match="complex64"):
        layer.call(x, training=True)


@pytest.mark.parametrize("mask_shape", [(4, 6), (5,), (4, 5, 6, 3)])
def test_mask_shape_must_fit(mask_shape):
    x = np.zeros((4, 5, 3), "float32")
    with pytest.raises(ValueError) as info:
        BN()(x, training=True, mask=np.ones(mask_shape, bool))
    assert "mask" in str(info.value) and str(mask_shape) in str(info.value)


def test_failed_call_leaves_state_intact():
    layer = BN(momentum=0.5)
    x = np.ones((4, 5, 3), "float32")
    layer(x, training=True)
    before = [w.copy() for w in layer.get_weights()]
    with pytest.raises(ValueError):
        layer(x * 7, training=True, mask=np.ones((4, 6), bool))
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_wrong_channel_count_after_build():
    layer = BN()
    layer(np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="axis"):
        layer(np.zeros((2, 4), "float32"))
