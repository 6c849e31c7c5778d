"""Which implementation runs a batch-norm call, and why: every rule here.

The layer describes a call as a `Call` (its facts, all known when the call
is traced); `choose` walks the backend's rows of `RULES` and returns the
first path whose needs all hold, as a `Path` that also says why each
earlier candidate declined. The backends only provide the kernels
(`keras_bn.backends`); they decide nothing.

The paths:

- `"reference"`: the layer's `keras.ops` code (`keras_bn.moments`); always
  possible, and the only path with masks, several feature axes, renorm,
  ghost batches or a distributed step.
- `"kernel"`: the backend's own fused kernel (TensorFlow's
  FusedBatchNormV3, ATen's batch norm).
- `"exact_kernel"`: the same kernels fed groups of rows short enough for
  exact float32 sums, pooled exactly (CPU, channels last). On TensorFlow,
  for inputs below the kernel's size floor (`tf_small`: known sizes, and
  `model.fit`'s unknown batch of a small sample), the reference path's
  statistics in plain ops with the paper's backward instead: the kernel's
  set-up would cost more than the whole step.
- `"xla"`: statistics written for XLA's fusion with the paper's backward
  as a custom gradient (JAX; TensorFlow under `jit_compile=True`).

Each non-reference path is kept because `benchmarks/results/bench_layer.md`
shows it at least 10% faster than the reference path on some shape; the
`fused=True` kernels are the opt-in the performance policy asks for.

`keras_bn.BatchNormalization.which_path(inputs, training=...)` answers the
question for a given input.
"""

from __future__ import annotations

import dataclasses
import math

REFERENCE = "reference"
KERNEL = "kernel"
EXACT_KERNEL = "exact_kernel"
XLA = "xla"

KERNEL_DTYPES = ("float32", "float16", "bfloat16")
# TensorFlow on CPU: below this many values a kernel call (oneDNN's set-up)
# costs more than the reference path's few small ops.
TF_MIN_KERNEL_SIZE_CPU = 2**17
# TensorFlow on CPU, a batch size unknown when traced (`model.fit` traces
# for any batch): the size floor is applied to this many samples. Where
# such a batch falls below it (a dense layer of fewer than 1024 units), the
# exact path runs its statistics in plain ops (`small_unknown_batch`). At
# the floor both cost about the same, and a batch far larger than assumed
# costs no more than Keras's layer (one step with gradients, medians on
# 2 CPU cores: 1024x128 kernel 1.28 ms, plain ops 1.19, Keras's 1.27;
# 8192x128: 4.2, 6.5, 6.5; at 128x128 the kernel costs 3x the others).
TF_UNKNOWN_BATCH_ROWS = 128
# JAX: below this many values a dense (rank-2) input trains at least as
# fast on the reference path as on the `xla` kernel (2026-12-07,
# bench_steps: the MNIST models' steps on the kernel read 1.00-1.05 of
# Keras's on the fastest blocks, 0.99 on the reference path); a conv input
# takes the kernel at any size, since the reference path pools its sums
# one axis at a time (128x8x8x16, a training call with its gradient: the
# kernel in 0.62 of the reference path's time).
JAX_MIN_XLA_SIZE = 2**17
# PyTorch's exact kernel: ATen's channels-last kernels sum each channel
# sequentially in float32, so its rows are cut into equal groups of about
# this many rows (a free reshape into more "channels") ...
TORCH_GROUP_ROWS = 128
# ... and at most this many: a batch of up to this many rows is one group,
# which the kernel as it is computes exactly.
TORCH_MAX_GROUP_ROWS = 4 * TORCH_GROUP_ROWS


@dataclasses.dataclass(frozen=True)
class Call:
    """The facts of one layer call that the rules read."""

    backend: str
    training: bool
    fused: bool | None
    dtype: str
    shape: tuple
    axes: tuple
    masked: bool = False
    renorm: bool = False
    ghost: bool = False
    replicas: int = 1
    gpu: bool = False
    xla: bool = False  # TensorFlow tracing for XLA
    compiling: bool = False  # torch.compile / torch.export tracing

    @property
    def channels_last(self) -> bool:
        return self.axes == (len(self.shape) - 1,)

    @property
    def rows(self) -> int | None:
        """Values per channel (None if a dimension is unknown)."""
        dims = [d for i, d in enumerate(self.shape) if i not in self.axes]
        return None if None in dims else math.prod(dims)

    @property
    def size(self) -> int | None:
        return None if None in self.shape else math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Path:
    """The implementation a call takes.

    Attributes:
        name: `"reference"`, `"kernel"`, `"exact_kernel"` or `"xla"`.
        reason: Why this path serves the call.
        declined: `(path, reason)` for each candidate tried before it.
    """

    name: str
    reason: str
    declined: tuple = ()

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.reason}"]
        lines += [f"  not {name}: {why}" for name, why in self.declined]
        return "\n".join(lines)


def tf_small(shape: tuple) -> bool:
    """TensorFlow's exact training path on CPU: whether an input of `shape`
    is too small for the kernels' set-up to pay (fewer than
    TF_MIN_KERNEL_SIZE_CPU values, or `small_unknown_batch`), so that
    plain ops with the paper's backward run instead."""
    if None in shape:
        return small_unknown_batch(shape)
    return math.prod(shape) < TF_MIN_KERNEL_SIZE_CPU


def small_unknown_batch(shape: tuple) -> bool:
    """TensorFlow's exact path on CPU: whether an input of `shape` whose
    batch size is unknown (and every other dimension known) is taken for a
    small one, a batch of TF_UNKNOWN_BATCH_ROWS samples being below
    TF_MIN_KERNEL_SIZE_CPU values."""
    sample = shape[1:]
    if shape[0] is not None or None in sample:
        return False
    return math.prod(sample) * TF_UNKNOWN_BATCH_ROWS < TF_MIN_KERNEL_SIZE_CPU


def row_groups(rows: int) -> int | None:
    """Equal groups of about TORCH_GROUP_ROWS rows that `rows` splits into,
    or None where each would be longer than TORCH_MAX_GROUP_ROWS (a row
    count with a large prime factor)."""
    groups = max(1, rows // TORCH_GROUP_ROWS)
    while rows % groups:
        groups -= 1
    return groups if rows // groups <= TORCH_MAX_GROUP_ROWS else None


# name: (holds(call), why it fails). The first five gate every fast path.
NEEDS = {
    "enabled": (lambda c: c.fused is not False, "fused=False"),
    "no_mask": (lambda c: not c.masked,
                "a mask (the kernels count every value)"),
    "one_axis": (lambda c: len(c.axes) == 1, "several feature axes"),
    "kernel_dtype": (lambda c: c.dtype in KERNEL_DTYPES,
                     "the kernels take float32, float16 or bfloat16"),
    "plain_step": (
        lambda c: not c.training or not (c.renorm or c.ghost or c.replicas > 1),
        "renorm, ghost batches or a distributed step"),
    "exact": (lambda c: c.fused is None,
              "fused=True asks for the kernel as it is"),
    "opt_in": (lambda c: c.fused is True,
               "its float32 sums drift past 1e-5 on long reductions on CPU "
               "(fused=True asks for it)"),
    "channels_last": (lambda c: c.channels_last, "the feature axis is not last"),
    "cpu": (lambda c: not c.gpu, "on GPU the reference path is as fast"),
    "jax_size": (lambda c: len(c.shape) > 2 or c.size is None
                 or c.size >= JAX_MIN_XLA_SIZE,
                 f"a dense input of fewer than {JAX_MIN_XLA_SIZE} values, "
                 "where the reference path trains as fast"),
    "in_xla": (lambda c: c.xla, "not inside an XLA compilation"),
    "not_xla": (lambda c: not c.xla, "inside an XLA compilation"),
    "tf_size": (lambda c: c.gpu or not tf_small(c.shape),
                f"fewer than {TF_MIN_KERNEL_SIZE_CPU} values on CPU (a batch "
                f"of unknown size counted as {TF_UNKNOWN_BATCH_ROWS}), where "
                "the kernel's set-up costs more than the reference path"),
    "eager": (lambda c: not c.compiling,
              "under torch.compile the reference path traces into one graph "
              "(the kernels' host-side checks would break it)"),
    "rank2": (lambda c: len(c.shape) >= 2, "ATen needs a batch axis"),
    "two_rows": (lambda c: c.rows is not None and c.rows >= 2,
                 "ATen needs at least two values per channel"),
    "long": (lambda c: c.rows > TORCH_MAX_GROUP_ROWS,
             f"at most {TORCH_MAX_GROUP_ROWS} rows: the kernel as it is "
             "is exact"),
    "short_groups": (lambda c: row_groups(c.rows) is not None,
                     "the rows do not split into groups short enough for "
                     "exact sums"),
    "aten_exact": (lambda c: c.fused is True or not c.channels_last
                   or c.rows <= TORCH_MAX_GROUP_ROWS,
                   "ATen's channels-last kernel sums long channels "
                   "inexactly"),
}
GATE = ("enabled", "no_mask", "one_axis", "kernel_dtype", "plain_step")

# (backend, training): candidates in order, each `(path, needs...)`; the
# first whose needs all hold runs, else the reference path.
RULES = {
    ("tensorflow", True): (
        (XLA, "exact", "in_xla", "cpu", "channels_last", "tf_size"),
        # Below the size floor it runs plain ops instead (`tf_small`).
        (EXACT_KERNEL, "exact", "not_xla", "cpu", "channels_last"),
        (KERNEL, "opt_in", "tf_size"),
    ),
    ("tensorflow", False): ((KERNEL, "tf_size"),),
    ("jax", True): ((XLA, "jax_size"),),
    # JAX inference: the reference path is one fused XLA pass already.
    ("torch", True): (
        (EXACT_KERNEL, "eager", "rank2", "two_rows", "exact", "channels_last",
         "long", "short_groups"),
        (KERNEL, "eager", "rank2", "two_rows", "aten_exact"),
    ),
    # Kernel inference falls back to the reference path while the moving
    # mean dominates (ATen's x * a + b would cancel the output's bits).
    ("torch", False): ((KERNEL, "eager", "rank2"),),
}

# TensorFlow's exact path below the kernels' size floor (`tf_small`).
TF_SMALL_WHY = ("below the kernels' size floor: the reference path's "
                "statistics in plain ops, with the paper's backward")

WHY = {
    REFERENCE: "the keras.ops reference path",
    KERNEL: "the backend's fused kernel",
    EXACT_KERNEL: "the backend's kernel on short row groups (exact sums)",
    XLA: "XLA-fused statistics with the paper's backward",
}


def _failed(call: Call, needs) -> str | None:
    for need in needs:
        holds, why = NEEDS[need]
        if not holds(call):
            return why
    return None


def choose(call: Call) -> Path:
    """The path `call` takes, with the reasons the others declined."""
    declined = []
    gate = _failed(call, GATE)
    for path, *needs in RULES.get((call.backend, call.training), ()):
        why = gate or _failed(call, needs)
        if why is None:
            reason = WHY[path]
            if (path == EXACT_KERNEL and call.backend == "tensorflow"
                    and tf_small(call.shape)):
                reason = TF_SMALL_WHY
            return Path(path, reason, tuple(declined))
        declined.append((path, why))
    return Path(REFERENCE, WHY[REFERENCE], tuple(declined))
