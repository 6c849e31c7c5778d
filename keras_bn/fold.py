"""Folding batch normalization into the preceding layer, for inference."""

from __future__ import annotations

import copy
import dataclasses
import re

import keras
import numpy as np
from keras import ops

# Not exported by Keras; the class of functional models.
from keras_bn._compat import Functional

from keras_bn.convert import _Converter
from keras_bn.convert import keras_layer_config
from keras_bn.layers import BatchNormalization

_KERAS_BN = keras.layers.BatchNormalization
# Layers whose output is linear in a kernel with one output-channel axis.
_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_TRANSPOSE = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
              keras.layers.Conv3DTranspose)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_FOLDABLE = (keras.layers.Dense, keras.layers.EinsumDense, *_CONV,
             *_TRANSPOSE, *_DEPTHWISE, *_SEPARABLE)
_PROBE_BATCH, _PROBE_DIM = 2, 8


@dataclasses.dataclass
class FoldReport:
    """What `fold` did.

    Layers are named by their path from the folded model, e.g.
    `"inner/bn"` for layer `"bn"` of the nested model `"inner"`.

    Attributes:
        folded: `{batch-norm layer: layer it was folded into}`.
        not_folded: `{batch-norm layer: why it was not folded}`; these are
            `keras.layers.BatchNormalization` layers in the result.
        max_abs_diff: Largest absolute difference between the outputs of
            the original model (inference mode) and the folded one on the
            probe batch.
        max_rel_diff: `max_abs_diff` divided by the largest absolute
            output of the original model (the output scale); equal to
            `max_abs_diff` if every output is 0.
    """

    folded: dict[str, str]
    not_folded: dict[str, str]
    max_abs_diff: float
    max_rel_diff: float


def fold(
    model: keras.Model,
    data=None,
    include_keras_layers: bool = True,
    return_report: bool = False,
):
    """Returns an inference copy of `model` with batch norm folded away.

    At inference a batch-norm layer computes
    `y = x * scale + (beta - moving_mean * scale)` with
    `scale = gamma / sqrt(moving_variance + epsilon)`. When `x` is the
    output of a linear layer (`Dense`, `EinsumDense`, `Conv1D/2D/3D`,
    `Conv1D/2D/3DTranspose`, `DepthwiseConv1D/2D`, `SeparableConv1D/2D`)
    that has no activation and feeds nothing else, this is folded into
    that layer's kernel and bias (computed in float64) and the batch-norm
    layer is removed. The batch-norm layer's feature axis must be the
    layer's channel axis (for `EinsumDense`: output axes that index the
    kernel). A layer without a bias gets one.

    Every other `keras_bn.BatchNormalization` becomes a
    `keras.layers.BatchNormalization` with the same inference weights
    (options that only act in training, e.g. `virtual_batch_size`, are
    dropped), so the result depends on Keras alone and loads with
    `keras.saving.load_model` where keras_bn is not installed. The
    original model is not changed; other layers are copied with their
    weights, and the copy keeps every layer and model name. Layers
    shared by several calls are not folded into, and a nested model's
    batch-norm layer whose input comes from outside that model is not
    folded.

    Args:
        model: A built Sequential or functional model, possibly nested.
        data: Optional probe batch to compare the original and the folded
            model on: a NumPy array, or a tuple/list of arrays for a model
            with several inputs. Defaults to random normal values in the
            model's input shapes, with unknown sizes set to 2 for the
            batch axis and 8 for the others.
        include_keras_layers: Whether to fold `keras.layers.
            BatchNormalization` layers too (otherwise they are copied as
            they are).
        return_report: Whether to also return a `FoldReport`.

    Returns:
        The folded model, or `(folded_model, report)` if `return_report`.

    Raises:
        TypeError: If `model` is not a Sequential or functional model, a
            layer holds batch-norm layers in its own code, or an argument
            has the wrong type.
        ValueError: If `model` is not built, `data` does not fit it, or a
            `keras_bn.BatchNormalization` with several axes cannot be
            folded (Keras's layer has no equivalent).
    """
    if not isinstance(model, (keras.Sequential, Functional)):
        raise TypeError(
            "fold() can only rebuild Sequential and functional models. "
            f"Received: model={model!r} (of type {type(model).__name__})")
    for name, value in (("include_keras_layers", include_keras_layers),
                        ("return_report", return_report)):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool. Received: "
                            f"{name}={value!r}")
    if not model.built:
        raise ValueError(f"fold() needs a built model; call it on data or "
                         f"give it an Input first. Received: model="
                         f"{model.name!r} (not built)")
    probe = _probe(model, data)

    folder = _Folder(include_keras_layers)
    config = copy.deepcopy(model.get_config())
    folder.edit(model, config, "")
    folded = type(model).from_config(config)
    folder.copy_weights(model, folded, "")

    expected = _outputs(model, probe)
    got = _outputs(folded, probe)
    max_abs = max(float(np.max(np.abs(g - e), initial=0.0))
                  for e, g in zip(expected, got))
    out_scale = max(float(np.max(np.abs(e), initial=0.0)) for e in expected)
    report = FoldReport(
        folded=folder.folded, not_folded=folder.not_folded,
        max_abs_diff=max_abs,
        max_rel_diff=max_abs / out_scale if out_scale > 0 else max_abs,
    )
    return (folded, report) if return_report else folded


def _probe(model, data) -> list[np.ndarray]:
    shapes = [tuple(t.shape) for t in model.inputs]
    if data is None:
        rng = np.random.default_rng(0)
        data = [
            rng.standard_normal(
                [_PROBE_BATCH if i == 0 and d is None else d or _PROBE_DIM
                 for i, d in enumerate(shape)]
            ).astype(t.dtype)
            for shape, t in zip(shapes, model.inputs)
        ]
    elif isinstance(data, np.ndarray):
        data = [data]
    elif isinstance(data, (tuple, list)) and all(
        isinstance(x, np.ndarray) for x in data
    ):
        data = list(data)
    else:
        raise TypeError(f"`data` must be a NumPy array or a tuple/list of "
                        f"them. Received: data of type {type(data).__name__}")
    if len(data) != len(shapes) or any(
        x.ndim != len(s) or any(d not in (None, n) for d, n in zip(s, x.shape))
        for x, s in zip(data, shapes)
    ):
        raise ValueError(
            f"`data` must match the model's inputs {shapes}. Received: data "
            f"with shapes {[x.shape for x in data]}")
    return data


def _outputs(model, probe) -> list[np.ndarray]:
    outputs = model(probe if len(probe) > 1 else probe[0], training=False)
    return [np.asarray(ops.convert_to_numpy(y), dtype="float64")
            for y in keras.tree.flatten(outputs)]


def _history(structure):
    """Yields the `[layer, node, tensor]` lists of every tensor referenced
    in a functional config's nodes or outputs (mutable, to rewire)."""
    if isinstance(structure, dict):
        if structure.get("class_name") == "__keras_tensor__":
            yield structure["config"]["keras_history"]
        else:
            for value in structure.values():
                yield from _history(value)
    elif isinstance(structure, (list, tuple)):
        if (len(structure) == 3 and isinstance(structure[0], str)
                and all(isinstance(i, int) for i in structure[1:])):
            yield structure
        else:
            for value in structure:
                yield from _history(value)


def _axes(bn, rank: int) -> list[int]:
    axis = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    return sorted(a % rank for a in axis)


def _einsum_specs(layer, rank: int):
    """`(kernel spec, {output axis: letter})` of an EinsumDense."""
    inputs, kernel, output = re.match(
        r"([a-zA-Z.]+),([a-zA-Z]+)->([a-zA-Z.]+)", layer.equation).groups()
    letters = output.replace("...", "")
    # With a leading "...", the letters name the last axes; otherwise the
    # first ones (Keras appends right-elided axes at the end).
    start = rank - len(letters) if output.startswith("...") else 0
    return kernel, {start + i: c for i, c in enumerate(letters)}


class _Folder:
    """Edits model configs, remembering what to fold into what."""

    def __init__(self, include_keras_layers: bool):
        self.include_keras_layers = include_keras_layers
        self.folded, self.not_folded = {}, {}
        # path of a producer -> [(batch-norm layer, its input rank)], in order
        self.plan = {}
        self.counts = {}  # id(layer) -> occurrences in the model tree

    def _is_bn(self, layer) -> bool:
        return type(layer) is BatchNormalization or (
            self.include_keras_layers and type(layer) is _KERAS_BN)

    def _count(self, model):
        for layer in model.layers:
            self.counts[id(layer)] = self.counts.get(id(layer), 0) + 1
            if isinstance(layer, keras.Model) and self.counts[id(layer)] == 1:
                self._count(layer)

    def edit(self, model, config: dict, prefix: str):
        """Folds what it can in `config`, the config of `model`, in place."""
        if not prefix:
            self._count(model)
        functional = isinstance(model, Functional)
        entries = config["layers"]
        removed = set()  # indices of the folded batch-norm entries
        for i, entry in enumerate(entries):
            if entry["class_name"] == "InputLayer":
                continue  # Not among a Sequential model's layers.
            name = entry["config"]["name"]
            layer = model.get_layer(name)
            if isinstance(layer, keras.Model):
                if not isinstance(layer, (keras.Sequential, Functional)):
                    raise TypeError(
                        f"fold() can only rebuild Sequential and functional "
                        f"models, but {prefix + name!r} is a "
                        f"{type(layer).__name__}.")
                self.edit(layer, entry["config"], f"{prefix}{name}/")
                continue
            if not self._is_bn(layer):
                self._check_other(layer, prefix + name)
                continue
            rank = len(entry.get("build_config", {}).get("input_shape") or ())
            if functional:
                producer, reason = self._functional_producer(
                    model, config, i, removed, prefix)
            else:
                producer, reason = self._sequential_producer(
                    model, entries, i, removed, prefix)
            if reason is None:
                reason = self._check(layer, producer, rank)
            if reason is None:
                self._fold_entry(config, i, layer, producer, rank)
                removed.add(i)
                self.folded[prefix + name] = prefix + producer.name
                self.plan.setdefault(prefix + producer.name, []).append(
                    (layer, rank))
            else:
                self.not_folded[prefix + name] = reason
                if type(layer) is BatchNormalization:
                    entry.update(
                        module="keras.layers", class_name="BatchNormalization",
                        registered_name=None,
                        config=keras_layer_config(entry["config"],
                                                  prefix + name,
                                                  training=False))
        config["layers"] = [e for i, e in enumerate(entries)
                            if i not in removed]

    def _check_other(self, layer, path):
        if isinstance(layer, _KERAS_BN):
            if type(layer) is _KERAS_BN:
                self.not_folded[path] = ("keras.layers.BatchNormalization "
                                         "with include_keras_layers=False")
            elif isinstance(layer, BatchNormalization):
                raise TypeError(
                    f"fold() cannot express {path!r}, a subclass of "
                    f"keras_bn.BatchNormalization ({type(layer).__name__}), "
                    "with Keras's layer.")
        elif not isinstance(layer, keras.layers.InputLayer):
            _Converter._check_no_hidden_bn(layer)

    def _sequential_producer(self, model, entries, i, removed, prefix):
        previous = [e for j, e in enumerate(entries[:i]) if j not in removed]
        if not previous or previous[-1]["class_name"] == "InputLayer":
            where = f"the nested model {prefix[:-1]!r}" if prefix else (
                "the model")
            return None, f"its input is the input of {where}"
        return self._producer_layer(model, previous[-1]["config"]["name"])

    def _functional_producer(self, model, config, i, removed, prefix):
        entries = config["layers"]
        nodes = entries[i]["inbound_nodes"]
        if len(nodes) != 1:
            return None, f"the batch-norm layer is called {len(nodes)} times"
        sources = list(_history(nodes[0]["args"]))
        if len(sources) != 1:
            return None, "it has several inputs"
        source = list(sources[0])
        producer_entry = next(e for e in entries
                              if e["config"]["name"] == source[0])
        if producer_entry["class_name"] == "InputLayer":
            where = f"the nested model {prefix[:-1]!r}" if prefix else (
                "the model")
            return None, f"its input is an input of {where}"
        live = [e for j, e in enumerate(entries) if j not in removed]
        uses = sum(list(ref) == source for ref in _history(
            [[e["inbound_nodes"] for e in live], config["output_layers"]]))
        if uses > 1:
            return None, (f"the output of {source[0]!r} also feeds other "
                          "layers or the model's outputs")
        if len(producer_entry["inbound_nodes"]) > 1:
            return None, (f"{source[0]!r} is shared (called "
                          f"{len(producer_entry['inbound_nodes'])} times)")
        return self._producer_layer(model, source[0])

    def _producer_layer(self, model, name):
        producer = model.get_layer(name)
        if isinstance(producer, keras.Model):
            return None, f"its input comes from the nested model {name!r}"
        if type(producer) not in _FOLDABLE:
            return None, (f"its input comes from {name!r} "
                          f"({type(producer).__name__}), which has no "
                          "kernel to fold into")
        if self.counts.get(id(producer), 0) > 1:
            return None, f"{name!r} is shared by several models"
        return producer, None

    def _check(self, bn, producer, rank):
        """Why `bn` cannot be folded into `producer`, or None."""
        if getattr(bn, "statistics", None) == "batch":
            return ("statistics='batch' normalizes inference with each "
                    "batch's own statistics")
        name = producer.name
        activation = keras.activations.serialize(producer.activation)
        if activation not in ("linear", None):
            return f"{name!r} has the activation {activation!r}"
        if getattr(producer, "quantization_mode", None) or getattr(
                producer, "lora_enabled", False):
            return f"{name!r} is quantized or has LoRA weights"
        if not rank:
            return "the batch-norm layer is not built"
        axes = _axes(bn, rank)
        if isinstance(producer, keras.layers.EinsumDense):
            kernel, letters = _einsum_specs(producer, rank)
            missing = [a for a in axes if letters.get(a, ".") not in kernel]
            if missing:
                return (f"its axis {missing} is not an output axis of the "
                        f"kernel of {name!r} (equation "
                        f"{producer.equation!r})")
            return None
        if len(axes) != 1:
            return f"it normalizes several axes {axes}"
        channel = 1 if getattr(producer, "data_format",
                               None) == "channels_first" else rank - 1
        if axes[0] != channel:
            return (f"its axis {axes[0]} is not the channel axis {channel} "
                    f"of {name!r}")
        return None

    def _fold_entry(self, config, i, bn, producer, rank):
        """Gives the producer a bias and, in functional configs, rewires
        the consumers of entry `i` (the batch-norm layer) to it."""
        entries = config["layers"]
        producer_config = next(e for e in entries if e["config"]["name"]
                               == producer.name)["config"]
        if isinstance(producer, keras.layers.EinsumDense):
            letters = _einsum_specs(producer, rank)[1]
            output = producer.equation.split("->")[1]
            bias = set(producer_config.get("bias_axes") or "") | {
                letters[a] for a in _axes(bn, rank)}
            producer_config["bias_axes"] = "".join(
                c for c in output if c in bias)
        else:
            producer_config["use_bias"] = True
        if "inbound_nodes" in entries[i]:
            bn_name = entries[i]["config"]["name"]
            source = list(next(_history(entries[i]["inbound_nodes"][0])))
            for ref in _history([[e.get("inbound_nodes", []) for e in entries],
                                 config["output_layers"]]):
                if ref[0] == bn_name:
                    ref[:] = source

    def copy_weights(self, original, folded, prefix: str):
        """Copies the weights of `original` into its rebuilt copy."""
        for layer in folded.layers:
            source = original.get_layer(layer.name)
            path = prefix + layer.name
            if isinstance(layer, keras.Model):
                self.copy_weights(source, layer, path + "/")
            elif path in self.plan:
                values = _folded_weights(source, self.plan[path], layer)
                for variable in layer.weights:
                    variable.assign(
                        values[variable.name].astype(variable.dtype))
            elif isinstance(source, (_KERAS_BN, BatchNormalization)):
                values = {v.name: _np(v) for v in source.weights}
                for variable in layer.weights:
                    variable.assign(values[variable.name])
            else:
                layer.set_weights(source.get_weights())


def _np(variable, dtype=None) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(variable), dtype=dtype)


def _folded_weights(producer, bns, new_layer) -> dict[str, np.ndarray]:
    """The float64 weights of `producer` followed by the inference
    batch-norm layers `bns` (`(layer, input rank)` pairs), as weights of
    `new_layer`, its copy with a bias."""
    values = {v.name: _np(v, "float64") for v in producer.weights}
    kernel_name = ("pointwise_kernel" if isinstance(producer, _SEPARABLE)
                   else "kernel")
    kernel = values[kernel_name]
    new_bias = next(v for v in new_layer.weights if v.name == "bias")
    einsum = isinstance(producer, keras.layers.EinsumDense)
    if einsum:
        rank = bns[0][1]
        kernel_spec, letters = _einsum_specs(producer, rank)
        # The bias broadcasts against the output from the right.
        bias = values.get("bias", np.zeros(()))
        bias = bias.reshape((1,) * (rank - bias.ndim) + bias.shape)
    else:
        bias = values.get("bias", np.zeros(tuple(new_bias.shape)))
    for bn, _ in bns:
        gamma = _np(bn.gamma, "float64") if bn.scale else 1.0
        beta = _np(bn.beta, "float64") if bn.center else 0.0
        mean = _np(bn.moving_mean, "float64")
        scale = gamma / np.sqrt(_np(bn.moving_variance, "float64")
                                + bn.epsilon)
        shift = beta - mean * scale
        if einsum:
            axes = _axes(bn, rank)
            bn_spec = "".join(letters[a] for a in axes)
            kernel = np.einsum(f"{kernel_spec},{bn_spec}->{kernel_spec}",
                               kernel, scale)
            shape = [1] * rank
            for i, a in enumerate(axes):
                shape[a] = mean.shape[i]
            bias = bias * scale.reshape(shape) + shift.reshape(shape)
        else:
            if isinstance(producer, _TRANSPOSE):
                kernel = kernel * scale[:, None]
            elif isinstance(producer, _DEPTHWISE):
                kernel = kernel * scale.reshape(kernel.shape[-2:])
            else:
                kernel = kernel * scale
            bias = bias * scale + shift
    if einsum:
        target = tuple(new_bias.shape)
        bias = np.broadcast_to(bias, bias.shape[:rank - len(target)] + target)
        bias = bias.reshape(target)
    values[kernel_name] = kernel
    values["bias"] = bias
    return values
