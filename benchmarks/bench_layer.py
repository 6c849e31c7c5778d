"""Layer-level benchmark: keras_bn vs Keras's layer vs the backend's kernel.

For each backend (one child process each) and each shape/dtype, times the
training step (forward + backward, moving statistics updated) and the
inference forward of

- `keras_bn`: `keras_bn.BatchNormalization()` (the default: exact fast
  paths where they exist),
- `keras_bn_fused`: the same layer with `fused=True` (the backend's kernels
  as they are, less exact on long reductions),
- `keras_bn_ref`: the same layer with `fused=False` (the `keras.ops` path),
- `keras`: `keras.layers.BatchNormalization()`,
- `native`: the backend's own kernel (`tf.compat.v1.nn.fused_batch_norm`,
  `torch.nn.functional.batch_norm` on a channels_last view; JAX has none),
- `native_layer`: that kernel called from a minimal Keras layer: what any
  Keras layer pays on top of its kernel (eager PyTorch runs
  `Layer.__call__` on every call; graphs and jit compile it away),
- `copy`: `x * s` for a runtime scalar `s` (one read and one write of the
  tensor), a memory-bandwidth floor,

then (in a second child per backend) the peak memory of one training step
where the backend reports it: TensorFlow's BFC allocator statistics, the
PyTorch profiler's allocation trace (CUDA: `max_memory_allocated`), XLA's
compiled memory analysis under JAX (temporaries + outputs).

The steps are built by `keras_bn._execution`, the harness the tests run
the layer with (its modes "function", "xla", "jit", "eager", "compile").
TensorFlow steps run in `tf.function` (graph mode; with `--tf-xla`, a
separate run compiles every candidate with `jit_compile=True`, as
`model.fit` does with a GPU), JAX steps under `jax.jit`, PyTorch eagerly
(with `--torch-compile`, a separate run times keras_bn, Keras's layer and
the native kernel with each forward under `torch.compile`, Inductor, as
`model.fit` does with `jit_compile=True`; the backward is AOTAutograd's).
The native kernels do not update moving
statistics in training (TF) or do it inside the kernel (torch), so the
comparison is conservative for keras_bn. Timings are medians of `--repeats`
runs after `--warmup` runs; the candidates run round-robin so that load
changes on a shared machine hit them alike. The children keep this
process's OpenMP wait policy (a user's default: unset; from 2026-12-07 on,
recorded in each result's machine info), not the test runner's `PASSIVE`.

With `--steady-malloc` the children run with glibc's allocator told to
keep freed memory (`common.STEADY_MALLOC`), as a caching allocator does;
by default every candidate pays the page faults of its fresh outputs, which
swamp the kernels and change from run to run. Results go to
`bench_layer_<backend>_steady_malloc.json`.

Rerun (writes benchmarks/results/bench_layer_<backend>.json and
benchmarks/results/bench_layer.md):

    nice python benchmarks/bench_layer.py                 # all backends
    nice python benchmarks/bench_layer.py --backends torch --repeats 20
    nice python benchmarks/bench_layer.py --tf-xla        # TensorFlow + XLA
    nice python benchmarks/bench_layer.py --steady-malloc # caching allocator
    nice python benchmarks/bench_layer.py --torch-compile --no-memory \
        --shapes '128,32,32,64;1024,4096' --dtypes float32  # torch.compile
    python benchmarks/bench_layer.py --render            # tables only
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPES = ((128, 32, 32, 64), (32, 56, 56, 256), (1024, 4096))
DTYPES = ("float32", "bfloat16")
CASES = ("keras_bn", "keras_bn_fused", "keras_bn_ref", "keras", "native",
         "native_layer", "copy")
LAYERS = CASES[:4]
# Under torch.compile keras_bn's fused and reference settings trace the same
# ops (the fast paths' host-side checks would break the graph), so only the
# default is timed, against Keras's layer and the kernel.
COMPILE_CASES = ("keras_bn", "keras", "native")
# keras_bn's `fused` argument per case.
FUSED = {"keras_bn": None, "keras_bn_fused": True, "keras_bn_ref": False}
EPSILON = 1e-3
# Targets of the issue, per backend: the training step against the native
# kernel (or Keras's layer on JAX), inference against the faster of the two.
TRAIN_TARGET = {"tensorflow": ("native", 1.15), "torch": ("native", 1.15),
                "jax": ("keras", 1.05)}
INFER_TARGET = 1.1


# --------------------------------------------------------------- backends


class _Backend:
    """Builds zero-argument step callables for one backend, in `self.mode`
    (one of `keras_bn._execution.MODES`), with `keras_bn._execution`: the
    harness that the tests run the layer with."""

    mode = "eager"

    def __init__(self):
        import keras

        from keras_bn import _execution

        self.keras = keras
        self.execution = _execution

    def tensor(self, array, dtype):
        return self.keras.ops.cast(
            self.keras.ops.convert_to_tensor(array), dtype)

    def layer(self, case, dtype):
        import keras_bn

        policy = "mixed_bfloat16" if dtype == "bfloat16" else "float32"
        if case == "keras":
            return self.keras.layers.BatchNormalization(
                epsilon=EPSILON, dtype=policy)
        return keras_bn.BatchNormalization(
            epsilon=EPSILON, dtype=policy,
            fused=FUSED[case])

    def native_steps(self, x, dy):
        """`{"native": steps, "native_layer": steps}`, or {} without one."""
        made = self.native_forward(x)
        if made is None:
            return {}
        forward, params = made
        steps = {"native": self.forward_steps(forward, x, dy, params)}

        class KernelLayer(self.keras.layers.Layer):
            def call(self, x, training=False):
                return forward(x, training)

        # The candidates' policy: a float32 one would cast bfloat16 inputs.
        bf16 = self.keras.backend.standardize_dtype(x.dtype) == "bfloat16"
        wrapped = KernelLayer(dtype="mixed_bfloat16" if bf16 else "float32")
        steps["native_layer"] = self.forward_steps(
            lambda x, training: wrapped(x, training=training), x, dy, params)
        return steps

    def forward_steps(self, forward, x, dy, params):
        """(train, infer) of `forward(x, training)`, a function that reads
        its trainable `params` itself (the native kernel)."""
        step = self.execution.function_step
        return (step(lambda x, mask: forward(x, True), params, x, self.mode,
                     upstream=dy),
                step(lambda x, mask: forward(x, False), params, x,
                     self.mode, grad=False))

    def layer_steps(self, layer, x, dy):
        """(train, infer) of a Keras layer: a training step (forward, the
        VJP with `dy`, the moving statistics updated) and an inference
        forward."""
        layer.build(tuple(x.shape))
        step = self.execution.step_fn
        return (step(layer, x, self.mode, training=True, upstream=dy),
                step(layer, x, self.mode, training=False, grad=False))


class _TensorFlow(_Backend):
    def __init__(self, jit_compile=False):
        super().__init__()
        import tensorflow as tf

        self.tf = tf
        self.mode = "xla" if jit_compile else "function"
        self.function = functools.partial(tf.function, jit_compile=jit_compile)
        self.gpu = bool(tf.config.list_physical_devices("GPU"))
        self.scalar = tf.Variable(1.0)

    def sync(self, result):
        if self.gpu:
            self.tf.test.experimental.sync_devices()
        return result

    def native_forward(self, x):
        tf = self.tf
        c = x.shape[-1]
        gamma, beta = tf.Variable(tf.ones(c)), tf.Variable(tf.zeros(c))
        mean, var = tf.zeros(c), tf.ones(c)
        as4d = (lambda t: tf.reshape(t, (-1, 1, 1, c))) if x.shape.rank == 2 \
            else (lambda t: t)

        def forward(x, training):
            y = tf.compat.v1.nn.fused_batch_norm(
                as4d(x), gamma, beta, mean=None if training else mean,
                variance=None if training else var, epsilon=EPSILON,
                is_training=training)[0]
            return tf.reshape(y, tf.shape(x))

        return forward, [gamma, beta]

    def copy_step(self, x):
        fn = self.function(lambda x: x * self.tf.cast(self.scalar, x.dtype))
        return lambda: self.sync(fn(x))

    def peak_memory(self, step):
        tf = self.tf
        device = "GPU:0" if self.gpu else "CPU:0"
        step()
        try:
            tf.config.experimental.reset_memory_stats(device)
            before = tf.config.experimental.get_memory_info(device)["current"]
            result = step()
            peak = tf.config.experimental.get_memory_info(device)["peak"]
        except (ValueError, RuntimeError):
            return None
        del result
        # Zero when the CPU allocator keeps no statistics (no BFC).
        return (peak - before) or None


class _Torch(_Backend):
    def __init__(self, compile=False):
        super().__init__()
        import torch

        self.torch = torch
        self.gpu = torch.cuda.is_available()
        self.compile = compile
        self.mode = "compile" if compile else "eager"
        if compile:
            # One graph per candidate and mode: more than the default cache
            # of 8 per code object (the candidates share the step functions
            # of keras_bn._execution).
            torch._dynamo.config.cache_size_limit = 64

    def sync(self, result=None):
        if self.gpu:
            self.torch.cuda.synchronize()
        return result

    def tensor(self, array, dtype):
        return super().tensor(array, dtype).detach()

    def native_forward(self, x):
        torch = self.torch
        functional = torch.nn.functional
        c = x.shape[-1]
        kw = {"device": x.device, "dtype": torch.float32}
        gamma = torch.ones(c, requires_grad=True, **kw)
        beta = torch.zeros(c, requires_grad=True, **kw)
        mean, var = torch.zeros(c, **kw), torch.ones(c, **kw)
        # NHWC storage seen as NCHW in channels_last format: no copy.
        perm = (0, x.dim() - 1, *range(1, x.dim() - 1))
        inverse = (0, *range(2, x.dim()), 1)

        def forward(x, training):
            if x.dim() == 2:
                return functional.batch_norm(x, mean, var, gamma, beta,
                                             training, 0.01, EPSILON)
            return functional.batch_norm(
                x.permute(perm), mean, var, gamma, beta, training, 0.01,
                EPSILON).permute(inverse)

        return forward, [gamma, beta]

    def copy_step(self, x):
        s = self.torch.tensor(1.0, dtype=x.dtype, device=x.device)
        return lambda: self.sync(x * s)

    def peak_memory(self, step):
        torch = self.torch
        step()
        if self.gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            result = step()
            del result
            return torch.cuda.max_memory_allocated() - before
        import tempfile

        from torch.profiler import ProfilerActivity
        from torch.profiler import profile

        with profile(activities=[ProfilerActivity.CPU],
                     profile_memory=True) as prof:
            result = step()
        del result
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            events = json.load(open(f.name))["traceEvents"]
        memory = sorted((e for e in events if e.get("name") == "[memory]"),
                        key=lambda e: e["ts"])
        if not memory:
            return None
        # "Total Allocated" is the process's running total; the step's peak
        # is measured from the total just before its first (de)allocation.
        first = memory[0]["args"]
        before = first["Total Allocated"] - first["Bytes"]
        return max(e["args"]["Total Allocated"] for e in memory) - before


class _Jax(_Backend):
    mode = "jit"

    def __init__(self):
        super().__init__()
        import jax

        self.jax = jax

    def native_forward(self, x):
        return None  # XLA has no batch norm kernel of its own to call.

    def copy_step(self, x):
        fn = self.jax.jit(lambda x, s: x * s)
        s = self.jax.numpy.asarray(1.0, x.dtype)
        return lambda: self.jax.block_until_ready(fn(x, s))

    def layer_peak_memory(self, layer, x, dy):
        layer.build(tuple(x.shape))
        train = self.execution.step_fn(layer, x, self.mode, upstream=dy)
        stats = train.lower().compile().memory_analysis()
        if stats is None:
            return None
        return stats.temp_size_in_bytes + stats.output_size_in_bytes


BACKEND_CLASSES = {"tensorflow": _TensorFlow, "torch": _Torch, "jax": _Jax}


def _make_backend(backend, args):
    if backend == "tensorflow":
        return _TensorFlow(jit_compile=args.tf_xla)
    if backend == "torch":
        return _Torch(compile=args.torch_compile)
    return BACKEND_CLASSES[backend]()


# ------------------------------------------------------------------ child


def _inputs(bk, shape, dtype):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32) * 2.0 + 0.5
    dy = rng.standard_normal(shape, dtype=np.float32)
    return bk.tensor(x, dtype), bk.tensor(dy, dtype)


def _steps(bk, shape, dtype):
    """{case: (train, infer)} for one shape and dtype."""
    x, dy = _inputs(bk, shape, dtype)
    compiled = getattr(bk, "compile", False)
    if compiled:
        bk.torch._dynamo.reset()  # no dynamic-shape graphs from the last shape
    steps = {}
    for case in LAYERS:
        if not compiled or case in COMPILE_CASES:
            steps[case] = bk.layer_steps(bk.layer(case, dtype), x, dy)
    native = bk.native_steps(x, dy)
    steps.update({k: v for k, v in native.items()
                  if not compiled or k in COMPILE_CASES})
    if not compiled:
        copy = bk.copy_step(x)
        steps["copy"] = (copy, copy)
    return steps


def child_timing(backend, args):
    bk = _make_backend(backend, args)
    rows = []
    for shape in args.shapes:
        for dtype in args.dtypes:
            steps = _steps(bk, shape, dtype)
            for mode, index in (("train", 0), ("infer", 1)):
                fns = {case: s[index] for case, s in steps.items()}
                times = common.time_interleaved(fns, args.repeats, args.warmup)
                rows.append({"shape": list(shape), "dtype": dtype,
                             "mode": mode, "times": times})
                print(_row_text(backend, rows[-1]), file=sys.stderr, flush=True)
            del steps
    return {"machine": common.machine(backend), "repeats": args.repeats,
            "warmup": args.warmup, "epsilon": EPSILON, "rows": rows}


def child_memory(backend, args):
    bk = _make_backend(backend, args)
    rows = []
    for shape in args.shapes:
        for dtype in args.dtypes:
            x, dy = _inputs(bk, shape, dtype)
            peaks = {}
            for case in LAYERS:
                layer = bk.layer(case, dtype)
                if backend == "jax":
                    peaks[case] = bk.layer_peak_memory(layer, x, dy)
                else:
                    peaks[case] = bk.peak_memory(
                        bk.layer_steps(layer, x, dy)[0])
            native = bk.native_steps(x, dy).get("native")
            if native is not None:
                peaks["native"] = bk.peak_memory(native[0])
            rows.append({"shape": list(shape), "dtype": dtype,
                         "peak_bytes": peaks})
            print(f"{backend} {shape} {dtype} peak MiB: " + ", ".join(
                f"{k}={common.fmt(v and v / 2**20)}" for k, v in peaks.items()),
                flush=True)
    return {"rows": rows}


def _row_text(backend, row):
    t = row["times"]
    return (f"{backend:10s} {str(tuple(row['shape'])):18s} {row['dtype']:8s} "
            f"{row['mode']:5s} " + "  ".join(
                f"{k}={v['median_ms']:.2f}" for k, v in t.items()) + " ms")


# --------------------------------------------------------------- reporting


def _ratio(a, b):
    return None if a is None or b is None else a / b


def summarize(backend, result):
    """Adds ratios and target checks to each timing row."""
    memory = {(tuple(r["shape"]), r["dtype"]): r["peak_bytes"]
              for r in result.get("memory", {}).get("rows", [])}
    for row in result["rows"]:
        med = {k: v["median_ms"] for k, v in row["times"].items()}
        ours = med.get("keras_bn")
        row["ratios"] = {f"keras_bn/{k}": _ratio(ours, med.get(k))
                         for k in CASES[1:]}

        def target_ratio(stat):
            t = {k: v[stat] for k, v in row["times"].items()}
            if row["mode"] == "train":
                return _ratio(t["keras_bn"], t[TRAIN_TARGET[backend][0]])
            return _ratio(t["keras_bn"], min(
                v for k, v in t.items() if k in ("native", "keras")))

        if row["mode"] == "train":
            ref, limit = TRAIN_TARGET[backend]
        else:
            ref, limit = "fastest of native/keras", INFER_TARGET
        ratio = target_ratio("median_ms")
        # The ratio of the fastest runs: less sensitive to the load that
        # other processes put on a shared machine.
        row["target"] = {"against": ref, "limit": limit, "ratio": ratio,
                         "ratio_of_min": target_ratio("min_ms"),
                         "met": ratio is not None and ratio <= limit}
        peaks = memory.get((tuple(row["shape"]), row["dtype"]))
        if row["mode"] == "train" and peaks:
            row["peak_bytes"] = peaks
            ours_p, keras_p = peaks.get("keras_bn"), peaks.get("keras")
            row["memory_target_met"] = (
                None if ours_p is None or keras_p is None
                else ours_p <= keras_p)
    return result


def render(results_dir: Path) -> str:
    parts = ["# bench_layer results", "",
             "Median milliseconds per call; ratio = keras_bn / reference "
             "(`keras_bn/native` for TensorFlow and PyTorch training, "
             "`keras_bn/keras` for JAX, the faster of the two for "
             "inference); ratio of min = the same with each candidate's "
             "fastest run, less sensitive to other processes' load. Native "
             "in a Keras layer: the native kernel called from a minimal "
             "Keras layer, the floor for any Keras layer (eager PyTorch "
             "runs `Layer.__call__` on every call). Peak MiB: one training "
             "step. `--steady-malloc` sections: glibc's allocator keeps "
             "freed memory, as a caching allocator does; without it every "
             "candidate pays the page faults of fresh outputs. Regenerate "
             "with `nice python benchmarks/bench_layer.py` (see its "
             "docstring for the variants).", ""]
    runs = [(b, b, b) for b in common.BACKENDS]
    runs.insert(1, ("tensorflow", "tensorflow_xla", "tensorflow (XLA)"))
    runs.append(("torch", "torch_compile", "torch (torch.compile)"))
    runs += [(b, f"{b}_steady_malloc", f"{b} (--steady-malloc)")
             for b in common.BACKENDS]
    for backend, name, title in runs:
        path = results_dir / f"bench_layer_{name}.json"
        if not path.exists():
            continue
        result = summarize(backend, json.loads(path.read_text()))
        m = result["machine"]
        parts += [f"## {title}", "",
                  f"{m.get('device')} / {m['cpu']} ({m['cpu_count']} cores), "
                  f"keras {m.get('keras')}, {backend} {m.get(backend)}, "
                  f"{m['date']}, median of {result['repeats']}.", ""]
        header = ["shape", "dtype", "mode", "keras_bn", "keras_bn fused=True",
                  "keras_bn fused=False", "keras", "native",
                  "native in a Keras layer", "copy", "ratio",
                  "ratio of min", "target", "ratio vs native in a Keras layer",
                  "peak MiB keras_bn / keras / native"]
        rows = []
        for row in result["rows"]:
            med = {k: v["median_ms"] for k, v in row["times"].items()}
            tgt = row["target"]
            peaks = row.get("peak_bytes") or {}
            rows.append([
                "x".join(map(str, row["shape"])), row["dtype"], row["mode"],
                *(common.fmt(med.get(k), ".2f") for k in CASES),
                f"{common.fmt(tgt['ratio'], '.2f')} vs {tgt['against']}",
                common.fmt(tgt.get("ratio_of_min"), ".2f"),
                f"<= {tgt['limit']}: {'met' if tgt['met'] else 'NOT met'}",
                common.fmt(row["ratios"].get("keras_bn/native_layer"), ".2f"),
                " / ".join(common.fmt(peaks[k] / 2**20 if peaks.get(k)
                                      else None, ".0f")
                           for k in ("keras_bn", "keras", "native"))
                if peaks else "",
            ])
        parts += [common.markdown_table(header, rows), ""]
    return "\n".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default=",".join(common.BACKENDS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shapes", default=";".join(
        ",".join(map(str, s)) for s in SHAPES),
        help="semicolon-separated shapes, e.g. '128,32,32,64;1024,4096'")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--tf-xla", action="store_true",
                        help="TensorFlow only: jit_compile=True for every "
                        "candidate (results in bench_layer_tensorflow_xla)")
    parser.add_argument("--torch-compile", action="store_true",
                        help="PyTorch only: keras_bn, keras and native "
                        "under torch.compile (results in "
                        "bench_layer_torch_compile)")
    common.add_steady_malloc_option(parser)
    parser.add_argument("--render", action="store_true",
                        help="only rebuild the markdown from the JSON files")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shapes = [tuple(int(d) for d in s.split(","))
                   for s in args.shapes.split(";") if s]
    args.dtypes = [d for d in args.dtypes.split(",") if d]

    if args.child:
        common.quiet_logs()
        fn = child_memory if args.memory_only else child_timing
        common.emit(fn(args.child, args))
        return
    if not args.render:
        backends = [b for b in args.backends.split(",") if b]
        passthrough = ["--repeats", str(args.repeats), "--warmup",
                       str(args.warmup), "--shapes",
                       ";".join(",".join(map(str, s)) for s in args.shapes),
                       "--dtypes", ",".join(args.dtypes)]
        if args.tf_xla:
            backends = [b for b in backends if b == "tensorflow"]
            passthrough.append("--tf-xla")
        if args.torch_compile:
            backends = [b for b in backends if b == "torch"]
            passthrough.append("--torch-compile")
        malloc, env, suffix = common.malloc_settings(args, backends)
        # The user's own OpenMP setting, as bench_models and the demo: the
        # test runner's PASSIVE makes every parallel ATen kernel wake its
        # threads (ATen's batch norm, at any size).
        timings = common.run_children(__file__, backends, passthrough, env,
                                      user_openmp=True)
        memory = {} if args.no_memory else common.run_children(
            __file__, backends, passthrough + ["--memory-only"],
            # The CPU allocator keeps statistics only in BFC mode.
            extra_env={"tensorflow": {"TF_CPU_ALLOCATOR_USE_BFC": "true"}})
        for backend, result in timings.items():
            if backend in memory:
                result["memory"] = memory[backend]
            result["malloc"] = malloc
            summarize(backend, result)
            name = backend + ("_xla" if args.tf_xla else "") + (
                "_compile" if args.torch_compile else "") + suffix
            common.write_results("bench_layer", name, result, args.out)
    text = render(args.out)
    (args.out / "bench_layer.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
