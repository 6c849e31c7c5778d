"""`keras.applications` models for the tests of the whole-model tools,
built once per test process: test_convert and test_fold both run ResNet50
and MobileNetV2, and only read them. Building one is most of such a test's
time (on JAX, about a minute: XLA compiles the initializer of each kernel
shape)."""

from __future__ import annotations

import functools

import keras

from tests.bn_models import randomize_bn

INPUT_SHAPE = (32, 32, 3)


@functools.lru_cache(maxsize=None)
def application(name: str) -> keras.Model:
    """`keras.applications.<name>` for 32x32 RGB inputs and 10 logits, with
    random weights and random batch-norm statistics (`randomize_bn`).

    The same model is returned to every caller: it must not be changed
    (convert and fold leave their input alone, which their tests check).
    """
    keras.utils.set_random_seed(0)  # the same weights whoever builds it
    model = getattr(keras.applications, name)(
        weights=None, input_shape=INPUT_SHAPE, classes=10,
        classifier_activation=None)
    return randomize_bn(model)
