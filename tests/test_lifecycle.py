"""The whole life of a model, with keras_bn's layer and with Keras's.

Every case runs once with `keras.layers.BatchNormalization` ("keras") and
once with `keras_bn.BatchNormalization` ("ours") in the same small model,
from the same initial weights and data. The "keras" run records what
Keras's layer does (and checks it where a float64 reference is at hand);
the "ours" run must work as well and give the same results (1e-5 where no
numerics differ by design). Compiling, exporting and torch.compile are in
test_lifecycle_export.py.
"""

from __future__ import annotations

import copy

import keras
import numpy as np
import pytest

import keras_bn
from tests import reference

BACKEND = keras.backend.backend()
LAYERS = {"keras": keras.layers.BatchNormalization,
          "ours": keras_bn.BatchNormalization}
BN_TYPES = tuple(LAYERS.values())
# Results of Keras's layer, computed once per case and shared by both runs.
_KERAS_RESULTS = {}


@pytest.fixture(params=list(LAYERS))
def kind(request):
    return request.param


def _np(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


def _bns(model):
    return [l for l in _walk(model) if isinstance(l, BN_TYPES)]


def _walk(layer):
    yield layer
    inner = getattr(layer, "layer", None)  # TimeDistributed, Bidirectional
    if isinstance(inner, keras.layers.Layer):
        yield from _walk(inner)
    for sub in getattr(layer, "layers", []):
        yield from _walk(sub)


def _build(builder, kind):
    """`builder(layer_class)` with the initial weights of a Keras-layer model
    (seeded) and moving statistics away from their initial values, so that
    inference differs from training and the two layers start identical."""
    keras.utils.set_random_seed(0)
    source = builder(LAYERS["keras"])
    rng = np.random.default_rng(7)
    for bn in _bns(source):
        n = bn.moving_mean.shape
        bn.moving_mean.assign(rng.normal(0.0, 0.5, n).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    weights = source.get_weights()
    keras.utils.set_random_seed(0)
    model = source if kind == "keras" else builder(LAYERS[kind])
    model.set_weights(weights)
    return model


def _compare(case, kind, run, tol=1e-5, rtol=0.0):
    """Runs `run(kind)`; for ours, checks it against Keras's layer's run.

    `run` returns a dict of arrays (or lists of arrays). Returns the dict.
    """
    if case not in _KERAS_RESULTS:
        _KERAS_RESULTS[case] = run("keras")
    theirs = _KERAS_RESULTS[case]
    if kind == "keras":
        return theirs
    ours = run(kind)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        a, b = ours[key], theirs[key]
        if isinstance(b, (list, tuple)):
            assert len(a) == len(b), key
        else:
            a, b = [a], [b]
        for i, (u, v) in enumerate(zip(a, b)):
            np.testing.assert_allclose(
                np.asarray(u, np.float64), np.asarray(v, np.float64),
                atol=tol, rtol=rtol, err_msg=f"{case}: {key}[{i}]")
    return ours


def _data(shape, n=32, seed=0, outputs=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 2.0, (n,) + shape).astype("float32")
    y = rng.normal(size=(n, outputs)).astype("float32")
    return x, y


def _dense_model(cls, features=6):
    return keras.Sequential([
        keras.Input((features,)),
        # No bias before BN: its gradient is rounding noise, which Adam
        # scales up to full steps that differ between any two layers.
        keras.layers.Dense(5, use_bias=False),
        cls(momentum=0.8),
        keras.layers.Activation("relu"),
        keras.layers.Dense(3),
    ])


def _moving(model):
    return [_np(w) for bn in _bns(model)
            for w in (bn.moving_mean, bn.moving_variance)]


# --------------------------------------------------------------- compile


@pytest.mark.parametrize("jit_compile", [False, True, "auto"],
                         ids=["jit-False", "jit-True", "jit-auto"])
def test_compile_modes_fit_evaluate_predict(kind, jit_compile):
    """On PyTorch jit_compile=True means torch.compile of the steps."""
    x, y = _data((6,))

    def run(kind):
        model = _build(_dense_model, kind)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse",
                      jit_compile=jit_compile)
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False,
                            verbose=0)
        return {
            "loss": history.history["loss"],
            "evaluate": model.evaluate(x, y, batch_size=8, verbose=0),
            "predict": model.predict(x, batch_size=8, verbose=0),
            "moving": _moving(model),
            "weights": model.get_weights(),
        }

    result = _compare(f"compile-{jit_compile}", kind, run)
    # Predictions use the moving statistics: they moved off their start.
    start = _moving(_build(_dense_model, "keras"))
    assert np.abs(result["moving"][0] - start[0]).max() > 1e-3


# ------------------------------------------------------- mixed precision


@pytest.fixture
def policy(request):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    try:
        yield request.param
    finally:
        keras.config.set_dtype_policy(previous)


def _conv_model(cls):
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3),
        cls(momentum=0.8),
        keras.layers.Activation("relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, dtype="float32"),
    ])


# Both layers normalize half-precision inputs in float32 and round the
# output once; what differs is the order of the float32 operations, which
# can move an output by one half-precision ulp.
HALF_TOL = {"mixed_float16": 2e-3, "mixed_bfloat16": 2e-2}


@pytest.mark.parametrize("policy", list(HALF_TOL), indirect=True)
def test_mixed_precision(kind, policy):
    x, y = _data((6, 6, 2), n=16)

    def run(kind):
        model = _build(_conv_model, kind)
        bn = _bns(model)[0]
        assert bn.compute_dtype == policy.split("_")[1]
        assert bn.moving_mean.dtype == "float32"
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False,
                            verbose=0)
        return {"loss": history.history["loss"],
                "predict": model.predict(x, verbose=0),
                "train_out": _np(keras.ops.cast(
                    bn(_np(model.layers[0](x[:8])), training=True),
                    "float32")),
                "moving": _moving(model)}

    tol = HALF_TOL[policy]
    result = _compare(f"policy-{policy}", kind, run, tol=tol, rtol=tol)
    assert np.isfinite(result["predict"]).all()


# ------------------------------------------------ recurrent and masked


def _embedding_recurrent(cls):
    return keras.Sequential([
        keras.Input((7,), dtype="int32"),
        keras.layers.Embedding(10, 4, mask_zero=True),
        cls(momentum=0.5),  # masked statistics, passes the mask on
        keras.layers.Bidirectional(keras.layers.LSTM(3, return_sequences=True)),
        cls(momentum=0.5),
        keras.layers.GRU(4),
        keras.layers.Dense(3),
    ])


def _masking_time_distributed(cls):
    return keras.Sequential([
        keras.Input((7, 4)),
        keras.layers.Masking(0.0),
        keras.layers.TimeDistributed(cls(momentum=0.5)),
        keras.layers.LSTM(5),
        keras.layers.Dense(3),
    ])


def _tokens(n=16, seed=1):
    """Token batches, padded with zeros (masked) at the end of each row."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 10, (n, 7)).astype("int32")
    lengths = rng.integers(2, 8, n)
    x[np.arange(7)[None, :] >= lengths[:, None]] = 0
    return x


RECURRENT = {"embedding-bidirectional-lstm-gru": _embedding_recurrent,
             "masking-timedistributed-lstm": _masking_time_distributed}


@pytest.mark.parametrize("name", list(RECURRENT))
def test_recurrent_and_masked_models(kind, name):
    builder = RECURRENT[name]
    if name.startswith("masking"):
        x = np.random.default_rng(1).normal(size=(16, 7, 4)).astype("float32")
        x[_tokens() == 0] = 0.0
    else:
        x = _tokens()
    y = np.random.default_rng(2).normal(size=(16, 3)).astype("float32")

    def run(kind):
        model = _build(builder, kind)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False,
                            verbose=0)
        return {"loss": history.history["loss"],
                "predict": model.predict(x, verbose=0),
                "moving": _moving(model)}

    result = _compare(f"recurrent-{name}", kind, run)
    if name.startswith("embedding"):
        # The moving mean after the first batch, by hand: a float64 masked
        # mean of the embeddings of the unmasked tokens.
        model = _build(builder, kind)
        table = _np(model.layers[0].embeddings).astype(np.float64)
        start = _np(_bns(model)[0].moving_mean)
        first = x[:8]
        mean = table[first[first > 0]].mean(0)
        embedding, bn = model.layers[0], _bns(model)[0]
        bn(embedding(first), mask=embedding.compute_mask(first),
           training=True)
        np.testing.assert_allclose(
            _np(bn.moving_mean), reference.ema(start, mean, 0.5), atol=1e-5)
    assert np.isfinite(result["predict"]).all()


CONV = {
    "conv1d": (keras.layers.Conv1D, (9, 2)),
    "conv2d": (keras.layers.Conv2D, (6, 6, 2)),
    "conv3d": (keras.layers.Conv3D, (4, 4, 4, 2)),
}


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("conv", list(CONV))
def test_conv_channels_first_and_last(kind, conv, data_format):
    layer, shape = CONV[conv]
    first = data_format == "channels_first"
    if first:
        shape = shape[-1:] + shape[:-1]
    axis = 1 if first else -1

    def builder(cls):
        return keras.Sequential([
            keras.Input(shape),
            layer(3, 3, data_format=data_format),
            cls(axis=axis, momentum=0.8),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ])

    x, y = _data(shape, n=8)

    def run(kind):
        model = _build(builder, kind)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        return {"predict": model.predict(x, verbose=0),
                "moving": _moving(model)}

    result = _compare(f"{conv}-{data_format}", kind, run)
    # Statistics per channel of the right axis: one per filter.
    assert result["moving"][0].shape == (3,)
    assert np.isfinite(result["predict"]).all()


# ------------------------------------------------------------ trainable


def test_layer_trainable_false_is_inference_mode(kind):
    x, y = _data((6,))

    def run(kind):
        model = _build(_dense_model, kind)
        bn = _bns(model)[0]
        bn.trainable = False
        start = _moving(model)
        gamma = _np(bn.gamma)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        for before, after in zip(start, _moving(model)):
            np.testing.assert_array_equal(before, after)
        np.testing.assert_array_equal(gamma, _np(bn.gamma))
        h = _np(model.layers[0](x[:8]))
        # training=True is overridden: the moving statistics are used.
        expected = reference.forward_infer(
            h, (1,), _np(bn.gamma), _np(bn.beta), *_moving(model),
            bn.epsilon)
        out = _np(bn(h, training=True))
        reference.assert_close(out, expected, what="frozen BN")
        return {"out": out, "predict": model.predict(x, verbose=0)}

    _compare("layer-trainable-false", kind, run)


def test_model_trainable_false_fine_tuning(kind):
    x, y = _data((6,))

    def builder(cls):
        base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5),
                                 cls(momentum=0.8)], name="base")
        inputs = keras.Input((6,))
        return keras.Model(inputs, keras.layers.Dense(3)(base(inputs)))

    def run(kind):
        model = _build(builder, kind)
        base = model.layers[1]
        # Without training=False in the call: trainable=False alone must
        # keep the layer in inference mode.
        base.trainable = False
        frozen = base.get_weights()
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False,
                            verbose=0)
        for before, after in zip(frozen, base.get_weights()):
            np.testing.assert_array_equal(before, after)
        assert len(model.trainable_weights) == 2  # the head's kernel, bias
        return {"loss": history.history["loss"],
                "head": model.layers[-1].get_weights()}

    _compare("model-trainable-false", kind, run)


class SubclassedModel(keras.Model):
    """Batch statistics always: training=True inside call."""

    def __init__(self, cls, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(5)
        self.bn = cls(momentum=0.5)
        self.head = keras.layers.Dense(3)

    def call(self, x, training=None):
        return self.head(self.bn(self.dense(x), training=True))


def test_subclassed_model_explicit_training_true(kind):
    x, _ = _data((6,), n=8)

    def builder(cls):
        model = SubclassedModel(cls)
        model(x[:1])
        return model

    def run(kind):
        model = _build(builder, kind)
        bn = model.bn
        start = _moving(model)
        out = model.predict(x, batch_size=8, verbose=0)
        h = _np(model.dense(x)).astype(np.float64)
        expected_bn, mu, var = reference.forward_train(
            h, (1,), _np(bn.gamma), _np(bn.beta), bn.epsilon)
        kernel, bias = model.head.get_weights()
        reference.assert_close(out, expected_bn @ kernel + bias,
                               what="predict with batch statistics")
        moving = _moving(model)
        # predict() updates the moving statistics as Keras's layer does.
        reference.assert_close(moving[0], reference.ema(start[0], mu[0], 0.5))
        reference.assert_close(moving[1], reference.ema(start[1], var[0], 0.5))
        return {"predict": out, "moving": moving}

    _compare("subclassed-training-true", kind, run)


def test_stateless_call(kind):
    """Returns the updated statistics, leaves the model's own untouched;
    on JAX also under jax.jit (Keras's JAX trainer does exactly this)."""
    x, _ = _data((6,), n=8)

    def run(kind):
        model = _build(_dense_model, kind)
        start = _moving(model)
        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]

        def step(tv, ntv, x):
            return model.stateless_call(tv, ntv, x, training=True)

        if BACKEND == "jax":
            import jax

            step = jax.jit(step)
        out, new_ntv = step(tv, ntv, x)
        for before, after in zip(start, _moving(model)):
            np.testing.assert_array_equal(before, after)
        h = _np(model.layers[0](x)).astype(np.float64)
        _, mu, var = reference.batch_stats(h, (1,))[0:3]
        names = [v.path for v in model.non_trainable_variables]
        new = dict(zip(names, map(_np, new_ntv)))
        bn = _bns(model)[0]
        reference.assert_close(new[bn.moving_mean.path],
                               reference.ema(start[0], mu[0], 0.8))
        reference.assert_close(new[bn.moving_variance.path],
                               reference.ema(start[1], var[0], 0.8))
        return {"out": _np(out), "ntv": [_np(v) for v in new_ntv]}

    _compare("stateless-call", kind, run)


# ------------------------------------------- clone, config, copy, summary


def test_clone_model_and_config_round_trip(kind):
    x, _ = _data((6,), n=8)

    def run(kind):
        model = _build(_dense_model, kind)
        clone = keras.models.clone_model(model)
        bn, clone_bn = _bns(model)[0], _bns(clone)[0]
        assert type(clone_bn) is type(bn)
        assert clone_bn.get_config() == bn.get_config()
        # Fresh variables with the initializers' values.
        np.testing.assert_array_equal(_np(clone_bn.moving_variance), 1.0)
        clone.set_weights(model.get_weights())
        expected = model.predict(x, verbose=0)
        np.testing.assert_array_equal(clone.predict(x, verbose=0), expected)
        rebuilt = keras.Sequential.from_config(model.get_config())
        assert type(_bns(rebuilt)[0]) is type(bn)
        rebuilt.set_weights(model.get_weights())
        np.testing.assert_array_equal(rebuilt.predict(x, verbose=0), expected)
        layer = type(bn).from_config(bn.get_config())
        assert layer.get_config() == bn.get_config()
        return {"predict": expected}

    _compare("clone-config", kind, run)


def _summary_lines(model):
    lines = []
    model.summary(print_fn=lambda line, *a, **k: lines.append(line))
    return "\n".join(lines)


def test_summary(kind):
    def run(kind):
        model = _build(_dense_model, kind)
        bn = _bns(model)[0]
        text = _summary_lines(model)
        assert bn.name in text and type(bn).__name__ in text
        counts = [line for line in text.splitlines() if "params" in line]
        # The layer's own row: 4 x 5 weights.
        row = next(line for line in text.splitlines() if bn.name in line)
        assert " 20 " in row + " ", row
        return {"params": [float(model.count_params())],
                "counts": [len(counts)]}

    result = _compare("summary", kind, run, tol=0)
    assert result["params"] == [30.0 + 20.0 + 18.0]


def test_deepcopy_layer_and_model(kind):
    x, y = _data((6,), n=16)

    def run(kind):
        model = _build(_dense_model, kind)
        bn = _bns(model)[0]
        layer = copy.deepcopy(bn)
        assert type(layer) is type(bn) and layer.built
        for a, b in zip(layer.weights, bn.weights):
            np.testing.assert_array_equal(_np(a), _np(b))
        layer.moving_mean.assign(layer.moving_mean + 1.0)  # its own state
        assert np.abs(_np(layer.moving_mean) - _np(bn.moving_mean)).min() > 0.5

        twin = copy.deepcopy(model)
        expected = model.predict(x, verbose=0)
        np.testing.assert_array_equal(twin.predict(x, verbose=0), expected)
        before = model.get_weights()
        twin.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        twin.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        for a, b in zip(before, model.get_weights()):
            np.testing.assert_array_equal(a, b)  # the original is untouched
        assert np.abs(_moving(twin)[0] - _moving(model)[0]).max() > 1e-3
        return {"trained": twin.get_weights()}

    _compare("deepcopy", kind, run)


# ---------------------------------------------------------- checkpoints


def _compiled(kind):
    model = _build(_dense_model, kind)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


# The weights after 4 uninterrupted epochs, per layer: the same run for
# both checkpoint formats (seeded build, no shuffling), so it runs once.
_STRAIGHT = {}


@pytest.mark.parametrize("weights_only", [True, False],
                         ids=["weights-only", "full-keras"])
def test_checkpoint_resume_continues_identically(kind, weights_only,
                                                 tmp_path):
    x, y = _data((6,))
    fit = dict(batch_size=8, shuffle=False, verbose=0)

    def run(kind):
        folder = tmp_path / kind
        folder.mkdir()
        if kind not in _STRAIGHT:
            straight = _compiled(kind)
            straight.fit(x, y, epochs=4, **fit)
            _STRAIGHT[kind] = straight.get_weights()
        suffix = ".weights.h5" if weights_only else ".keras"
        path = str(folder / f"ckpt-{{epoch}}{suffix}")
        first = _compiled(kind)
        first.fit(x, y, epochs=2, callbacks=[keras.callbacks.ModelCheckpoint(
            path, save_weights_only=weights_only)], **fit)
        saved = path.format(epoch=2)
        if weights_only:
            # The optimizer's state (Adam's moments) is in the weights
            # file once the optimizer is built, so it resumes exactly.
            resumed = _compiled(kind)
            resumed.optimizer.build(resumed.trainable_variables)
            resumed.load_weights(saved)
        else:
            resumed = keras.saving.load_model(saved)
        resumed.fit(x, y, epochs=4, initial_epoch=2, **fit)
        straight = _STRAIGHT[kind]
        assert len(resumed.get_weights()) == len(straight)
        for a, b in zip(resumed.get_weights(), straight):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        assert int(_np(resumed.optimizer.iterations)) == 16
        return {"weights": straight}

    _compare(f"checkpoint-{weights_only}", kind, run)
