"""The `keras_bn.BatchNormalization` layer."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import NamedTuple

import keras
from keras import constraints
from keras import initializers
from keras import ops
from keras import regularizers

from keras_bn import _validation as check
from keras_bn import backends
from keras_bn import moments
from keras_bn import paths

_DATA_FORMAT_AXIS = {"channels_last": -1, "channels_first": 1}


class _Batch(NamedTuple):
    """A training batch's statistics (`_batch_statistics`).

    `x` is the input, regrouped as `(groups, virtual_batch_size, ...)` for
    ghost batches (`regrouped`); `shift`, `delta` and `variance` normalize
    it (the mean is `shift + delta`), over `count` values per channel (a
    Python float where known when tracing); `moving` is
    `(count, mean, variance)` for the moving averages.
    """

    x: object
    count: object
    shift: object
    delta: object
    variance: object
    moving: tuple
    regrouped: bool


class _Plan(NamedTuple):
    """How a call runs: `paths.choose`'s answer, the backend kernel that
    serves it (None for the reference path) and the dtype the input is
    cast to first."""

    path: paths.Path
    kernel: Callable | None
    dtype: str


class _PlanCache:
    """Plans by the facts of a call that vary between calls (not a dict
    attribute: Keras would track it)."""

    def __init__(self):
        self.by_facts = {}


_COMPILED = paths.Path(
    paths.REFERENCE, "traced by torch.compile: " + paths.WHY[paths.REFERENCE],
    (("kernel", paths.NEEDS["eager"][1]),))


def _fresh(initializer):
    """A new instance of `initializer` (a seeded one must not be reused)."""
    return initializers.get(initializers.serialize(initializer))


@keras.saving.register_keras_serializable(package="keras_bn")
class BatchNormalization(keras.layers.Layer):
    """Batch normalization (Ioffe & Szegedy, 2015), exact on every backend.

    A drop-in replacement for `keras.layers.BatchNormalization`: the same
    arguments, defaults, weight names, shapes and order, so weights move
    between the two layers unchanged. It differs where Keras's layer is
    loose or limited:

    - statistics are computed in float32 (float64 for float64 inputs) with a
      corrected two-pass algorithm, so inputs whose mean is far larger than
      their spread normalize correctly on every backend, and the variance
      is never negative;
    - a training batch whose statistics cannot be measured (NaN/Inf in the
      batch, or fewer than two values in a channel: none at all, or one,
      whose variance is 0 by definition) leaves the moving statistics of
      the affected channels unchanged (`skip_nonfinite_updates`);
    - `axis` may be a list of axes, or `data_format` may be given instead;
    - `virtual_batch_size` gives ghost batch normalization;
    - `synchronized=True` works on TensorFlow, JAX and PyTorch, over every
      replica or over groups of them (`synchronized_group_size`);
    - PyTorch's update rules are options: `moving_variance_estimator=
      "unbiased"` and `momentum=None` (a cumulative average), so that a
      model ported from PyTorch trains on exactly as it would there.

    During training (`training=True` and `trainable=True`) each channel is
    normalized with the statistics of the current batch,
    `gamma * (x - mean(x)) / sqrt(var(x) + epsilon) + beta`, where `var` is
    the biased (divide by the count) variance of Algorithm 1 of the paper,
    and the moving statistics are updated as
    `moving = moving * momentum + batch_statistic * (1 - momentum)`.
    Otherwise the moving statistics are used. As in Keras, setting
    `trainable = False` puts the layer in inference mode.

    Args:
        axis: Integer or list of integers, the axis or axes that hold the
            features (channels). Statistics are kept per element of these
            axes and computed over all other axes. Defaults to `-1`.
        momentum: Momentum of the moving averages, in `[0, 1]` (Keras's
            convention: PyTorch's `momentum` is `1 - momentum` here), or
            `None` for PyTorch's cumulative average: the layer then has
            one more non-trainable weight, `num_batches_tracked` (an int32
            scalar, last in the weights; PyTorch's buffer of that name is
            int64), which counts the training calls, and the `t`-th call
            updates `moving = moving * (1 - 1/t) + batch_statistic / t`, so
            the moving statistics are the plain average of every training
            call's statistics (like PyTorch, every training call counts,
            also one whose update a channel skips; see
            `skip_nonfinite_updates`). Not supported with `renorm=True`
            (a ValueError), whose corrections assume an exponential
            average.
        epsilon: Small positive float added to the variance.
        center: If `True`, add the learned offset `beta`.
        scale: If `True`, multiply by the learned scale `gamma`.
        beta_initializer: Initializer for `beta`.
        gamma_initializer: Initializer for `gamma`.
        moving_mean_initializer: Initializer for the moving mean.
        moving_variance_initializer: Initializer for the moving variance.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        renorm: Whether to use Batch Renormalization (Ioffe, 2017), with the
            same weights and update rules as Keras's layer.
        renorm_clipping: Dict with optional keys `"rmax"`, `"rmin"`,
            `"dmax"` clipping the renorm corrections `r` to `[rmin, rmax]`
            and `d` to `[-dmax, dmax]`.
        renorm_momentum: Momentum of the renorm moving mean and stddev.
        synchronized: If `True`, replicas of a distributed step (a
            `tf.distribute` strategy, a `keras.distribution` data-parallel
            distribution under JAX, or `torch.distributed`) normalize with
            the statistics of the global batch. Without a distribution
            context it has no effect.
        synchronized_group_size: Optional positive int, with
            `synchronized=True`: replicas are pooled in consecutive groups
            of this many (replicas `0..k-1`, `k..2k-1`, ...; typically the
            devices of one host), as Flax's `axis_index_groups` and
            PyTorch's `SyncBatchNorm(process_group=...)` do. The number of
            replicas must be a multiple of it. `None` pools every replica.
        data_format: `"channels_last"` or `"channels_first"`, a readable
            alternative to `axis` (`-1` or `1`). If both are given they must
            agree.
        virtual_batch_size: Optional positive int. In training, each
            consecutive group of this many samples is normalized with its
            own statistics (ghost batch normalization); a batch that is not
            a multiple of it ends with a smaller group. No effect in
            inference.
        skip_nonfinite_updates: If `True` (the default), channels whose
            batch statistics cannot be measured leave their moving
            statistics unchanged: statistics that are not finite, and
            statistics of fewer than two values in the channel (an empty
            batch or a fully masked channel, and a single value, whose
            variance is 0 by definition). Their output is unchanged by
            this: a channel with one value outputs `beta`, as Keras's
            layer does; an empty one is normalized with the moving
            statistics. Where the batch size is static and a training
            call can see at most one value per channel (e.g. a batch of
            one sample into a dense layer), the layer warns once, when
            the call is traced; where the batch size is dynamic (as in
            `model.fit` on TensorFlow, which traces for any batch size)
            it cannot know in advance and skips the update when the call
            runs. `False` gives Keras's rule: every channel is updated by
            every training call, from whatever statistics it has (zeros
            for an empty channel, variance 0 from one value, NaN), at no
            cost in ops.
        fused: `None` (default) uses a backend fast path wherever it is as
            exact as the `keras.ops` reference path: the backends' kernels
            in inference; in training, XLA-fused statistics with a custom
            gradient (JAX, and TensorFlow under XLA), and the backends'
            kernels fed groups short enough for exact float32 sums
            (TensorFlow on CPU, channels last; PyTorch, channels last).
            `True` also trains with the backend's kernel as it
            is (TF's FusedBatchNormV3, ATen's batch norm): faster, but its
            float32 sums drift far past 1e-5 of float64 on long reductions
            on CPU. `False` always uses the reference path.
        moving_variance_estimator: `"biased"` (the default, Keras's rule)
            updates the moving variance with the batch's biased variance
            (divided by the count `n`); `"unbiased"` (PyTorch's rule) with
            the unbiased one, `var * n / (n - 1)`, where `n` is the number
            of values the channel's statistics count (its mask's, with a
            mask; the whole batch's, pooled over all groups, with ghost
            batches or a synchronized step). Training still normalizes
            with the biased variance, as PyTorch does. With `renorm=True`
            the moving and renorm stddevs are updated from the unbiased
            variance as well (the corrections `r` and `d` still use the
            biased one).
        statistics: Which statistics normalize. `None` (default) is
            Keras's rule: the batch's in training, the moving ones in
            inference. `"moving"` always normalizes with the moving
            statistics, training included (fine-tuning with frozen
            statistics while `gamma` and `beta` still train). `"batch"`
            always normalizes with the batch's own statistics, inference
            included (test-time adaptation). When set, it decides whatever
            `training` and `trainable` say (`trainable=False` still freezes
            `gamma` and `beta`).
        update_moving_statistics: When the moving statistics are updated.
            `None` (default): exactly when Keras's layer would, in training
            calls that use batch statistics. `True`: in every call that
            uses batch statistics, inference included (adaptation during
            `predict`). `False`: never.
        moving_statistics_steps: Positive int, for gradient accumulation
            (`optimizer.gradient_accumulation_steps=k`): the statistics of
            `k` consecutive updating calls are pooled exactly (Chan et
            al.'s formula: as if the `k` batches were one) and update the
            moving statistics once, on the `k`-th call. Each batch is still
            normalized with its own statistics. The round in progress is
            kept in four more non-trainable weights, which exist only for
            `k > 1` (`accumulated_count`, `accumulated_mean`,
            `accumulated_m2` per channel, `accumulated_batches` an int32
            scalar), so a checkpoint saved mid-round resumes identically.
            `skip_nonfinite_updates` leaves a batch with non-finite
            statistics out of its round. Defaults to 1 (every call
            updates). Not supported with `renorm=True`, whose corrections
            follow per-batch averages.
        debias_moving_statistics: If `True`, the moving statistics are
            bias-corrected averages, free of the initializers' weight: after
            `t` updates of a channel they are
            `(m_t - momentum**t * m_0) / (1 - momentum**t)`, where `m_t` is
            the plain moving average started at `m_0`, so after one update
            they equal that batch's statistics. `moving_mean` and
            `moving_variance` store these corrected values (what inference
            normalizes with, so `fold` and inference-only copies read
            inference's statistics), and one more non-trainable weight,
            `debias_weight` (per channel, only with this option), holds
            `momentum**t`: 1 before any update, 0 after `recalibrate`
            (statistics measured exactly). Not supported with `renorm=True`
            or `momentum=None` (the cumulative average has no such bias).
            Defaults to `False`.
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).

    Call arguments:
        inputs: Input tensor of any rank >= 2. Integer inputs are cast to
            float. Float16/bfloat16 inputs are normalized in float32 and
            returned in the layer's compute dtype.
        training: Python boolean, whether to use batch statistics and update
            the moving statistics (unless `statistics` or
            `update_moving_statistics` say otherwise).
        mask: Optional boolean tensor, `True` where values count towards the
            statistics (any nonzero value counts as `True`, as in Keras).
            As in Keras's layer, a mask of rank `rank - 1` is the input's
            shape without its last axis, e.g. `(batch, time)` for
            `(batch, time, features)` (what `Masking`, `Embedding` and the
            RNN layers produce); it is expanded at the last axis and
            broadcast, whatever `axis` is. Also accepted: a mask of the
            input's rank that broadcasts to it (e.g. `(batch, 1, h, w)` for
            channels-first images), and, with several feature axes, the
            input's shape without them. Each channel's statistics count
            exactly the values its mask keeps; a channel with none keeps
            its moving statistics.

    Returns:
        A tensor of the same shape as `inputs`, in the compute dtype.
    """

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm: bool = False,
        renorm_clipping: dict | None = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        synchronized_group_size: int | None = None,
        data_format: str | None = None,
        virtual_batch_size: int | None = None,
        skip_nonfinite_updates: bool = True,
        fused: bool | None = None,
        moving_variance_estimator: str = "biased",
        statistics: str | None = None,
        update_moving_statistics: bool | None = None,
        moving_statistics_steps: int = 1,
        debias_moving_statistics: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        axis = check.axis(axis)
        if data_format is not None:
            check.choice("data_format", data_format, tuple(_DATA_FORMAT_AXIS))
            implied = _DATA_FORMAT_AXIS[data_format]
            # `axis=-1` is the default, so it yields to `data_format`.
            if axis not in (-1, implied, [implied]):
                raise ValueError(
                    f"`data_format={data_format!r}` implies axis={implied}, "
                    f"which conflicts with the given axis={axis!r}. Pass "
                    "only one of them."
                )
            axis = implied
        self.axis = axis
        self.data_format = data_format
        self.momentum = check.unit_interval("momentum", momentum,
                                            allow_none=True)
        self.moving_variance_estimator = check.choice(
            "moving_variance_estimator", moving_variance_estimator,
            ("biased", "unbiased"))
        self.renorm_momentum = check.unit_interval(
            "renorm_momentum", renorm_momentum
        )
        self.epsilon = check.positive_float("epsilon", epsilon)
        self.virtual_batch_size = check.integer(
            "virtual_batch_size", virtual_batch_size, allow_none=True
        )
        self.fused = check.choice("fused", fused, (None, True, False))
        self.center = bool(center)
        self.scale = bool(scale)
        self.renorm = bool(renorm)
        self.renorm_clipping = check.renorm_clipping(renorm_clipping)
        if self.renorm_clipping and not self.renorm:
            raise ValueError("`renorm_clipping` is only used with "
                             f"renorm=True. Received: renorm={renorm!r}, "
                             f"renorm_clipping={renorm_clipping!r}")
        if self.momentum is None and self.renorm:
            raise ValueError(
                "`momentum=None` (PyTorch's cumulative average) is not "
                "supported with renorm=True: Batch Renormalization's "
                "corrections follow exponential moving averages. Received: "
                f"momentum=None, renorm={renorm!r}")
        self.synchronized = bool(synchronized)
        self.synchronized_group_size = check.integer(
            "synchronized_group_size", synchronized_group_size,
            allow_none=True)
        if self.synchronized_group_size is not None and not self.synchronized:
            raise ValueError(
                "`synchronized_group_size` groups the replicas that "
                "synchronize, so it needs synchronized=True. Received: "
                f"synchronized={synchronized!r}, synchronized_group_size="
                f"{synchronized_group_size!r}")
        self.skip_nonfinite_updates = bool(skip_nonfinite_updates)
        self.statistics = check.choice("statistics", statistics,
                                       (None, "batch", "moving"))
        self.update_moving_statistics = check.optional_bool(
            "update_moving_statistics", update_moving_statistics)
        self.moving_statistics_steps = check.integer(
            "moving_statistics_steps", moving_statistics_steps)
        self.debias_moving_statistics = check.boolean(
            "debias_moving_statistics", debias_moving_statistics)
        if self.renorm and (self.moving_statistics_steps > 1
                            or self.debias_moving_statistics):
            option = ("moving_statistics_steps="
                      f"{self.moving_statistics_steps}"
                      if self.moving_statistics_steps > 1
                      else "debias_moving_statistics=True")
            raise ValueError(
                f"`{option}` is not supported with renorm=True: Batch "
                "Renormalization's corrections follow the moving averages "
                f"of every batch. Received: renorm=True, {option}")
        if self.debias_moving_statistics and self.momentum is None:
            raise ValueError(
                "`debias_moving_statistics=True` corrects the initial "
                "values' weight in an exponential average; momentum=None "
                "(PyTorch's cumulative average) has none. Received: "
                "momentum=None, debias_moving_statistics=True")
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(
            moving_variance_initializer
        )
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_masking = True
        self._plans = _PlanCache()
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.num_batches_tracked = None
        self.accumulated_batches = None
        self.debias_weight = None
        self._warned_unmeasurable = False

    # ------------------------------------------------------------------ build

    def _resolve_axes(self, input_shape) -> tuple[int, ...]:
        rank = len(input_shape)
        raw = self.axis if isinstance(self.axis, list) else [self.axis]
        axes = []
        for a in raw:
            if not -rank <= a < rank:
                raise ValueError(
                    f"`axis` {a} is out of range for inputs of rank {rank} "
                    f"(shape {tuple(input_shape)}). Received: axis={self.axis!r}"
                )
            axes.append(a % rank)
        if len(set(axes)) != len(axes):
            raise ValueError(f"`axis` names the same axis twice for inputs of "
                             f"rank {rank}. Received: axis={self.axis!r}")
        if self.virtual_batch_size is not None and 0 in axes:
            raise ValueError("`virtual_batch_size` splits axis 0 (the batch), "
                             f"which cannot also be a feature axis. Received: "
                             f"axis={self.axis!r}")
        return tuple(sorted(axes))

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        axes = self._resolve_axes(input_shape)
        for a in axes:
            if input_shape[a] is None:
                raise ValueError(
                    f"The feature axis {a} of the input must have a known "
                    f"size to build {self.name}. Received: input_shape="
                    f"{input_shape}, axis={self.axis!r}"
                )
        self._axes = axes
        self._reduction_axes = tuple(
            i for i in range(len(input_shape)) if i not in axes
        )
        shape = tuple(input_shape[a] for a in axes)
        self._channels_last = axes == (len(input_shape) - 1,)
        self._plans = _PlanCache()
        self._broadcast_shape = tuple(
            input_shape[i] if i in axes else 1 for i in range(len(input_shape))
        )
        if self.scale:
            self.gamma = self._add(shape, "gamma", self.gamma_initializer,
                                   self.gamma_regularizer, self.gamma_constraint)
        if self.center:
            self.beta = self._add(shape, "beta", self.beta_initializer,
                                  self.beta_regularizer, self.beta_constraint)
        self.moving_mean = self._add(shape, "moving_mean",
                                     self.moving_mean_initializer)
        self.moving_variance = self._add(shape, "moving_variance",
                                         self.moving_variance_initializer)
        if self.renorm:
            # Same extra weights, names and order as Keras's layer.
            def stddev_initializer(shape, dtype=None):
                init = _fresh(self.moving_variance_initializer)
                return ops.sqrt(init(shape, dtype=dtype))

            self.moving_stddev = self._add(shape, "moving_stddev",
                                           stddev_initializer)
            self.renorm_mean = self._add(
                shape, "renorm_mean", _fresh(self.moving_mean_initializer)
            )
            self.renorm_stddev = self._add(shape, "renorm_stddev",
                                           stddev_initializer)
        if self.momentum is None:
            # PyTorch's name; int32 on every backend (JAX has no int64 by
            # default), exact up to 2**31 - 1 training calls.
            self.num_batches_tracked = self.add_weight(
                shape=(), name="num_batches_tracked", initializer="zeros",
                dtype="int32", trainable=False, autocast=False,
                aggregation="only_first_replica")
        if self.moving_statistics_steps > 1:
            # The round in progress, as (count, mean, m2) per channel.
            for name in ("count", "mean", "m2"):
                setattr(self, f"accumulated_{name}", self._add(
                    shape, f"accumulated_{name}", "zeros"))
            self.accumulated_batches = self.add_weight(
                shape=(), name="accumulated_batches", initializer="zeros",
                dtype="int32", trainable=False, autocast=False,
                aggregation="only_first_replica")
        if self.debias_moving_statistics:
            self.debias_weight = self._add(shape, "debias_weight", "ones")
        self.input_spec = keras.layers.InputSpec(
            ndim=len(input_shape), axes={a: input_shape[a] for a in axes}
        )

    def _add(self, shape, name, initializer, regularizer=None,
             constraint=None):
        """gamma/beta are trainable; the statistics are state, averaged
        across replicas where the engine mirrors variables (tf.distribute)."""
        trainable = name in ("gamma", "beta")
        return self.add_weight(
            shape=shape, name=name, initializer=initializer,
            regularizer=regularizer, constraint=constraint,
            trainable=trainable, autocast=False,
            aggregation="none" if trainable else "mean",
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    # ------------------------------------------------------------------- call

    def _plan(self, inputs, training: bool, masked: bool) -> _Plan:
        """How this call runs: decided once per input signature and
        context (a `paths.Call`), then looked up."""
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if "complex" in dtype or dtype == "string":
            raise TypeError(
                f"{type(self).__name__} needs real inputs (float, int or "
                f"bool). Received: inputs.dtype={dtype}"
            )
        # Statistics in float32 at least, whatever the compute dtype. (Not
        # `keras.backend.result_type`: on PyTorch it promotes float64 with
        # float32 to float32.)
        stat = "float64" if dtype == "float64" else "float32"
        backend = backends.get()
        context = backend.context()
        if context.get("compiling"):
            if training and self.renorm:
                # AOTAutograd's backward recomputes r and d from the renorm
                # variables after this step has updated them in place
                # (Keras's layer trains just as wrongly): refuse, never
                # return gradients that are off.
                raise ValueError(
                    f"{self.name}: renorm=True cannot train under "
                    "torch.compile or torch.export: the compiled backward "
                    "reads the renorm statistics after the step's update, "
                    "so its gradients would be wrong. Train this model "
                    "eagerly (compile(jit_compile=False)); inference "
                    "(training=False) compiles. Received: renorm=True, "
                    "training=True")
            # What the rules answer under torch.compile, without tracing
            # the Call and the cache as Python objects.
            return _Plan(_COMPILED, None, stat)
        # The rest of a `paths.Call` is fixed per layer: a plain tuple is
        # cheaper to hash than the dataclass (eager calls look it up each
        # time).
        shape = tuple(inputs.shape)
        replicas = backend.num_replicas()
        facts = (dtype, shape, training, masked, replicas,
                 *context.items())
        plan = self._plans.by_facts.get(facts)
        if plan is None:
            call = paths.Call(
                backend=keras.backend.backend(), training=training,
                fused=self.fused, dtype=dtype, shape=shape,
                axes=self._axes, masked=masked, renorm=self.renorm,
                ghost=self.virtual_batch_size is not None,
                replicas=replicas, **context,
            )
            if training and not self._warned_unmeasurable:
                self._warn_if_unmeasurable(call)
            path = paths.choose(call)
            kernel = (backend.TRAIN if training else backend.INFER).get(
                path.name)
            # A kernel reads a half-precision input as it is when that is
            # also the compute dtype (its statistics stay float32): no
            # float32 copy of the batch.
            if kernel is not None and dtype == self.compute_dtype:
                stat = dtype
            plan = self._plans.by_facts[facts] = _Plan(path, kernel, stat)
        return plan

    def _warn_if_unmeasurable(self, call: paths.Call):
        """Warns (once per layer) where a training call's shape leaves at
        most one value per channel (per ghost batch) to measure."""
        rows = call.rows
        if rows is None:
            return
        batch = call.shape[0]
        if call.ghost and batch and 0 not in call.axes:
            rows = rows // batch * min(batch, self.virtual_batch_size)
        if rows > 1:
            return
        self._warned_unmeasurable = True
        effect = ("leaves the moving statistics unchanged"
                  if self.skip_nonfinite_updates else
                  "pulls the moving variance towards 0 "
                  "(skip_nonfinite_updates=False)")
        warnings.warn(
            f"{self.name} is trained on at most {rows} value(s) per channel "
            f"(input shape {call.shape}, axis={self.axis!r}"
            + (f", virtual_batch_size={self.virtual_batch_size}"
               if call.ghost else "")
            + "): their variance is 0 by definition, so such a training call "
            f"outputs beta and {effect}. Train on larger batches.",
            stacklevel=3)

    def which_path(self, inputs, training: bool = False,
                   mask=None) -> paths.Path:
        """The implementation a call with `inputs` takes, and why.

        Args:
            inputs: A tensor or array of the shape and dtype to ask about.
            training: Whether to ask about a training call.
            mask: Optional mask, as it would be passed to the call.

        Returns:
            A `keras_bn.paths.Path`: `name` (`"reference"`, `"kernel"`,
            `"exact_kernel"` or `"xla"`), `reason`, and `declined`, the
            reason each earlier candidate declined. Asked inside a
            `tf.function(jit_compile=True)` or under `torch.compile`, it
            answers for that context.
        """
        if not self.built:
            self.build(tuple(inputs.shape))
        batch, _ = self._modes(training)
        return self._plan(inputs, batch, mask is not None).path

    def _modes(self, training) -> tuple[bool, bool]:
        """`(batch, update)`: whether a call normalizes with the batch's
        statistics, and whether it updates the moving ones (`statistics`
        and `update_moving_statistics` over Keras's rule)."""
        training = bool(training) and self.trainable
        batch = (training if self.statistics is None
                 else self.statistics == "batch")
        update = (training if self.update_moving_statistics is None
                  else self.update_moving_statistics)
        return batch, batch and update

    def _mask_weights(self, mask, x):
        """The mask as 0/1 weights that broadcast against `x`.

        Keras's convention comes first: a mask of rank `rank - 1` is the
        input's shape without its last axis (what `Masking`, `Embedding` and
        the RNN layers produce), expanded at the last axis, whatever `axis`
        is. Two readings of ours cannot be mistaken for it, because Keras's
        layer rejects their ranks: a mask of the input's rank that
        broadcasts to it, and, with several feature axes, the input's shape
        without the feature axes.
        """
        if mask is None:
            return None
        rank = len(x.shape)
        mask_shape = tuple(mask.shape)
        expand = None
        if len(mask_shape) == rank - 1:
            expand = (rank - 1,)
        elif len(mask_shape) == rank:
            expand = ()
        elif len(self._axes) > 1 and len(mask_shape) == rank - len(self._axes):
            expand = self._axes
        if expand is not None:
            full = list(mask_shape)
            for a in expand:
                full.insert(a, 1)
            if all(m is None or d is None or m in (1, d)
                   for m, d in zip(full, x.shape)):
                if keras.backend.standardize_dtype(mask.dtype) != "bool":
                    mask = ops.cast(mask, "bool")  # Keras reads any nonzero
                for a in expand:
                    mask = ops.expand_dims(mask, a)
                return mask
        multi = (
            f", or (with several feature axes) the input's shape without the "
            f"feature axes {self._axes}" if len(self._axes) > 1 else ""
        )
        raise ValueError(
            "`mask` must have the input's shape without its last axis "
            "(Keras's convention, expanded at the last axis and broadcast), "
            f"or the input's rank and a shape that broadcasts to it{multi}. "
            f"Received: mask.shape={mask_shape}, inputs.shape="
            f"{tuple(x.shape)}, axis={self.axis!r}"
        )

    def call(self, inputs, training=None, mask=None):
        batch, update = self._modes(training)
        plan = self._plan(inputs, batch, mask is not None)
        x = inputs
        if keras.backend.standardize_dtype(x.dtype) != plan.dtype:
            x = ops.cast(x, plan.dtype)
        outputs = None
        if plan.kernel is not None:
            outputs = self._run_kernel(plan.kernel, x, batch, update)
        if outputs is None:
            if plan.kernel is not None and plan.dtype != "float32":
                x = ops.cast(x, "float32")  # a kernel handed the call back
            weights = self._mask_weights(mask, x)
            if batch:
                outputs = self._train_step(x, weights, update)
            else:
                outputs = self._normalize(
                    x, self._param(self.moving_mean, x.dtype),
                    self._param(self.moving_variance, x.dtype))
        if keras.backend.standardize_dtype(outputs.dtype) == self.compute_dtype:
            return outputs  # eager backends: no cast dispatch
        return ops.cast(outputs, self.compute_dtype)

    def _run_kernel(self, kernel, x, batch, update):
        """A backend kernel's output (None if it hands the call back), the
        moving statistics updated from its batch statistics if `update`."""
        gamma = self._vector(self.gamma)
        beta = self._vector(self.beta)
        axis = self._axes[0]
        if not batch:
            return kernel(x, self._vector(self.moving_mean),
                          self._vector(self.moving_variance), gamma, beta,
                          self.epsilon, axis)
        outputs, mean, variance = kernel(x, gamma, beta, self.epsilon, axis)
        if not update:
            return outputs
        count = moments.static_count(x, self._reduction_axes)
        if count is None:
            count = moments.count_values(x, self._reduction_axes)
        self._update_moving(count, mean, variance)
        return outputs

    def _param(self, variable, dtype):
        """`variable` in `dtype`, shaped to broadcast against the input."""
        value = self._vector(variable, dtype)
        if self._channels_last:  # (C,) broadcasts as it is
            return value
        return ops.reshape(value, self._broadcast_shape)

    def _vector(self, variable, dtype="float32"):
        """`variable`'s value in `dtype` (None stays None); casts only where
        dtypes differ: on eager backends each op is a dispatch."""
        if variable is None:
            return None
        if keras.backend.standardize_dtype(variable.dtype) == dtype:
            return variable.value
        return ops.cast(variable.value, dtype)

    def _normalize(self, x, mean, variance, r=None, d=None, delta=None):
        """`gamma * ((x - mean) / sqrt(variance + eps) * r + d) + beta`.

        With `delta`, the mean is `mean + delta`: `mean` (a first mean) is
        subtracted from `x`, and `delta` (the small correction of its
        rounding) from the offset, per channel, which keeps float32
        exactness for inputs far from zero at no full-size op.
        """
        scale = ops.rsqrt(variance + self.epsilon)
        if r is not None:
            scale = scale * r
        gamma = self._param(self.gamma, x.dtype) if self.scale else None
        if gamma is not None:
            scale = scale * gamma
        offset = self._param(self.beta, x.dtype) if self.center else None
        if d is not None:
            d = d if gamma is None else d * gamma
            offset = d if offset is None else offset + d
        if delta is not None:
            delta = delta * scale
            offset = -delta if offset is None else offset - delta
        y = (x - mean) * scale
        return y if offset is None else y + offset

    def _ghost_split(self, x, weights, n):
        """Regroups the batch as `(groups, n, ...)`.

        A batch that is not a multiple of `n` is padded with rows that the
        returned weights leave out, so the last group is simply smaller.
        """
        rest = tuple(x.shape[1:])
        batch = x.shape[0]
        if batch is not None and batch % n == 0:
            groups = batch // n
            if weights is not None:
                weights = ops.reshape(
                    ops.broadcast_to(ops.cast(weights, x.dtype), ops.shape(x)),
                    (groups, n) + rest,
                )
            return ops.reshape(x, (groups, n) + rest), weights
        batch = ops.shape(x)[0]
        groups = (batch + n - 1) // n
        pad = groups * n - batch
        if weights is None:
            weights = ops.ones_like(x)
        weights = ops.broadcast_to(ops.cast(weights, x.dtype), ops.shape(x))
        zeros = ops.zeros((pad,) + rest, x.dtype)
        x = ops.concatenate([x, zeros], axis=0)
        weights = ops.concatenate([weights, zeros], axis=0)
        return (
            ops.reshape(x, (groups, n) + rest),
            ops.reshape(weights, (groups, n) + rest),
        )

    def _batch_statistics(self, x, weights) -> _Batch:
        """The statistics that normalize `x` and update the moving ones."""
        axes = self._reduction_axes
        group = self._group_size(x)
        if group is not None:
            x, weights = self._ghost_split(x, weights, group)
            axes = (1,) + tuple(a + 1 for a in axes if a != 0)
        # Channels last and not regrouped: statistics of shape (C,), which
        # broadcast as they are and are the variables' shape.
        keepdims = group is not None or not self._channels_last
        count, shift, delta, m2 = moments.shifted_moments(
            x, axes, weights, keepdims=keepdims)
        pooled = group is not None or (
            self.synchronized and backends.get().num_replicas() > 1)
        if isinstance(count, float) and pooled:
            count = ops.full_like(m2, count)  # stacked and pooled below
        if self.synchronized and group is None:
            count, delta, m2 = backends.get().cross_replica(
                count, shift, delta, m2, self._replica_group())
        safe = max(count, 1.0) if isinstance(count, float) else ops.maximum(
            count, 1.0)
        variance = m2 / safe
        if group is None:
            moving = (count, shift + delta, variance)
        else:
            total, pooled_mean, _ = moments.combine(count, shift, delta, m2)
            # The average of the groups' variances, not the pooled variance:
            # the spread between groups is not what ghost BN normalizes away.
            moving = (total, pooled_mean,
                      ops.sum(m2, 0) / ops.maximum(total, 1.0))
        return _Batch(x, count, shift, delta, variance, moving,
                      group is not None)

    def _group_size(self, x):
        """Samples per group normalized together, or None for the batch.

        Ghost batches set it. So does a layer where one call sees every
        replica's shard (JAX under `keras.distribution`) and replicas are
        not all pooled: each replica's shard (synchronized=False), or each
        `synchronized_group_size` consecutive shards, then form a group, as
        they do on TensorFlow and PyTorch.
        """
        if self.virtual_batch_size is not None:
            return self.virtual_batch_size
        backend = backends.get()
        if not backend.SEES_GLOBAL_BATCH or backend.num_replicas() == 1:
            return None
        shards = self._replica_group() if self.synchronized else 1
        if shards is None:
            return None
        replicas = backend.num_replicas()
        batch = x.shape[0]
        if batch is None or batch % replicas:
            raise ValueError(
                f"{self.name} normalizes groups of {shards} of the "
                f"{replicas} data-parallel shards (synchronized="
                f"{self.synchronized}, synchronized_group_size="
                f"{self.synchronized_group_size}), so the batch size must be "
                f"a multiple of {replicas}. Received: batch size {batch}"
            )
        return batch // replicas * shards

    def _replica_group(self) -> int | None:
        """Replicas pooled together: `synchronized_group_size`, or None
        where that is every replica (or there is one)."""
        k = self.synchronized_group_size
        replicas = backends.get().num_replicas()
        if k is None or replicas == 1:
            return None
        if replicas % k:
            raise ValueError(
                f"{self.name} pools its replicas in groups of "
                f"synchronized_group_size={k}, which must divide the number "
                f"of replicas. Received: {replicas} replicas")
        return None if k == replicas else k

    def _train_step(self, x, weights, update=True):
        batch = ops.shape(x)[0]
        stats = self._batch_statistics(x, weights)
        shift, delta, variance = stats.shift, stats.delta, stats.variance
        count = stats.count
        # A channel with no values (all masked, empty batch) falls back to
        # the moving statistics instead of dividing by zero.
        if not isinstance(count, float) or count <= 0:
            empty = count <= 0
            shift = ops.where(empty, self._param(self.moving_mean, x.dtype),
                              shift)
            delta = ops.where(empty, 0.0, delta)
            variance = ops.where(
                empty, self._param(self.moving_variance, x.dtype), variance)
        r = d = None
        if self.renorm:
            r, d = self._renorm_correction(shift + delta, variance)
        if update:
            self._update_moving(*stats.moving)
        outputs = self._normalize(stats.x, shift, variance, r, d, delta)
        if stats.regrouped:
            outputs = ops.reshape(outputs, (-1,) + tuple(outputs.shape[2:]))
            outputs = outputs[:batch]
        return outputs

    def _update_moving(self, count, mean, variance):
        """Moves the moving statistics towards the batch's, per channel,
        skipping channels whose statistics are not finite.

        `count` may be a scalar (a Python float where known when tracing);
        the others are per channel, in any shape that holds the variables'
        values. Every path computes the variance from deviations from the
        mean, so a non-finite mean (or input) makes it non-finite too, and
        the guard checks the variance alone. The statistics may carry
        gradients (the reference path's): assigning a variable is no
        differentiable op on any backend, so no `stop_gradient` is needed
        (an op per statistic in a TensorFlow graph).
        """
        shape = tuple(self.moving_mean.shape)
        count, mean, variance = (
            t if isinstance(t, float) or tuple(t.shape) in (shape, ())
            else ops.reshape(t, shape) for t in (count, mean, variance)
        )
        done = None
        if self.moving_statistics_steps > 1:
            count, mean, variance, done = self._accumulate(count, mean,
                                                           variance)
        ok = None
        if self.skip_nonfinite_updates:
            # Fewer than two values measure no variance (one has 0).
            ok = moments.finite(count, None, variance, min_count=2.0)
        if done is not None:
            ok = done if ok is None else ops.logical_and(ok, done)
        momentum = self.momentum
        if self.moving_variance_estimator == "unbiased" or momentum is None:
            variance, momentum = self._pytorch_rules(count, variance, done)
        if self.debias_moving_statistics and momentum < 1.0:
            momentum = self._debiased_momentum(ok, variance.dtype)
        if self.renorm:
            self._update_renorm(mean, variance, ok)
        else:
            self._assign_ema(self.moving_mean, mean, momentum, ok)
            self._assign_ema(self.moving_variance, variance, momentum, ok)

    def _pytorch_rules(self, count, variance, done=None):
        """`(variance, momentum)` under the PyTorch options: the unbiased
        variance `variance * n / (n - 1)` (`n - 1` floored at 1: a count
        below 2 only updates with `skip_nonfinite_updates=False`, then from
        the biased variance), and the cumulative average's momentum
        `1 - 1/t`, a tensor, after counting this update in
        `num_batches_tracked` (where `done`, the end of an accumulation
        round, holds: if given)."""
        if self.moving_variance_estimator == "unbiased":
            if isinstance(count, float):
                variance = variance * (count / max(count - 1.0, 1.0))
            else:
                variance = variance * (count / ops.maximum(count - 1.0, 1.0))
        momentum = self.momentum
        if momentum is None:
            t = self.num_batches_tracked.value
            if done is None:
                t = t + 1
            else:
                t = t + ops.cast(done, "int32")
            self.num_batches_tracked.assign(t)
            # Mid-round (not `done`) the update is masked out; `maximum`
            # keeps its momentum finite before the first round ends.
            momentum = 1.0 - 1.0 / ops.cast(ops.maximum(t, 1), variance.dtype)
        return variance, momentum

    def _accumulate(self, count, mean, variance):
        """Pools a batch's statistics into the accumulation round's.

        Chan et al.'s pairwise formula, per channel: the round's
        `(count, mean, m2)` and the batch's combine exactly, as if their
        values were one batch. Returns the pooled `(count, mean, variance)`
        and `done`, True on the round's last batch, where they update the
        moving statistics and the round starts again from nothing.
        """
        dtype = keras.backend.standardize_dtype(variance.dtype)
        state = self._round_state()
        n_a, mean_a, m2_a = (self._vector(v, dtype) for v in state)
        n = n_a + count
        diff = mean - mean_a
        weight = count / ops.maximum(n, 1.0)  # 0 for an empty batch
        pooled = (n, mean_a + diff * weight,
                  m2_a + variance * count + ops.square(diff) * n_a * weight)
        if self.skip_nonfinite_updates:
            # A batch that could not update a channel leaves its round too.
            keep = ops.isfinite(variance)
            pooled = tuple(ops.where(keep, new, old) for new, old in
                           zip(pooled, (n_a, mean_a, m2_a)))
        n, mean, m2 = pooled
        step = self.accumulated_batches.value
        done = step >= self.moving_statistics_steps - 1
        for variable, value in zip(state, pooled):
            variable.assign(ops.cast(ops.where(done, 0.0, value),
                                     variable.dtype))
        self.accumulated_batches.assign(
            ops.where(done, ops.zeros_like(step), step + 1))
        return n, mean, m2 / ops.maximum(n, 1.0), done

    def _round_state(self):
        """The accumulation round's per-channel `(count, mean, m2)`
        variables (`moving_statistics_steps > 1`)."""
        return (self.accumulated_count, self.accumulated_mean,
                self.accumulated_m2)

    def _debiased_momentum(self, ok, dtype):
        """The per-channel momentum that keeps the moving statistics
        bias-corrected, after counting this update in `debias_weight`.

        With `p = momentum**t` after this update, the corrected average
        `D_t = (m_t - p * m_0) / (1 - p)` follows
        `D_t = D_{t-1} + (x_t - D_{t-1}) * (1 - momentum) / (1 - p)`
        (no `m_0`: it cancels). Storing `D` rather than `m` keeps float32
        exact: recovering `D` from `m` would divide its rounding by
        `1 - p`, 100x after one update at momentum 0.99.
        """
        # The momentum in `dtype`, as the update rounds it, so that the
        # first update's weight (1 - momentum) / (1 - p) is exactly 1.
        momentum = ops.convert_to_tensor(self.momentum, dtype)
        before = self._vector(self.debias_weight, dtype)
        p = before * momentum
        self.debias_weight.assign(ops.cast(
            p if ok is None else ops.where(ok, p, before),
            self.debias_weight.dtype))
        return 1.0 - (1.0 - momentum) / (1.0 - p)

    def _statistics_measured(self):
        """The moving statistics were just set to exact statistics
        (`recalibrate`): no initial values left to correct for, and the
        accumulation round (from earlier weights) starts afresh."""
        state = []
        if self.debias_weight is not None:
            state.append(self.debias_weight)
        if self.accumulated_batches is not None:
            state += [*self._round_state(), self.accumulated_batches]
        for variable in state:
            variable.assign(ops.zeros(variable.shape, variable.dtype))

    def _assign_ema(self, variable, value, momentum, ok):
        """`variable = variable * momentum + value * (1 - momentum)` where
        `ok` holds (everywhere if None), `value` in the variable's shape;
        returns the new value in `value`'s dtype."""
        return backends.get().assign_moving_average(variable, value,
                                                    momentum, ok)

    def _renorm_correction(self, mean, variance):
        """Batch Renormalization's `(r, d)`, from the weights before update."""
        stddev = ops.sqrt(variance + self.epsilon)
        renorm_mean = self._param(self.renorm_mean, mean.dtype)
        # Keep clear of division by zero early in training, as Keras does.
        renorm_stddev = ops.maximum(
            self._param(self.renorm_stddev, mean.dtype),
            math.sqrt(self.epsilon),
        )
        r = stddev / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        clipping = self.renorm_clipping or {}
        if "rmin" in clipping:
            r = ops.maximum(r, clipping["rmin"])
        if "rmax" in clipping:
            r = ops.minimum(r, clipping["rmax"])
        if "dmax" in clipping:
            d = ops.clip(d, -clipping["dmax"], clipping["dmax"])
        return ops.stop_gradient(r), ops.stop_gradient(d)

    def _update_renorm(self, mean, variance, ok):
        stddev = ops.sqrt(variance + self.epsilon)
        self._assign_ema(self.renorm_mean, mean, self.renorm_momentum, ok)
        self._assign_ema(self.renorm_stddev, stddev, self.renorm_momentum, ok)
        self._assign_ema(self.moving_mean, mean, self.momentum, ok)
        moving_stddev = self._assign_ema(
            self.moving_stddev, stddev, self.momentum, ok
        )
        # Inference reads moving_variance, kept consistent with the stddev.
        self.moving_variance.assign(ops.cast(
            ops.relu(ops.square(moving_stddev) - self.epsilon),
            self.moving_variance.dtype,
        ))

    # ------------------------------------------------------------- serialize

    def get_config(self):
        config = super().get_config()
        config.update({
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(
                self.moving_mean_initializer
            ),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
            "synchronized": self.synchronized,
            "synchronized_group_size": self.synchronized_group_size,
            "statistics": self.statistics,
            "update_moving_statistics": self.update_moving_statistics,
            "data_format": self.data_format,
            "virtual_batch_size": self.virtual_batch_size,
            "skip_nonfinite_updates": self.skip_nonfinite_updates,
            "fused": self.fused,
            "moving_variance_estimator": self.moving_variance_estimator,
            "moving_statistics_steps": self.moving_statistics_steps,
            "debias_moving_statistics": self.debias_moving_statistics,
        })
        return config
