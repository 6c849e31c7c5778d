"""Tests for `keras_bn.interop`: PyTorch and Flax batch norms.

Every expected value comes from torch or Flax themselves (their modules'
outputs, gradients, buffers and attributes), never from keras_bn. The
torch modules get random weights and running statistics first: with the
initial ones (1, 0, 0, 1) a swapped pair of vectors would go unnoticed.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

import keras_bn
from keras_bn import _execution
from keras_bn import interop
from tests.reference import assert_close

L = keras.layers


def _np(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _randomize(module, seed=0):
    """Random affine parameters and running statistics for a torch BN."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, low, high in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5),
                                ("running_mean", -1.0, 1.0),
                                ("running_var", 0.3, 3.0)):
            tensor = getattr(module, name)
            if tensor is not None:
                values = torch.rand(tensor.shape, generator=gen,
                                    dtype=torch.float64)
                tensor.copy_(low + (high - low) * values)
    return module


def _torch_out(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _x(shape, seed=1, loc=0.0, scale=1.0, dtype="float32"):
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(dtype)


# ------------------------------------------------------------ torch, layers

_MODULES = {
    "1d": lambda: torch.nn.BatchNorm1d(5),
    "2d_eps_momentum": lambda: torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.3),
    "3d_no_affine": lambda: torch.nn.BatchNorm3d(3, affine=False),
    "2d_no_bias": lambda: torch.nn.BatchNorm2d(4, bias=False),
    "2d_cumulative": lambda: torch.nn.BatchNorm2d(4, momentum=None),
    "2d_float64": lambda: torch.nn.BatchNorm2d(4, momentum=0.05,
                                               dtype=torch.float64),
    "2d_bfloat16": lambda: torch.nn.BatchNorm2d(4, dtype=torch.bfloat16),
    "1d_float16": lambda: torch.nn.BatchNorm1d(4, dtype=torch.float16),
}


def _trained(module, steps=3):
    """`module` after a few training calls (num_batches_tracked > 0)."""
    shape = {torch.nn.BatchNorm1d: (6, module.num_features),
             torch.nn.BatchNorm2d: (6, module.num_features, 3, 3),
             torch.nn.BatchNorm3d: (6, module.num_features, 2, 2, 2)}
    size = next(s for cls, s in shape.items() if isinstance(module, cls))
    module.train()
    with torch.no_grad():
        for step in range(steps):
            module(torch.from_numpy(_x(size, seed=step, loc=2.0)).to(
                module.running_mean.dtype))
    return _randomize(module)


def _has_float64() -> bool:
    """False on JAX without `jax_enable_x64`, which stores float32."""
    return keras.backend.standardize_dtype(
        keras.ops.zeros((1,), "float64").dtype) == "float64"


@pytest.mark.parametrize("kind", sorted(_MODULES))
def test_torch_round_trip_is_exact(kind):
    if kind.endswith("float64") and not _has_float64():
        pytest.skip("this backend stores float64 weights as float32")
    original = _trained(_MODULES[kind]())
    layer = interop.from_torch(original)
    assert isinstance(layer, keras_bn.BatchNormalization) and layer.built
    back = interop.to_torch(layer)
    assert type(back) is type(original)
    for attribute in ("num_features", "eps", "momentum", "affine",
                      "track_running_stats"):
        assert getattr(back, attribute) == getattr(original, attribute), \
            attribute
    assert (back.bias is None) == (original.bias is None)
    expected, got = original.state_dict(), back.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        if key == "num_batches_tracked" and original.momentum is not None:
            # torch reads it only for momentum=None; the layer keeps none.
            assert int(got[key]) == 0
            continue
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def test_torch_conventions_are_converted():
    module = _randomize(torch.nn.BatchNorm2d(4, momentum=0.1))
    layer = interop.from_torch(module)
    # Keras's momentum weighs the old value: torch's 0.1 is 0.9 here.
    assert layer.momentum == 0.9
    assert layer.epsilon == module.eps == 1e-5
    assert layer.moving_variance_estimator == "unbiased"
    assert layer.axis == 1 and layer.center and layer.scale
    for keras_name, torch_name in (("gamma", "weight"), ("beta", "bias"),
                                   ("moving_mean", "running_mean"),
                                   ("moving_variance", "running_var")):
        np.testing.assert_array_equal(
            _np(getattr(layer, keras_name)),
            getattr(module, torch_name).detach().numpy())
    assert [w.name for w in layer.weights] == [
        "gamma", "beta", "moving_mean", "moving_variance"]
    cumulative = interop.from_torch(_trained(
        torch.nn.BatchNorm1d(3, momentum=None), steps=4))
    assert cumulative.momentum is None
    assert int(_np(cumulative.num_batches_tracked)) == 4


def test_state_dict_uses_torch_defaults():
    module = _trained(torch.nn.BatchNorm2d(4, eps=1e-5, momentum=0.1))
    layer = interop.from_torch(module.state_dict())
    assert (layer.epsilon, layer.momentum) == (1e-5, 0.9)
    assert layer.input_spec.ndim == 4  # BatchNorm2d's, the default
    module.eval()
    x = _x((2, 4, 3, 3))
    assert_close(_np(layer(x)), _torch_out(module, x), tol=1e-6)
    other = interop.from_torch(module.state_dict(), epsilon=1e-3,
                               momentum=0.5, input_rank=3, name="bn")
    assert (other.epsilon, other.momentum, other.name) == (1e-3, 0.5, "bn")


@pytest.mark.parametrize("make,shape,rank", [
    (lambda: torch.nn.BatchNorm1d(5, eps=1e-4), (6, 5), None),
    (lambda: torch.nn.BatchNorm1d(5), (6, 5, 7), 3),
    (lambda: torch.nn.BatchNorm2d(4, affine=False), (3, 4, 5, 6), None),
    (lambda: torch.nn.BatchNorm3d(3, bias=False), (2, 3, 4, 3, 2), None),
])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_inference_matches_torch(make, shape, rank, layout):
    module = _randomize(make()).eval()
    x = _x(shape, loc=1.0, scale=2.0)
    expected = _torch_out(module, x)
    if layout == "channels_first":
        layer = interop.from_torch(module, input_rank=rank)
        got = _np(layer(x))
    else:
        layer = interop.from_torch(module, input_rank=rank, axis=-1)
        order = (0,) + tuple(range(2, len(shape))) + (1,)
        got = np.moveaxis(_np(layer(np.ascontiguousarray(
            x.transpose(order)))), -1, 1)
    assert_close(got, expected, tol=1e-6, what=layout)
    # data_format is the other spelling of the same axis.
    named = interop.from_torch(module, input_rank=rank, data_format=layout)
    assert named.axis == (1 if layout == "channels_first" else -1)


def test_to_torch_channels_last_expects_channels_first_inputs():
    layer = keras_bn.BatchNormalization(epsilon=1e-4, momentum=0.95,
                                        moving_variance_estimator="unbiased")
    x = _x((2, 5, 6, 3), loc=0.5)
    layer(x, training=True)  # non-trivial moving statistics
    layer.gamma.assign(np.array([0.5, 2.0, 1.5], "float32"))
    module = interop.to_torch(layer).eval()
    assert isinstance(module, torch.nn.BatchNorm2d)
    assert (module.eps, module.momentum) == (1e-4, 0.05)
    got = _torch_out(module, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    assert_close(got.transpose(0, 2, 3, 1), _np(layer(x)), tol=1e-6)


@pytest.mark.parametrize("rank,cls", [(2, torch.nn.BatchNorm1d),
                                      (3, torch.nn.BatchNorm1d),
                                      (5, torch.nn.BatchNorm3d)])
def test_to_torch_class_follows_rank(rank, cls):
    layer = keras_bn.BatchNormalization(axis=1,
                                        moving_variance_estimator="unbiased")
    layer.build((None, 3) + (4,) * (rank - 2))
    assert type(interop.to_torch(layer)) is cls


def test_to_torch_from_keras_layer_and_center_only():
    layer = L.BatchNormalization(axis=1, epsilon=1e-5)
    x = _x((4, 3, 2), loc=2.0)
    layer(x, training=True)
    with pytest.warns(UserWarning, match="biased"):
        module = interop.to_torch(layer)
    assert isinstance(module, torch.nn.BatchNorm1d)
    assert_close(_torch_out(module.eval(), x), _np(layer(x)), tol=1e-6)

    center_only = keras_bn.BatchNormalization(
        axis=1, scale=False, moving_variance_estimator="unbiased")
    center_only(x, training=True)
    center_only.beta.assign(np.array([0.1, -0.2, 0.3], "float32"))
    module = interop.to_torch(center_only)
    # torch has no offset without a scale: a frozen scale of ones.
    assert not module.weight.requires_grad
    assert torch.equal(module.weight, torch.ones(3))
    assert_close(_torch_out(module.eval(), x), _np(center_only(x)), tol=1e-6)

    frozen = keras_bn.BatchNormalization(axis=1,
                                         moving_variance_estimator="unbiased")
    frozen.build((None, 3))
    frozen.trainable = False
    module = interop.to_torch(frozen)
    assert not module.training and not module.weight.requires_grad


@pytest.mark.parametrize("kwargs,shape,words", [
    ({"axis": [1, 2]}, (None, 3, 4, 5), "one feature axis"),
    ({"renorm": True}, (None, 3), "Renormalization"),
    ({"virtual_batch_size": 2}, (None, 3), "ghost"),
    ({}, (None, 2, 2, 2, 2, 3), "rank 6"),
])
def test_to_torch_refuses_what_torch_cannot_express(kwargs, shape, words):
    layer = keras_bn.BatchNormalization(moving_variance_estimator="unbiased",
                                        **kwargs)
    layer.build(shape)
    with pytest.raises(ValueError, match=words):
        interop.to_torch(layer)


# ------------------------------------------------------------ torch, training

def _sgd(tensor_or_variable, grad, lr):
    if isinstance(tensor_or_variable, torch.Tensor):
        with torch.no_grad():
            tensor_or_variable -= lr * grad
    else:
        tensor_or_variable.assign(_np(tensor_or_variable) - lr * grad)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_ten_training_steps_match_torch(momentum, layout):
    """Ten steps of BatchNorm2d and of the layer loaded from it, with the
    same SGD updates of the scale and offset: outputs, gradients and
    running statistics agree. torch's own autograd and buffers give the
    expected values, whatever Keras's backend is."""
    module = _randomize(torch.nn.BatchNorm2d(3, momentum=momentum))
    module.train()
    if layout == "channels_first":
        layer = interop.from_torch(module)
    else:
        layer = interop.from_torch(module, axis=-1)
    lr = 0.1
    rng = np.random.default_rng(7)
    for step in range(10):
        # Batches of different means and sizes; 8 * 4 * 5 values per channel.
        x = rng.normal(2.0 + step, 1.5, (8, 3, 4, 5)).astype("float32")
        dy = rng.normal(size=x.shape).astype("float32")
        xt = torch.from_numpy(x).requires_grad_(True)
        y = module(xt)
        dx, dw, db = torch.autograd.grad(
            y, [xt, module.weight, module.bias], torch.from_numpy(dy))
        if layout == "channels_first":
            result = _execution.run(layer, x, upstream=dy)
            outputs, grad_x = result.outputs, result.dx
        else:
            result = _execution.run(
                layer, np.ascontiguousarray(x.transpose(0, 2, 3, 1)),
                upstream=np.ascontiguousarray(dy.transpose(0, 2, 3, 1)))
            outputs = result.outputs.transpose(0, 3, 1, 2)
            grad_x = result.dx.transpose(0, 3, 1, 2)
        what = f"step {step}"
        assert_close(outputs, y.detach().numpy(), what=what + " outputs")
        assert_close(grad_x, dx.numpy(), what=what + " dx")
        assert_close(result.grads["gamma"], dw.numpy(), what=what + " dgamma")
        assert_close(result.grads["beta"], db.numpy(), what=what + " dbeta")
        assert_close(result.moving["moving_mean"],
                     module.running_mean.numpy(), what=what + " mean")
        assert_close(result.moving["moving_variance"],
                     module.running_var.numpy(), what=what + " variance")
        if momentum is None:
            assert int(result.moving["num_batches_tracked"]) == int(
                module.num_batches_tracked)
        _sgd(module.weight, dw, lr)
        _sgd(module.bias, db, lr)
        _sgd(layer.gamma, result.grads["gamma"], lr)
        _sgd(layer.beta, result.grads["beta"], lr)
    module.eval()
    x = rng.normal(5.0, 2.0, (4, 3, 4, 5)).astype("float32")
    expected = _torch_out(module, x)
    if layout == "channels_first":
        got = _np(layer(x))
    else:
        got = _np(layer(np.ascontiguousarray(x.transpose(0, 2, 3, 1))))
        got = got.transpose(0, 3, 1, 2)
    assert_close(got, expected, tol=1e-5, what="inference after training")
    back = interop.to_torch(layer)
    if momentum is None:
        assert int(back.num_batches_tracked) == 10


# ---------------------------------------------------------------- load_torch

class _TorchCNN(torch.nn.Module):
    """Conv-BN-ReLU x2, then Linear-BN1d (after a global average pool)."""

    def __init__(self, bn_order="call"):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        if bn_order == "reversed":  # registered in another order than called
            self.head_bn = torch.nn.BatchNorm1d(5, eps=1e-3, momentum=0.2)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 6, 3)
        self.bn2 = torch.nn.BatchNorm2d(6, momentum=0.01)
        self.linear = torch.nn.Linear(6, 5)
        if bn_order == "call":
            self.head_bn = torch.nn.BatchNorm1d(5, eps=1e-3, momentum=0.2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x.mean(dim=(2, 3))
        return self.head_bn(self.linear(x))


def _torch_cnn(bn_order="call"):
    torch.manual_seed(0)
    net = _TorchCNN(bn_order)
    for module in net.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            _randomize(module, seed=module.num_features)
    return net.eval()


def _keras_cnn(head_bn_width=5):
    """The same network, channels last, with Keras's default batch-norm
    settings (epsilon 1e-3, momentum 0.99), and Keras's own layer last."""
    inputs = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    h = keras_bn.BatchNormalization(name="bn1")(h)
    h = L.ReLU()(h)
    h = L.Conv2D(6, 3, name="conv2")(h)
    h = keras_bn.BatchNormalization(name="bn2")(h)
    h = L.ReLU()(h)
    h = L.GlobalAveragePooling2D()(h)
    h = L.Dense(head_bn_width, name="linear")(h)
    outputs = L.BatchNormalization(name="head_bn")(h)
    return keras.Model(inputs, outputs)


def _copy_linear_layers(model, net):
    """Copies conv and dense weights, kernels transposed to Keras's layout."""
    for name, order in (("conv1", (2, 3, 1, 0)), ("conv2", (2, 3, 1, 0)),
                        ("linear", (1, 0))):
        torch_layer = getattr(net, name)
        model.get_layer(name).set_weights([
            torch_layer.weight.detach().numpy().transpose(order),
            torch_layer.bias.detach().numpy()])


def _all_weights(model):
    return [np.array(_np(v)) for v in model.weights]


def _settings(model):
    return [(layer.name, layer.epsilon, layer.momentum) for layer in
            model.layers if isinstance(layer, (L.BatchNormalization,
                                               keras_bn.BatchNormalization))]


def test_load_torch_cnn_predicts_what_torch_does():
    net = _torch_cnn()
    model = _keras_cnn()
    _copy_linear_layers(model, net)
    x = _x((4, 3, 8, 8), loc=0.5)
    x_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    stale = model.predict(x_last, verbose=0)  # traced with epsilon=1e-3
    report = interop.load_torch(model, net)
    expected = _torch_out(net, x)
    assert np.abs(stale - expected).max() > 1e-4  # the load changes it
    assert_close(model.predict(x_last, verbose=0), expected, tol=1e-5)
    assert_close(_np(model(x_last, training=False)), expected, tol=1e-5)
    assert report.loaded == [("bn1", "bn1"), ("bn2", "bn2"),
                             ("head_bn", "head_bn")]
    assert report.skipped == []
    unbiased = {"moving_variance_estimator": ("biased", "unbiased")}
    assert report.settings == {
        "bn1": {"epsilon": (1e-3, 1e-5), "momentum": (0.99, 0.9), **unbiased},
        "bn2": {"epsilon": (1e-3, 1e-5), **unbiased},  # 1 - 0.01 = 0.99
        "head_bn": {"momentum": (0.99, 0.8)},  # Keras's own layer
    }
    assert _settings(model) == [("bn1", 1e-5, 0.9), ("bn2", 1e-5, 0.99),
                                ("head_bn", 1e-3, 0.8)]
    assert model.get_layer("bn1").moving_variance_estimator == "unbiased"
    assert [n for n in report.notes if "head_bn" in n]
    text = str(report)
    assert "bn1" in text and "head_bn <- head_bn" in text


def test_load_torch_mismatch_loads_nothing():
    net = _torch_cnn()
    model = _keras_cnn(head_bn_width=7)  # the last pair's widths differ
    before, settings = _all_weights(model), _settings(model)
    with pytest.raises(ValueError, match=r"head_bn.*\(7,\).*\(5,\)"):
        interop.load_torch(model, net)
    for old, new in zip(before, _all_weights(model)):
        np.testing.assert_array_equal(old, new)
    assert _settings(model) == settings

    extra = torch.nn.Sequential(net, torch.nn.BatchNorm1d(5))
    with pytest.raises(ValueError, match="3 batch-norm layer.*4 batch-norm"):
        interop.load_torch(_keras_cnn(), extra)


def test_load_torch_mapping():
    # named_modules() gives head_bn first: call order fails on shapes...
    net = _torch_cnn(bn_order="reversed")
    model = _keras_cnn()
    _copy_linear_layers(model, net)
    with pytest.raises(ValueError, match="Shape mismatch"):
        interop.load_torch(model, net)
    # ...and an explicit mapping pairs them by name.
    mapping = {"bn1": "bn1", "bn2": "bn2", "head_bn": "head_bn"}
    report = interop.load_torch(model, net, mapping=mapping)
    assert report.loaded == list(mapping.items())
    x = _x((3, 3, 8, 8))
    assert_close(_np(model(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))),
                 _torch_out(net, x), tol=1e-5)

    fresh = _keras_cnn()
    before = _np(fresh.get_layer("bn2").moving_mean)
    report = interop.load_torch(
        fresh, net, mapping={"bn1": "bn1", "bn2": None, "head_bn": "head_bn"})
    assert report.skipped == ["bn2"]
    np.testing.assert_array_equal(_np(fresh.get_layer("bn2").moving_mean),
                                  before)
    with pytest.raises(ValueError, match=r"Missing layers: \['head_bn'\]"):
        interop.load_torch(fresh, net, mapping={"bn1": "bn1", "bn2": "bn2"})
    with pytest.raises(ValueError, match=r"of torch_module: \['bn9'\]"):
        interop.load_torch(fresh, net, mapping={
            "bn1": "bn1", "bn2": "bn9", "head_bn": "head_bn"})


def test_load_torch_cumulative_needs_a_cumulative_layer():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4),
                              torch.nn.BatchNorm1d(4, momentum=None))
    _trained(net[1], steps=5)
    model = keras.Sequential([keras.Input((3,)), L.Dense(4),
                              keras_bn.BatchNormalization(name="bn")])
    with pytest.raises(ValueError, match="momentum=None"):
        interop.load_torch(model, net)
    model = keras.Sequential([keras.Input((3,)), L.Dense(4),
                              keras_bn.BatchNormalization(momentum=None,
                                                          name="bn")])
    model.layers[0].set_weights([net[0].weight.detach().numpy().T,
                                 net[0].bias.detach().numpy()])
    interop.load_torch(model, net)
    layer = model.layers[-1]
    assert int(_np(layer.num_batches_tracked)) == 5
    # Training goes on by torch's rules (set after the layer was built).
    x = _x((6, 3), seed=9, loc=1.0)
    net.train()
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert_close(_np(model(x, training=True)), expected)
    assert_close(_np(layer.moving_mean), net[1].running_mean.numpy())
    assert_close(_np(layer.moving_variance), net[1].running_var.numpy())
    assert int(_np(layer.num_batches_tracked)) == 6

    root = interop.load_torch(model.layers[-1], net[1])
    assert root.loaded == [("bn", "")]
    assert "(torch_module itself)" in str(root)


# ----------------------------------------------------------------------- Flax

def _flax():
    return pytest.importorskip("flax.linen")


def _flax_variables(nn, module, shape, seed=0):
    """A Flax BatchNorm's variables after two training calls, randomized."""
    import jax

    x = _x(shape, seed=seed, loc=1.0)
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    rng = np.random.default_rng(seed)
    out = {}
    for collection, names in variables.items():
        out[collection] = {
            name: (rng.uniform(0.3, 3.0, value.shape) if name == "var"
                   else rng.uniform(-1.0, 1.0, value.shape)).astype("float32")
            for name, value in names.items()}
    return out


@pytest.mark.parametrize("attributes,shape", [
    ({"momentum": 0.9, "epsilon": 1e-4}, (4, 5, 5, 3)),
    ({}, (6, 4)),
    ({"use_bias": False, "use_scale": False}, (4, 3, 2)),
    ({"use_scale": False, "axis": 1}, (4, 3, 2)),
    ({"axis": (1, 2), "momentum": 0.8}, (4, 3, 2, 5)),
])
def test_flax_round_trip_and_inference(attributes, shape):
    nn = _flax()
    module = nn.BatchNorm(**attributes)
    variables = _flax_variables(nn, module, shape)
    layer = interop.from_flax(variables, input_rank=len(shape), **attributes)
    back, back_attributes = interop.to_flax(layer)
    assert set(back) == set(variables)
    for collection, names in variables.items():
        assert set(back[collection]) == set(names)
        for name, value in names.items():
            assert back[collection][name].dtype == value.dtype
            np.testing.assert_array_equal(back[collection][name], value)
    for key, value in attributes.items():
        assert back_attributes[key] == value, key
    for key in ("momentum", "epsilon", "axis", "use_bias", "use_scale"):
        assert back_attributes[key] == getattr(module, key), key

    x = _x(shape, seed=3, loc=0.5, scale=2.0)
    expected = np.asarray(module.apply(variables, x, use_running_average=True))
    assert_close(_np(layer(x)), expected, tol=1e-6)
    # Flax rebuilt from to_flax's attributes computes the same.
    again = nn.BatchNorm(**back_attributes).apply(back, x,
                                                  use_running_average=True)
    assert_close(np.asarray(again), expected, tol=1e-6)


def test_flax_training_step_matches_flax():
    """Flax's momentum weighs the old value, as Keras's does, and Flax
    updates with the biased variance: one training call of each agrees."""
    nn = _flax()
    module = nn.BatchNorm(momentum=0.8, epsilon=1e-4,
                          use_fast_variance=False)
    variables = _flax_variables(nn, module, (16, 3))
    layer = interop.from_flax(variables, momentum=0.8, epsilon=1e-4,
                              input_rank=2)
    x = _x((16, 3), seed=5, loc=3.0, scale=2.0)
    y, state = module.apply(variables, x, use_running_average=False,
                            mutable=["batch_stats"])
    assert_close(_np(layer(x, training=True)), np.asarray(y))
    assert_close(_np(layer.moving_mean), np.asarray(
        state["batch_stats"]["mean"]))
    assert_close(_np(layer.moving_variance), np.asarray(
        state["batch_stats"]["var"]))


def test_flax_defaults_and_running_average():
    nn = _flax()
    variables = _flax_variables(nn, nn.BatchNorm(), (4, 3))
    layer = interop.from_flax(variables)
    flax_module = nn.BatchNorm()
    assert (layer.momentum, layer.epsilon, layer.axis) == (
        flax_module.momentum, flax_module.epsilon, flax_module.axis)
    assert layer.trainable
    frozen = interop.from_flax(variables, use_running_average=True)
    assert not frozen.trainable
    assert interop.to_flax(frozen)[1]["use_running_average"] is True


@pytest.mark.parametrize("kwargs,words", [
    ({"momentum": None}, "momentum=None"),
    ({"moving_variance_estimator": "unbiased"}, "biased"),
    ({"virtual_batch_size": 2}, "ghost"),
])
def test_to_flax_refuses_what_flax_cannot_express(kwargs, words):
    layer = keras_bn.BatchNormalization(**kwargs)
    layer.build((None, 3))
    with pytest.raises(ValueError, match=words):
        interop.to_flax(layer)


# ------------------------------------------------------------------ bad input

def _state():
    return _randomize(torch.nn.BatchNorm2d(3)).state_dict()


@pytest.mark.parametrize("call,error,words", [
    (lambda: interop.from_torch(torch.nn.Linear(3, 3)), TypeError,
     r"module_or_state_dict.*Linear"),
    (lambda: interop.from_torch(torch.nn.InstanceNorm2d(3)), TypeError,
     "module_or_state_dict"),
    (lambda: interop.from_torch("bn"), TypeError,
     r"module_or_state_dict='bn' \(of type str\)"),
    (lambda: interop.from_torch(
        torch.nn.BatchNorm2d(3, track_running_stats=False)), ValueError,
     "track_running_stats=False"),
    (lambda: interop.from_torch(
        torch.nn.BatchNorm2d(3, track_running_stats=False).state_dict()),
     ValueError, r"lacks \['running_mean', 'running_var'\].*track_running"),
    (lambda: interop.from_torch({k: v for k, v in _state().items()
                                 if k != "running_var"}), ValueError,
     r"lacks \['running_var'\]"),
    (lambda: interop.from_torch({"bn.weight": torch.ones(3)}), ValueError,
     r"\['bn.weight'\].*load_torch"),
    (lambda: interop.from_torch({**_state(), "running_var": torch.ones(4)}),
     ValueError, "one shape"),
    (lambda: interop.from_torch({**_state(), "weight": "ones"}), ValueError,
     r"module_or_state_dict\['weight'\]"),
    (lambda: interop.from_torch(torch.nn.LazyBatchNorm2d()), ValueError,
     "lazy module"),
    (lambda: interop.from_torch(_state(), input_rank="4"), TypeError,
     "input_rank='4'"),
    (lambda: interop.from_torch(_state(), input_rank=1), ValueError,
     "input_rank=1"),
    (lambda: interop.from_torch(_state(), renorm=True), ValueError,
     "renorm=True"),
    (lambda: interop.from_torch(_state(), center=False), ValueError,
     "center=False"),
    (lambda: interop.from_torch(_state(), axis=0), ValueError,
     "batch axis"),
    (lambda: interop.from_torch(_state(), momentum=2.0), ValueError,
     "momentum=2.0"),
    (lambda: interop.to_torch(torch.nn.BatchNorm2d(3)), TypeError,
     r"`layer`.*BatchNorm2d"),
    (lambda: interop.to_torch(keras_bn.BatchNormalization(name="bn")),
     ValueError, "'bn' \\(not built\\)"),
    (lambda: interop.to_flax(L.Dense(3)), TypeError, "`layer`.*Dense"),
    (lambda: interop.from_flax([1, 2]), TypeError, r"variables=\[1, 2\]"),
    (lambda: interop.from_flax({"batch_stats": {"mean": np.zeros(3)}}),
     ValueError, r"Missing: \['var'\]"),
    (lambda: interop.from_flax({"params": {"BatchNorm_0": {}},
                                "batch_stats": {"BatchNorm_0": {}}}),
     ValueError, r"unexpected: \['BatchNorm_0', 'BatchNorm_0'\]"),
    (lambda: interop.from_flax({"batch_stats": {"mean": np.zeros(3),
                                                "var": np.ones(3)}},
                               use_bias=True), ValueError, "use_bias=True"),
    (lambda: interop.load_torch("model", torch.nn.BatchNorm1d(3)), TypeError,
     "keras_model='model'"),
    (lambda: interop.load_torch(_keras_cnn(), {"bn1.weight": 1}), TypeError,
     "torch_module="),
    (lambda: interop.load_torch(_keras_cnn(), _torch_cnn(), mapping=["bn1"]),
     TypeError, r"mapping=\['bn1'\]"),
    (lambda: interop.load_torch(_keras_cnn(), _torch_cnn(),
                                mapping={"bn1": 1}), TypeError,
     r"mapping\['bn1'\]=1"),
    (lambda: interop.load_torch(_keras_cnn(), _torch_cnn(), mapping={
        "bn1": "bn1", "bn2": "bn2", "head_bn": "head_bn", "dense": "bn1"}),
     ValueError, r"Not batch-norm layers of keras_model: \['dense'\]"),
    (lambda: interop.load_torch(keras.Sequential([L.Dense(3)]),
                                torch.nn.BatchNorm1d(3)), ValueError,
     "no batch-norm layer"),
])
def test_bad_input_raises(call, error, words):
    with pytest.raises(error, match=words):
        call()


# ----------------------------------------------------------------------- docs

def test_docs_example_runs_and_agrees(capsys):
    """docs/interop.md's load_torch example, as printed there."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" /
            "interop.md").read_text()
    code = re.search(r"<!-- example: load_torch -->\n```python\n(.*?)```",
                     text, re.S).group(1)
    exec(compile(code, "docs/interop.md", "exec"), {})
    printed = capsys.readouterr().out
    difference = float(re.search(r"max abs difference: (\S+)",
                                 printed).group(1))
    assert difference < 1e-5
    assert printed.count(" <- ") == 3
