"""`python -m keras_bn demo` and the helpers it shares with the benchmark."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_bn import __main__ as keras_bn_main
from keras_bn import _processes
from keras_bn import demo


def test_demo_command_selects_the_backend_without_keras_backend(tmp_path):
    backend = keras.backend.backend()
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    # No keras.json either: Keras would start on its default, TensorFlow,
    # so for JAX and PyTorch `--backend` has to switch.
    env["KERAS_HOME"] = str(tmp_path / "keras_home")
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch on a busy CPU
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "keras_bn", "demo", "--backend", backend,
         "--epochs", "2", "--train-size", "512", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"backend {backend}" in proc.stdout
    assert "Epoch 2/2" in proc.stdout  # Keras progress output
    for label in demo.VARIANTS.values():
        assert f"| {label} |" in proc.stdout
    with open(out / f"mnist_{backend}.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(out / f"mnist_{backend}.json") as f:
        report = json.load(f)
    assert report["backend"] == backend and report["train_examples"] == 512
    assert [r["variant"] for r in report["results"]] == list(demo.VARIANTS)
    for r in report["results"]:
        assert len(r["history"]["val_accuracy"]) == 2
        assert len(r["epoch_seconds"]) == 2
        assert 0.0 <= r["test_accuracy"] <= 1.0


@pytest.mark.parametrize("base,user_openmp,expected", [
    ({}, False, "PASSIVE"),       # tests and workers: no spinning threads
    ({}, True, None),             # the demo, benchmarks: OpenMP's default
    ({"OMP_WAIT_POLICY": "ACTIVE"}, True, "ACTIVE"),   # the user's own
    ({"OMP_WAIT_POLICY": "ACTIVE"}, False, "ACTIVE"),
])
def test_child_env_openmp_wait_policy(base, user_openmp, expected):
    env = _processes.child_env("torch", base=base, user_openmp=user_openmp)
    assert env.get("OMP_WAIT_POLICY") == expected
    assert env["KERAS_BACKEND"] == "torch"


def test_demo_command_child_keeps_the_users_openmp_setting(monkeypatch):
    other = next(b for b in _processes.BACKENDS
                 if b != keras.backend.backend())
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    seen = {}

    def fake_run_python(backend, args, **kwargs):
        seen.update(backend=backend, args=args, **kwargs)
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(keras_bn_main, "run_python", fake_run_python)
    assert keras_bn_main.main(["demo", "--backend", other]) == 0
    # The demo times what the user would run: no PASSIVE imposed on it.
    assert seen == {"backend": other, "user_openmp": True,
                    "args": ["-m", "keras_bn", "demo", "--backend", other]}


@pytest.mark.parametrize("args,needle", [
    (["--backend", "numpy"], "invalid choice: 'numpy'"),
    (["--epochs", "0"], "--epochs: must be a positive integer, got '0'"),
    (["--batch-size", "x"], "--batch-size: must be a positive integer"),
])
def test_demo_command_rejects_bad_arguments(args, needle, capsys):
    with pytest.raises(SystemExit) as info:
        keras_bn_main.main(["demo", *args])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_load_data_shapes_for_the_models():
    (x_train, y_train), (x_test, y_test) = demo.load_data(
        "mnist", train_size=100, test_size=50)
    assert x_train.shape == (100, 784) and x_train.dtype == np.float32
    assert y_train.shape == (100,) and x_test.shape == (50, 784)
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    (x_train, y_train), _ = demo.load_data("cifar10", train_size=10,
                                           test_size=10)
    assert x_train.shape == (10, 32, 32, 3) and y_train.shape == (10,)


@pytest.mark.parametrize("call,needle", [
    (lambda: demo.load_data("svhn"), "dataset='svhn'"),
    (lambda: demo.load_data("mnist", train_size=0), "train_size=0"),
    (lambda: demo.build_model("mnist", "batchnorm"), "variant='batchnorm'"),
])
def test_bad_arguments_are_named(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def _result(variant, epoch_seconds):
    return demo.Result(variant, epoch_seconds=epoch_seconds,
                       history={"loss": [0.5, 0.25]}, test_loss=0.125,
                       test_accuracy=0.975)


def test_format_table_lists_each_variant():
    results = [_result("keras_bn", [9.0, 1.0, 3.0, 2.0]),
               _result("keras", [9.0, 4.0, 2.0, 1.0]),
               _result("none", [9.0, 2.0, 1.0, 1.0])]
    lines = demo.format_table(results).splitlines()
    assert len(lines) == 2 + len(demo.VARIANTS)
    # s/epoch: median of the epochs after the first (which includes
    # compilation), 2.00. Time / Keras's: median of the epoch-by-epoch
    # ratios 1/4, 3/2, 2/1 = 1.50 (the ratio of the medians would be 1.00);
    # fastest epochs 1 against 1.
    assert lines[2] == ("| keras_bn.BatchNormalization | 2.00 | 1.50; 1.00 "
                        "| 0.2500 | 0.1250 | 97.50% |")
    assert lines[3].startswith("| keras.layers.BatchNormalization | 2.00 | "
                               "1.00; 1.00 |")
    # none: 2/4, 1/2, 1/1; fastest 1 against 1.
    assert lines[4].startswith("| no batch normalization | 1.00 | "
                               "0.50; 1.00 |")


def test_time_ratios_of_fastest_epochs_skip_the_first():
    ours = _result("keras_bn", [0.1, 3.0, 2.0])
    keras_result = _result("keras", [9.0, 2.0, 8.0])
    # Pairs after the first: 3/2, 2/8 -> median 0.875; fastest 2 / 2.
    assert demo.time_ratios(ours, keras_result) == (0.875, 1.0)
    # One epoch only: it is all there is.
    assert demo.time_ratios(_result("keras_bn", [3.0]),
                            _result("keras", [4.0])) == (0.75, 0.75)


def test_format_table_without_keras_has_no_ratio():
    lines = demo.format_table([_result("keras_bn", [9.0, 1.0])]).splitlines()
    assert lines[2].startswith("| keras_bn.BatchNormalization | 1.00 | - |")


def _side_by_side_models(variants):
    built = {}
    for variant in variants:
        keras.utils.set_random_seed(0)
        built[variant] = demo.build_model("mnist", variant)
        demo.portable_init(built[variant], seed=0)
    return built


def test_train_side_by_side_rotates_and_trains_each_model_as_alone():
    data = demo.load_data("mnist", train_size=256, test_size=64)
    variants = ("keras_bn", "keras", "none")
    built = _side_by_side_models(variants)
    calls = []
    for variant, model in built.items():
        def fit(*args, _fit=model.fit, _variant=variant, **kwargs):
            calls.append((_variant, kwargs["initial_epoch"]))
            return _fit(*args, **kwargs)
        model.fit = fit
    results = demo.train_side_by_side(built, data, epochs=3, batch_size=128,
                                      verbose=0, order_seed=4)
    # One epoch of each in turn, the order rotating by one each epoch.
    assert calls == [("keras_bn", 0), ("keras", 0), ("none", 0),
                     ("keras", 1), ("none", 1), ("keras_bn", 1),
                     ("none", 2), ("keras_bn", 2), ("keras", 2)]
    assert [r.variant for r in results] == list(variants)
    for r in results:
        assert len(r.epoch_seconds) == 3 and len(r.history["loss"]) == 3
    # Interleaving changes nothing a model computes: each one trained
    # alone, with the same start and batch order, ends with equal weights.
    for variant, together in zip(variants, results):
        alone_model = _side_by_side_models([variant])[variant]
        alone = demo.train(alone_model, data, variant, epochs=3,
                           batch_size=128, verbose=0, order_seed=4)
        np.testing.assert_allclose(alone.history["loss"],
                                   together.history["loss"], rtol=1e-5)
        for a, b in zip(alone_model.weights, built[variant].weights):
            np.testing.assert_allclose(keras.ops.convert_to_numpy(a),
                                       keras.ops.convert_to_numpy(b),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("models,error,needle", [
    ({}, ValueError, "`models` must be a non-empty dict"),
    ([("keras_bn", None)], ValueError, "`models` must be a non-empty dict"),
    ({"keras_bn": "model"}, TypeError,
     "`models['keras_bn']` must be a keras.Model. Received: 'model'"),
])
def test_train_side_by_side_rejects_bad_models(models, error, needle):
    with pytest.raises(error, match=re.escape(needle)):
        demo.train_side_by_side(models, demo.load_data(
            "mnist", train_size=8, test_size=8), epochs=1, batch_size=8)


def test_portable_init_draws_glorot_kernels_with_numpy():
    models = [demo.build_model("mnist", v) for v in ("keras_bn", "keras")]
    for model in models:
        demo.portable_init(model, seed=3)
    # Independent draw: Dense(784->128) then Dense(128->10), Glorot uniform
    # limits sqrt(6 / (fan_in + fan_out)) by hand.
    rng = np.random.default_rng(3)
    expected = [rng.uniform(-np.sqrt(6 / 912), np.sqrt(6 / 912), (784, 128)),
                rng.uniform(-np.sqrt(6 / 138), np.sqrt(6 / 138), (128, 10))]
    for model in models:
        kernels = [keras.ops.convert_to_numpy(w) for w in model.weights
                   if w.path.endswith("kernel")]
        biases = [keras.ops.convert_to_numpy(w) for w in model.weights
                  if w.path.endswith("bias")]
        assert len(kernels) == 2 and len(biases) == 2
        for got, want in zip(kernels, expected):
            np.testing.assert_allclose(got, want, rtol=1e-6)
        assert all(not b.any() for b in biases)


def test_cosine_decay_ends_at_zero_and_order_seed_fixes_batches():
    data = demo.load_data("mnist", train_size=300, test_size=64)
    weights = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        model = demo.build_model("mnist", "keras_bn")
        demo.portable_init(model, seed=0)
        result = demo.train(model, data, "keras_bn", epochs=2, batch_size=128,
                            verbose=0, cosine_decay=True, order_seed=5)
        assert len(result.history["loss"]) == 2  # one entry per epoch
        lr = model.optimizer.learning_rate
        assert float(keras.ops.convert_to_numpy(lr)) == 0.0  # 6 of 6 steps
        weights.append([keras.ops.convert_to_numpy(w) for w in model.weights])
    # Same seeds and batch order: the same run twice.
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
