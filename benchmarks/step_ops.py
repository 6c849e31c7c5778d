"""Ops of ONE TensorFlow training step of a batch-norm layer, ours against
Keras's: the forward call (with the moving-statistics update) plus the
gradients w.r.t. the input, gamma and beta, counted in the raw `tf.function`
graph (nested function bodies, i.e. `tf.cond` branches, included) and after
Grappler (the optimizer the runtime applies before running a graph), with
the op types, so that each extra op can be attributed.

Two input signatures: a static batch (`(128, 128)`, what `bench_ops` traces)
and a dynamic one (`(None, 128)`: what `model.fit` traces on TensorFlow,
where `jit_compile="auto"` resolves to False on a CPU-only machine).

    python benchmarks/step_ops.py [--rows 128] [--channels 128] [--types]

Writes benchmarks/results/step_ops_tensorflow.json and step_ops.md.
"""

from __future__ import annotations

import argparse
import collections
import sys


def _layer(name, channels):
    import keras

    import keras_bn

    cls = (keras_bn.BatchNormalization if name == "keras_bn"
           else keras.layers.BatchNormalization)
    layer = cls()
    layer.build((None, channels))
    return layer


def _step(layer, signature):
    import tensorflow as tf

    @tf.function(input_signature=[signature, signature])
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, [x] + layer.trainable_weights,
                             output_gradients=dy)

    return step.get_concrete_function()


# Placeholders, variable handles and the function's output plumbing: the
# same for both layers, and no work.
_PLUMBING = {"Placeholder", "NoOp", "_Arg", "_Retval"}


def _raw_types(fn) -> collections.Counter:
    """Op types of the traced graph, the bodies of nested functions
    (tf.cond branches, custom gradients) included."""
    graph = fn.graph
    types = collections.Counter(op.type for op in graph.get_operations())
    library = {f.signature.name: f for f in
               graph.as_graph_def().library.function}
    seen = set()

    def visit(name):
        if name in seen or name not in library:
            return
        seen.add(name)
        for node in library[name].node_def:
            types[node.op] += 1
            for attr in node.attr.values():
                if attr.HasField("func"):
                    visit(attr.func.name)

    for op in graph.get_operations():
        for attr in op.node_def.attr.values():
            if attr.HasField("func"):
                visit(attr.func.name)
    return types


def _grappler_types(fn) -> collections.Counter:
    """Op types after the default Grappler pipeline (nested functions as
    Grappler leaves them: it inlines and lowers `If` into Switch/Merge)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.grappler import tf_optimizer

    graph = fn.graph
    meta = tf.compat.v1.train.export_meta_graph(
        graph_def=graph.as_graph_def(add_shapes=True), graph=graph)
    fetch = meta.collection_def["train_op"].node_list.value
    for t in graph.outputs:
        fetch.append(t.op.name)
    for op in graph.control_outputs:
        fetch.append(op.name)
    config = config_pb2.ConfigProto()
    optimized = tf_optimizer.OptimizeGraph(config, meta, graph_id=b"tf_graph")
    types = collections.Counter(node.op for node in optimized.node)
    for f in optimized.library.function:
        for node in f.node_def:
            types[node.op] += 1
    return types


def grappler_ops(fn) -> int:
    """Ops of concrete function `fn` after Grappler, plumbing left out."""
    types = _grappler_types(fn)
    return sum(n for t, n in types.items() if t not in _PLUMBING)


def count(name, rows, channels) -> dict:
    import tensorflow as tf

    out = {}
    for label, batch in (("static", rows), ("dynamic", None)):
        layer = _layer(name, channels)
        fn = _step(layer, tf.TensorSpec((batch, channels), tf.float32))
        raw, opt = _raw_types(fn), _grappler_types(fn)
        for t in _PLUMBING:
            raw.pop(t, None)
            opt.pop(t, None)
        # The plan its trace recorded (ours only).
        plans = layer._plans.by_facts.values() if name == "keras_bn" else ()
        path = next((p.path.name for p in plans), None)
        out[label] = {"raw": raw, "grappler": opt, "path": path}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--types", action="store_true",
                        help="list the op types of each count")
    args = parser.parse_args(argv)
    results = {n: count(n, args.rows, args.channels)
               for n in ("keras_bn", "keras")}
    _write(results, args.rows, args.channels)
    for label in ("static", "dynamic"):
        print(f"== {label} batch ({args.rows if label == 'static' else None}"
              f", {args.channels}); ours path: "
              f"{results['keras_bn'][label]['path']}")
        for kind in ("raw", "grappler"):
            a = results["keras_bn"][label][kind]
            b = results["keras"][label][kind]
            print(f"  {kind:8s} ours {sum(a.values()):4d}  "
                  f"keras {sum(b.values()):4d}")
            if args.types:
                for t in sorted(set(a) | set(b)):
                    if a[t] != b[t] or args.types:
                        print(f"      {t:28s} {a[t]:3d} {b[t]:3d}")
    return 0


def _write(results, rows, channels):
    import common

    table = []
    for label in ("static", "dynamic"):
        ours, keras = results["keras_bn"][label], results["keras"][label]
        table.append([
            f"({rows if label == 'static' else None}, {channels})",
            ours["path"],
            *(f"{sum(ours[k].values())} / {sum(keras[k].values())}"
              for k in ("grappler", "raw"))])
    payload = {"rows": rows, "channels": channels,
               "machine": common.machine("tensorflow"),
               "results": {n: {label: {k: dict(v) if k != "path" else v
                                       for k, v in r.items()}
                               for label, r in by.items()}
                           for n, by in results.items()}}
    common.write_results("step_ops", "tensorflow", payload)
    (common.RESULTS / "step_ops.md").write_text(
        "# One TensorFlow training step's ops, ours / Keras's\n\n"
        "Forward with the moving update, plus gradients w.r.t. the input, "
        "gamma and beta (`python benchmarks/step_ops.py`). A `None` batch "
        "is what `model.fit` traces.\n\n"
        + common.markdown_table(
            ["input", "our path", "ops after Grappler", "raw ops"], table)
        + "\n")


if __name__ == "__main__":
    sys.exit(main())
