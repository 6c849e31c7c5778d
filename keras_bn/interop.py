"""Batch-norm weights and conventions from PyTorch and Flax.

PyTorch and Flax keep the same four vectors as Keras (a scale, an offset,
a running mean and a running variance) under other names and rules, and
because the four have the same shape a port that gets one convention
wrong raises no error. The functions here convert each one explicitly:
Keras's momentum is PyTorch's `1 - momentum` (Flax's is Keras's), the
epsilon defaults differ (Keras 1e-3, PyTorch and Flax 1e-5), PyTorch
updates the running variance with the unbiased batch variance (Keras and
Flax with the biased one), PyTorch's `momentum=None` is a cumulative
average, and PyTorch's feature axis is 1 (channels first). The table of
every convention is in the guide, "Coming from PyTorch / Flax".

Layers: `from_torch` / `to_torch` and `from_flax` / `to_flax`. Models:
`load_torch`. `torch` and `flax` are imported only when a function needs
them, and work whatever Keras's backend is (torch modules are plain CPU
objects here).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Mapping

import keras
import numpy as np

from keras_bn import _compat
from keras_bn import _validation as check
from keras_bn.layers import BatchNormalization

_KERAS_BN = keras.layers.BatchNormalization
_BN_TYPES = (BatchNormalization, _KERAS_BN)
_TORCH_EPS = 1e-5  # torch.nn.BatchNorm*d's defaults, for a bare state_dict
_TORCH_MOMENTUM = 0.1
_STATE_KEYS = ("weight", "bias", "running_mean", "running_var",
               "num_batches_tracked")
_FLAX_ATTRIBUTES = ("momentum", "epsilon", "axis", "use_running_average",
                    "use_bias", "use_scale")
_FLAX_DEFAULTS = {"momentum": 0.99, "epsilon": 1e-5, "axis": -1}
# Inputs of these ranks go to BatchNorm1d (2, 3), 2d (4) and 3d (5).
_TORCH_CLASS_BY_RANK = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d",
                        5: "BatchNorm3d"}
_RANK_BY_TORCH_CLASS = {"BatchNorm1d": 2, "BatchNorm2d": 4, "BatchNorm3d": 5}
_DEFAULT_RANK = 4  # where the source does not say (state_dict, Flax)
_TORCH_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _torch_bn_classes() -> tuple:
    """Every public torch batch-norm class (a lazy one becomes its
    BatchNorm*d once it has seen an input)."""
    import torch

    nn = torch.nn
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
            nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)


def _complement(momentum: float) -> float:
    """`1 - momentum`, rounded to 15 significant digits: both directions
    then give back the momentum a person wrote (`1 - (1 - 0.1)` is
    0.09999999999999998 in floats, this gives 0.1), within 1e-15."""
    return float(f"{1.0 - momentum:.15g}")


def _numpy(value, what: str) -> np.ndarray:
    """A torch tensor, JAX/NumPy array or Keras variable as a NumPy copy
    (never a view: JAX on CPU may alias a NumPy buffer, which torch then
    updates in place; torch's Keras variables share theirs); torch's
    bfloat16 (which NumPy lacks) widened to float32, exactly."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy().copy()
    if isinstance(value, keras.Variable):
        return np.array(keras.ops.convert_to_numpy(value))
    try:
        return np.array(value)
    except Exception as error:
        raise TypeError(f"{what} must be an array or tensor. Received: "
                        f"{check.describe(value)}") from error


def _dtype_name(value, array: np.ndarray) -> str:
    """`value`'s dtype by name ("bfloat16" for torch's, which NumPy lacks)."""
    return str(getattr(value, "dtype", array.dtype)).removeprefix("torch.")


# ------------------------------------------------------------------- PyTorch


@dataclasses.dataclass
class _TorchBN:
    """A torch batch norm's values and settings, framework-free."""

    name: str
    weight: np.ndarray | None
    bias: np.ndarray | None
    running_mean: np.ndarray
    running_var: np.ndarray
    num_batches_tracked: int | None
    eps: float
    momentum: float | None
    rank: int | None  # None: a state_dict or SyncBatchNorm (any rank)
    dtype: str


def _read_torch(source, name: str) -> _TorchBN:
    """`source` (a torch batch-norm module or its state_dict) as values."""
    if isinstance(source, Mapping):
        return _read_state_dict(source, name)
    import torch

    classes = _torch_bn_classes()
    if not isinstance(source, classes):
        kind = ("a torch.nn.Module that is not a batch-norm module"
                if isinstance(source, torch.nn.Module)
                else "not a torch module")
        raise TypeError(
            f"`{name}` must be a torch.nn.BatchNorm1d/2d/3d or SyncBatchNorm "
            f"module, or its state_dict; this is {kind}. Received: "
            f"{name}={check.describe(source)}")
    if any(isinstance(p, torch.nn.parameter.UninitializedParameter)
           for p in source.parameters()) or any(
            isinstance(b, torch.nn.parameter.UninitializedBuffer)
            for b in source.buffers()):
        raise ValueError(f"`{name}` is a lazy module that has not seen an "
                         "input yet, so its number of features is unknown. "
                         f"Call it once first. Received: {name}={source!r}")
    if not source.track_running_stats or source.running_mean is None:
        _no_running_stats(name, source)
    state = {k: v for k, v in source.state_dict().items() if v is not None}
    spec = _read_state_dict(state, name)
    spec.eps = float(source.eps)
    spec.momentum = (None if source.momentum is None
                     else float(source.momentum))
    cls = next((c for c in _RANK_BY_TORCH_CLASS
                if isinstance(source, getattr(torch.nn, c))), None)
    spec.rank = _RANK_BY_TORCH_CLASS.get(cls)
    return spec


def _no_running_stats(name: str, source):
    raise ValueError(
        f"`{name}` has track_running_stats=False: it normalizes with the "
        "batch's statistics in inference as well and keeps no running "
        "statistics, and keras_bn.BatchNormalization has no such mode (it "
        "normalizes inference calls with its moving statistics). Convert a "
        "module with track_running_stats=True. Received: "
        f"{name}={source!r}")


def _read_state_dict(state: Mapping, name: str) -> _TorchBN:
    unknown = sorted(str(k) for k in state if k not in _STATE_KEYS)
    if unknown:
        raise ValueError(
            f"`{name}` must be the state_dict of one batch-norm module, with "
            f"keys among {list(_STATE_KEYS)}; it has {unknown}. (For a whole "
            "model's state_dict, use keras_bn.interop.load_torch with the "
            f"module.) Received: {name} with keys {list(state)}")
    missing = [k for k in ("running_mean", "running_var") if k not in state]
    if missing:
        hint = (" That is the state_dict of a module with "
                "track_running_stats=False, which keras_bn has no "
                "equivalent for (it normalizes inference calls with moving "
                "statistics)." if len(missing) == 2 else "")
        raise ValueError(f"`{name}` lacks {missing}.{hint} Received: "
                         f"{name} with keys {list(state)}")
    values = {}
    for key in _STATE_KEYS[:4]:
        if key in state:
            value = _numpy(state[key], f"`{name}['{key}']`")
            if value.ndim != 1 or not np.issubdtype(value.dtype, np.floating):
                raise ValueError(
                    f"`{name}['{key}']` must be a 1-D float tensor. "
                    f"Received: shape {value.shape}, dtype {value.dtype}")
            values[key] = value
    if "bias" in values and "weight" not in values:
        raise ValueError(f"`{name}` has a bias but no weight, which no "
                         "torch batch-norm module holds. Received: "
                         f"{name} with keys {list(state)}")
    shapes = {k: v.shape for k, v in values.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"`{name}`'s vectors must have one shape. "
                         f"Received: shapes {shapes}")
    count = state.get("num_batches_tracked")
    if count is not None:
        count = _numpy(count, f"`{name}['num_batches_tracked']`")
        if count.shape != () or not np.issubdtype(count.dtype, np.integer):
            raise ValueError(f"`{name}['num_batches_tracked']` must be an "
                             f"integer scalar. Received: {count!r}")
        count = int(count)
    dtype = _dtype_name(state["running_mean"], values["running_mean"])
    return _TorchBN(
        name=name, weight=values.get("weight"), bias=values.get("bias"),
        running_mean=values["running_mean"],
        running_var=values["running_var"], num_batches_tracked=count,
        eps=_TORCH_EPS, momentum=_TORCH_MOMENTUM, rank=None, dtype=dtype)


def _torch_settings(spec: _TorchBN) -> dict:
    """The keras_bn arguments that reproduce `spec`'s rules."""
    settings = {
        "axis": 1,
        "momentum": None if spec.momentum is None else _complement(
            spec.momentum),
        "epsilon": spec.eps,
        "center": spec.bias is not None,
        "scale": spec.weight is not None,
        "moving_variance_estimator": "unbiased",
    }
    if spec.dtype in ("float16", "bfloat16", "float64"):
        settings["dtype"] = spec.dtype
    return settings


def from_torch(module_or_state_dict, *, input_rank: int | None = None,
               **layer_kwargs) -> BatchNormalization:
    """A built `keras_bn.BatchNormalization` equal to a torch batch norm.

    Converts the conventions (see the module's table): Keras's momentum is
    `1 - momentum` (torch's `momentum=None`, a cumulative average counted
    by `num_batches_tracked`, stays `momentum=None`), `epsilon` is the
    module's `eps` (torch's default is 1e-5, Keras's 1e-3),
    `affine=False` gives `center=False, scale=False` (and `bias=False`
    gives `center=False`), and the running variance is updated as torch
    does, with the unbiased batch variance
    (`moving_variance_estimator="unbiased"`), so that training continues
    exactly as in PyTorch. The feature axis is 1 (channels first, torch's
    layout) unless `layer_kwargs` give `axis` or `data_format`: the
    weights are the same vectors in a channels-last Keras model.

    A `state_dict` holds no settings: `eps` and `momentum` are then torch's
    defaults (1e-5, 0.1) unless `layer_kwargs` give `epsilon` and
    `momentum` (in Keras's convention).

    Args:
        module_or_state_dict: A `torch.nn.BatchNorm1d`, `BatchNorm2d`,
            `BatchNorm3d` or `SyncBatchNorm` module (with
            `track_running_stats=True`), or the `state_dict` of one (keys
            `weight`, `bias`, `running_mean`, `running_var`,
            `num_batches_tracked`; `weight` and `bias` absent without
            affine parameters).
        input_rank: The rank of the inputs the layer is built for. Defaults
            to the module's: 2 for `BatchNorm1d` (pass 3 for `(N, C, L)`
            inputs), 4 for `BatchNorm2d`, 5 for `BatchNorm3d`, and 4 for a
            `state_dict` or a `SyncBatchNorm`.
        **layer_kwargs: Arguments of `keras_bn.BatchNormalization` that
            override the converted ones (Keras's conventions), e.g.
            `axis=-1` for channels-last inputs, or `name`.

    Returns:
        A built `keras_bn.BatchNormalization` holding the module's weights
        (`num_batches_tracked` too where `momentum` is None).

    Raises:
        TypeError: If `module_or_state_dict` is neither a torch batch-norm
            module nor a mapping, or an argument has the wrong type.
        ValueError: If the module has `track_running_stats=False` (keras_bn
            has no mode that normalizes inference with batch statistics),
            the state_dict lacks keys or has others, `layer_kwargs`
            contradict the weights (`center`/`scale`) or ask for
            `renorm`, or the feature axis does not fit `input_rank`.
    """
    spec = _read_torch(module_or_state_dict, "module_or_state_dict")
    input_rank = check.integer("input_rank", input_rank, minimum=2,
                               allow_none=True)
    kwargs = _torch_settings(spec)
    kwargs = _merge(kwargs, layer_kwargs, "module_or_state_dict")
    layer = BatchNormalization(**kwargs)
    _build(layer, input_rank or spec.rank or _DEFAULT_RANK,
           spec.running_mean.shape)
    values = {"gamma": spec.weight, "beta": spec.bias,
              "moving_mean": spec.running_mean,
              "moving_variance": spec.running_var}
    if spec.num_batches_tracked is not None:
        values["num_batches_tracked"] = np.asarray(spec.num_batches_tracked)
    _assign_all([(layer, _values_for(layer, values, spec.name))])
    return layer


def _merge(settings: dict, layer_kwargs: dict, source: str) -> dict:
    """`settings` overridden by `layer_kwargs`, refusing overrides that
    contradict the weights."""
    if layer_kwargs.get("renorm"):
        raise ValueError(
            f"`renorm=True`: {source} has no Batch Renormalization weights "
            "to load. Convert without it, then "
            "`keras_bn.convert(layer, renorm=True)` starts renorm from the "
            "loaded statistics.")
    for key in ("center", "scale"):
        if key in layer_kwargs and bool(layer_kwargs[key]) != settings[key]:
            raise ValueError(
                f"`{key}={layer_kwargs[key]!r}` contradicts {source}, whose "
                f"weights give {key}={settings[key]}.")
    if "data_format" in layer_kwargs and "axis" not in layer_kwargs:
        settings = {k: v for k, v in settings.items() if k != "axis"}
    return {**settings, **layer_kwargs}


def _feature_axes(layer, rank: int) -> list[int]:
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [
        layer.axis]
    return sorted(a % rank for a in axis)


def _build(layer, rank: int, feature_shape: tuple):
    """Builds `layer` for inputs of `rank` whose feature axes hold
    `feature_shape` (every other size unknown)."""
    raw = layer.axis if isinstance(layer.axis, (list, tuple)) else [
        layer.axis]
    if len(raw) != len(feature_shape):
        raise ValueError(
            f"The weights have shape {tuple(feature_shape)}, one size per "
            f"feature axis, but the layer has axis={layer.axis!r}.")
    if any(not -rank <= a < rank for a in raw):
        raise ValueError(f"`axis={layer.axis!r}` is out of range for inputs "
                         f"of rank {rank} (input_rank={rank}).")
    axes = _feature_axes(layer, rank)
    if 0 in axes:
        raise ValueError(f"`axis={layer.axis!r}` makes the batch axis a "
                         f"feature axis for inputs of rank {rank}.")
    shape = [None] * rank
    for a, size in zip(axes, feature_shape):
        shape[a] = int(size)
    layer.build(tuple(shape))


def _values_for(layer, values: dict, source: str) -> list:
    """`[(variable, array)]` for `layer`'s weights from `values` (None
    entries: weights the source lacks), checked before anything is
    assigned."""
    weights = {v.name: v for v in layer.weights}
    pairs = []
    for key, value in values.items():
        variable = weights.get(key)
        if variable is None:
            if value is not None and key != "num_batches_tracked":
                raise ValueError(
                    f"{source} has a {key!r} vector, but the Keras layer "
                    f"{layer.name!r} has no {key!r} weight (center/scale "
                    "differ).")
            continue
        if value is None:
            raise ValueError(
                f"The Keras layer {layer.name!r} has a {key!r} weight, but "
                f"{source} has no such vector (center/scale differ).")
        if tuple(variable.shape) != tuple(value.shape):
            raise ValueError(
                f"Shape mismatch: {layer.name!r}.{key} has shape "
                f"{tuple(variable.shape)}, {source} gives "
                f"{tuple(value.shape)}.")
        pairs.append((variable, value))
    return pairs


def _assign_all(plan: list):
    """Assigns every `(layer, [(variable, array)])` of `plan` (checked
    beforehand, so a mismatch leaves every weight as it was)."""
    for _, pairs in plan:
        for variable, value in pairs:
            dtype = keras.backend.standardize_dtype(variable.dtype)
            # NumPy has no bfloat16: float32 holds its values exactly.
            variable.assign(np.asarray(
                value, "float32" if dtype == "bfloat16" else dtype))


def _check_layer(layer, name: str):
    if not isinstance(layer, _BN_TYPES):
        raise TypeError(f"`{name}` must be a keras_bn.BatchNormalization or "
                        "keras.layers.BatchNormalization layer. Received: "
                        f"{name}={check.describe(layer)}")
    if not layer.built:
        raise ValueError(f"`{name}` must be built (its weights exist once it "
                         f"has seen an input shape). Received: {name}="
                         f"{layer.name!r} (not built)")


def _weights(layer) -> dict:
    return {v.name: _numpy(v, v.name) for v in layer.weights}


def _refuse(layer, option: str, target: str, why: str):
    raise ValueError(f"{target} cannot express {option} of layer "
                     f"{layer.name!r}: {why}")


def _refuse_keras_bn_only(layer, target: str, framework: str):
    """Refuses the options no other framework's layer has: Batch
    Renormalization, ghost batches, the statistics switches, accumulated
    and bias-corrected moving statistics."""
    if getattr(layer, "renorm", False):
        _refuse(layer, "renorm=True", target,
                f"{framework} has no Batch Renormalization.")
    if getattr(layer, "virtual_batch_size", None) is not None:
        _refuse(layer, f"virtual_batch_size={layer.virtual_batch_size}",
                target, f"{framework} has no ghost batches.")
    for option in ("statistics", "update_moving_statistics"):
        value = getattr(layer, option, None)
        if value is not None:
            _refuse(layer, f"{option}={value!r}", target,
                    f"{framework}'s layer follows its mode flag alone.")
    if getattr(layer, "moving_statistics_steps", 1) > 1:
        _refuse(layer, f"moving_statistics_steps="
                f"{layer.moving_statistics_steps}", target,
                f"{framework}'s layer updates its statistics every batch.")
    if getattr(layer, "debias_moving_statistics", False):
        _refuse(layer, "debias_moving_statistics=True", target,
                f"{framework}'s layer keeps plain moving averages.")


def to_torch(layer):
    """A `torch.nn.BatchNorm1d`, `2d` or `3d` equal to a Keras batch norm.

    The class follows the rank the layer was built for: 2 or 3 gives
    `BatchNorm1d`, 4 `BatchNorm2d`, 5 `BatchNorm3d`. torch's momentum is
    `1 - momentum` (`momentum=None` stays None, with
    `num_batches_tracked`; otherwise `num_batches_tracked` is 0, torch
    reads it only for `momentum=None`), `eps` is `epsilon`, and
    `center`/`scale` map to `affine` (`scale` without `center` gives
    `bias=False`; `center` without `scale` gives a weight of ones with
    `requires_grad=False`, which trains as no scale). A layer that is not
    trainable gives a module in eval mode, with its parameters frozen.

    A torch module always normalizes axis 1: a channels-last layer
    (`axis=-1`) gives a module that expects channels-first inputs, so
    transpose them (`x.permute(0, 3, 1, 2)` for images) or convert the
    whole model to channels first. torch updates the running variance with
    the unbiased batch variance: a layer with Keras's rule
    (`moving_variance_estimator="biased"`, the default, and every
    `keras.layers.BatchNormalization`) gives the same inference, but its
    training then continues by torch's rule (a warning says so).
    `synchronized=True` (and `synchronized_group_size`) is dropped: wrap
    the model with `torch.nn.SyncBatchNorm.convert_sync_batchnorm` (its
    `process_group` sets the group).

    Args:
        layer: A built `keras_bn.BatchNormalization` or
            `keras.layers.BatchNormalization`.

    Returns:
        A `torch.nn.BatchNorm1d/2d/3d` on the CPU, in the dtype of the
        layer's weights, holding the same weights.

    Raises:
        TypeError: If `layer` is not a batch-norm layer.
        ValueError: If `layer` is not built, or has an option torch's
            module cannot express: several feature axes, Batch
            Renormalization, ghost batches (`virtual_batch_size`), or
            inputs of rank above 5.
    """
    import torch

    _check_layer(layer, "layer")
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [
        layer.axis]
    rank = len(_compat.reduction_axes(layer)) + len(axes)
    target = "torch.nn.BatchNorm*d"
    if len(_feature_axes(layer, rank)) != 1:
        _refuse(layer, f"axis={layer.axis!r}", target,
                "torch normalizes one feature axis.")
    _refuse_keras_bn_only(layer, target, "torch")
    if rank not in _TORCH_CLASS_BY_RANK:
        _refuse(layer, f"inputs of rank {rank}", target,
                "BatchNorm1d/2d/3d take inputs of rank 2 to 5.")
    estimator = getattr(layer, "moving_variance_estimator", "biased")
    if estimator != "unbiased":
        warnings.warn(
            f"to_torch: {layer.name!r} updates its moving variance with the "
            "biased batch variance (Keras's rule), torch with the unbiased "
            "one: inference is the same, but training the module continues "
            "by torch's rule.", stacklevel=2)
    weights = _weights(layer)
    dtype = keras.backend.standardize_dtype(layer.moving_mean.dtype)
    features = int(weights["moving_mean"].shape[0])
    kwargs = {}
    if layer.scale and not layer.center:
        if "bias" not in inspect.signature(
                torch.nn.BatchNorm1d.__init__).parameters:
            _refuse(layer, "scale=True with center=False", target,
                    f"torch {torch.__version__} has no bias=False.")
        kwargs["bias"] = False
    momentum = None if layer.momentum is None else _complement(
        layer.momentum)
    cls = getattr(torch.nn, _TORCH_CLASS_BY_RANK[rank])
    module = cls(features, eps=layer.epsilon, momentum=momentum,
                 affine=layer.scale or layer.center,
                 dtype=getattr(torch, dtype), **kwargs)

    def tensor(array):
        return torch.from_numpy(np.asarray(array, "float32" if dtype == (
            "bfloat16") else dtype)).to(getattr(torch, dtype))

    with torch.no_grad():
        if module.weight is not None:
            if layer.scale:
                module.weight.copy_(tensor(weights["gamma"]))
            else:
                module.weight.fill_(1.0)
                module.weight.requires_grad_(False)
        if module.bias is not None:
            module.bias.copy_(tensor(weights["beta"]))
        module.running_mean.copy_(tensor(weights["moving_mean"]))
        module.running_var.copy_(tensor(weights["moving_variance"]))
        if momentum is None and "num_batches_tracked" in weights:
            module.num_batches_tracked.fill_(
                int(weights["num_batches_tracked"]))
    if not layer.trainable:
        module.eval()
        module.requires_grad_(False)
    return module


# ---------------------------------------------------------------------- Flax


def _read_flax(variables, name: str) -> dict:
    if not isinstance(variables, Mapping):
        raise TypeError(
            f"`{name}` must be a Flax BatchNorm variables dict "
            "{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}}. "
            f"Received: {name}={check.describe(variables)}")
    unknown = sorted(str(k) for k in variables
                     if k not in ("params", "batch_stats"))
    stats = variables.get("batch_stats")
    params = variables.get("params", {})
    if unknown or not isinstance(stats, Mapping) or not isinstance(
            params, Mapping):
        raise ValueError(
            f"`{name}` must hold the collections 'batch_stats' (mean, var) "
            "and, with a scale or bias, 'params' of one Flax BatchNorm. "
            f"Received: {name} with collections {list(variables)}")
    extra = sorted(set(stats) - {"mean", "var"}) + sorted(
        set(params) - {"scale", "bias"})
    missing = [k for k in ("mean", "var") if k not in stats]
    if extra or missing:
        raise ValueError(
            f"`{name}` must be the variables of one Flax BatchNorm: "
            "batch_stats {'mean', 'var'}, params among {'scale', 'bias'}. "
            f"Missing: {missing}; unexpected: {extra}. (A whole model's "
            "variables: pass variables['params'][name] and "
            "variables['batch_stats'][name] of each BatchNorm.) Received: "
            f"batch_stats keys {list(stats)}, params keys {list(params)}")
    values = {"mean": stats["mean"], "var": stats["var"],
              "scale": params.get("scale"), "bias": params.get("bias")}
    values = {k: None if v is None else _numpy(v, f"`{name}` {k!r}")
              for k, v in values.items()}
    shapes = {k: v.shape for k, v in values.items() if v is not None}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"`{name}`'s arrays must have one shape. "
                         f"Received: shapes {shapes}")
    return values


def from_flax(variables, *, input_rank: int | None = None,
              **layer_kwargs) -> BatchNormalization:
    """A built `keras_bn.BatchNormalization` equal to a Flax `BatchNorm`.

    Flax's `flax.linen.BatchNorm` keeps Keras's conventions for the
    momentum (the weight of the old value) and the running variance
    (biased), with another epsilon default (1e-5) and other names: its
    variables `{"params": {"scale", "bias"}, "batch_stats": {"mean",
    "var"}}` become `gamma`, `beta`, `moving_mean` and `moving_variance`.
    The module's attributes are not in its variables: pass them as
    keyword arguments, under Flax's names (`momentum`, `epsilon`, `axis`,
    `use_running_average`, `use_bias`, `use_scale`; defaults as in Flax:
    0.99, 1e-5, -1). `use_running_average=True` gives a layer with
    `trainable=False`, which Keras runs in inference mode.
    `from_flax(*to_flax(layer))` gives `layer` back.

    Args:
        variables: The variables of one Flax `BatchNorm` (a dict or
            FrozenDict of JAX or NumPy arrays); without scale and bias,
            `params` may be absent.
        input_rank: The rank of the inputs the layer is built for (Flax
            modules take any rank). Defaults to 4 (NHWC images).
        **layer_kwargs: The Flax attributes above, and any other
            argument of `keras_bn.BatchNormalization` (e.g. `name`).

    Returns:
        A built `keras_bn.BatchNormalization` holding the same weights.

    Raises:
        TypeError: If `variables` is not a mapping, or an argument has the
            wrong type.
        ValueError: If `variables` is not one BatchNorm's, or the
            arguments contradict it (`use_bias`, `use_scale`, `axis`).
    """
    values = _read_flax(variables, "variables")
    input_rank = check.integer("input_rank", input_rank, minimum=2,
                               allow_none=True)
    flax = {k: layer_kwargs.pop(k) for k in _FLAX_ATTRIBUTES
            if k in layer_kwargs}
    settings = {
        "axis": flax.get("axis", _FLAX_DEFAULTS["axis"]),
        "momentum": flax.get("momentum", _FLAX_DEFAULTS["momentum"]),
        "epsilon": flax.get("epsilon", _FLAX_DEFAULTS["epsilon"]),
        "center": values["bias"] is not None,
        "scale": values["scale"] is not None,
    }
    if isinstance(settings["axis"], tuple):
        settings["axis"] = list(settings["axis"])
    for flax_name, key in (("use_bias", "center"), ("use_scale", "scale")):
        if flax_name in flax and bool(flax[flax_name]) != settings[key]:
            present = "has" if settings[key] else "has no"
            param = "bias" if key == "center" else "scale"
            raise ValueError(
                f"`{flax_name}={flax[flax_name]!r}` contradicts `variables`, "
                f"which {present} params[{param!r}].")
    if flax.get("use_running_average"):
        settings["trainable"] = False
    kwargs = _merge(settings, layer_kwargs, "`variables`")
    layer = BatchNormalization(**kwargs)
    _build(layer, input_rank or _DEFAULT_RANK, values["mean"].shape)
    _assign_all([(layer, _values_for(layer, {
        "gamma": values["scale"], "beta": values["bias"],
        "moving_mean": values["mean"], "moving_variance": values["var"],
    }, "`variables`"))])
    return layer


def to_flax(layer) -> tuple[dict, dict]:
    """The variables and attributes of an equal Flax `BatchNorm`.

    The reverse of `from_flax`: `flax.linen.BatchNorm(**attributes)
    .apply(variables, x)` computes what the layer computes (with the
    attributes' `use_running_average`, or that of the call).

    Args:
        layer: A built `keras_bn.BatchNormalization` or
            `keras.layers.BatchNormalization`.

    Returns:
        `(variables, attributes)`: `variables` is
        `{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}`
        as NumPy arrays (`params` only holds what the layer has, and is
        absent without scale and offset, as in Flax); `attributes` holds
        `momentum`, `epsilon`, `axis` (a tuple for several axes),
        `use_bias`, `use_scale` and `use_running_average` (True for a
        layer that is not trainable, else None: given at call time).

    Raises:
        TypeError: If `layer` is not a batch-norm layer.
        ValueError: If `layer` is not built, or has an option Flax's
            module cannot express: `momentum=None`, the unbiased moving
            variance, Batch Renormalization or ghost batches.
    """
    _check_layer(layer, "layer")
    target = "flax.linen.BatchNorm"
    if layer.momentum is None:
        _refuse(layer, "momentum=None", target,
                "Flax has no cumulative average.")
    if getattr(layer, "moving_variance_estimator", "biased") != "biased":
        _refuse(layer, "moving_variance_estimator="
                f"{layer.moving_variance_estimator!r}", target,
                "Flax updates the running variance with the biased one.")
    _refuse_keras_bn_only(layer, target, "Flax")
    weights = _weights(layer)
    params = {}
    if layer.scale:
        params["scale"] = weights["gamma"]
    if layer.center:
        params["bias"] = weights["beta"]
    variables = {"batch_stats": {"mean": weights["moving_mean"],
                                 "var": weights["moving_variance"]}}
    if params:
        variables["params"] = params
    axis = layer.axis
    attributes = {
        "momentum": layer.momentum,
        "epsilon": layer.epsilon,
        "axis": tuple(axis) if isinstance(axis, (list, tuple)) else axis,
        "use_bias": bool(layer.center),
        "use_scale": bool(layer.scale),
        "use_running_average": None if layer.trainable else True,
    }
    return variables, attributes


# -------------------------------------------------------------- whole models


@dataclasses.dataclass
class LoadReport:
    """What `load_torch` did.

    Attributes:
        loaded: `(Keras layer name, torch module name)` pairs, in the order
            they were loaded (the Keras model's layer order); the name is
            `named_modules()`'s, `""` for `torch_module` itself.
        skipped: Keras batch-norm layers that `mapping` maps to None,
            whose weights were left as they were.
        settings: `{Keras layer name: {argument: (old, new)}}` for every
            argument `load_torch` changed to the torch module's rules
            (`epsilon`, `momentum`, `moving_variance_estimator`).
        notes: What could not be matched exactly, e.g. a
            `keras.layers.BatchNormalization`, which updates the moving
            variance by Keras's rule, not torch's.
    """

    loaded: list[tuple[str, str]]
    skipped: list[str]
    settings: dict[str, dict[str, tuple]]
    notes: list[str]

    def __str__(self) -> str:
        lines = [f"load_torch: {len(self.loaded)} batch-norm layer(s) "
                 "loaded"]
        width = max((len(k) for k, _ in self.loaded), default=0)
        for keras_name, torch_name in self.loaded:
            changed = ", ".join(
                f"{k} {old!r} -> {new!r}"
                for k, (old, new) in self.settings.get(keras_name, {}).items())
            lines.append(f"  {keras_name:<{width}} <- "
                         f"{torch_name or '(torch_module itself)'}"
                         + (f"  ({changed})" if changed else ""))
        if self.skipped:
            lines.append(f"  not loaded (mapping=None): "
                         f"{', '.join(self.skipped)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _torch_bn_modules(module) -> list[tuple[str, object]]:
    classes = _torch_bn_classes()
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, classes)]


def load_torch(keras_model: keras.layers.Layer, torch_module,
               mapping: dict[str, str | None] | None = None) -> LoadReport:
    """Loads every batch-norm layer of a Keras model from a torch module.

    Each `keras_bn.BatchNormalization` and `keras.layers.BatchNormalization`
    of `keras_model` (nested models and layers included) gets the weights
    of one batch-norm module of `torch_module`: `weight`, `bias`,
    `running_mean`, `running_var` become `gamma`, `beta`, `moving_mean`,
    `moving_variance` (the same vectors whatever the data format), and the
    layer's `epsilon` and `momentum` are set to the module's (converted:
    `1 - momentum`), as is PyTorch's variance rule
    (`moving_variance_estimator="unbiased"`) on keras_bn layers. A Keras
    layer cannot become a cumulative average after it is built: a module
    with `momentum=None` needs a keras_bn layer built with
    `momentum=None` (and loads its `num_batches_tracked`).

    Without `mapping`, the two are paired in order: the Keras model's
    batch-norm layers in its layer order (`model.layers`, recursively:
    the order the layers were created and tracked, which for functional
    and Sequential models is the order they are called), with the torch
    module's batch-norm modules in `named_modules()` order (the order
    they were assigned in `__init__`). Where either order differs from
    the order of the forward pass (modules defined in another order than
    called, branches), pass `mapping`; shapes catch most mistakes, but
    not two layers of the same width swapped.

    Everything is checked before anything is assigned: on an error no
    weight of `keras_model` changes. Setting `epsilon` and `momentum` also
    discards `keras_model`'s compiled train/test/predict functions (as
    `compile` does), which held the old values; a model that contains
    `keras_model` must be recompiled by hand.

    Args:
        keras_model: A built Keras model or layer.
        torch_module: A `torch.nn.Module` (a batch-norm module itself, or
            a model containing them).
        mapping: Optional `{Keras layer name: torch module name}` (names as
            in `named_modules()`, e.g. `"features.1"`), naming every
            batch-norm layer of `keras_model`; None as a value leaves that
            layer as it is.

    Returns:
        A `LoadReport` of what went where and which settings changed
        (`print(report)` lists it).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If the numbers of batch-norm layers and modules differ
            (without `mapping`), `mapping` names unknown or ambiguous
            layers or modules or misses a layer, a module has
            `track_running_stats=False` or `momentum=None` (for a layer
            that is not a cumulative average), a layer is not built, or
            shapes or `center`/`scale` differ.
    """
    import torch

    check.keras_layer("keras_model", keras_model)
    if not isinstance(torch_module, torch.nn.Module):
        raise TypeError(
            "`torch_module` must be a torch.nn.Module. Received: "
            f"torch_module={check.describe(torch_module)}")
    mapping = check.name_mapping("mapping", mapping)
    layers = [layer for layer in _compat.flatten_layers(keras_model)
              if isinstance(layer, _BN_TYPES)]
    modules = _torch_bn_modules(torch_module)
    if not layers:
        raise ValueError("`keras_model` has no batch-norm layer (keras_bn."
                         "BatchNormalization or keras.layers."
                         f"BatchNormalization). Received: keras_model="
                         f"{keras_model.name!r}")
    pairs, skipped = _pair(layers, modules, mapping, keras_model.name)
    plan, settings, notes = [], {}, []
    for layer, (module_name, module) in pairs:
        label = "torch_module" + (f".{module_name}" if module_name else "")
        if not layer.built:
            raise ValueError(f"The Keras layer {layer.name!r} is not built; "
                             "build keras_model (call it, or give it an "
                             "Input) first.")
        spec = _read_torch(module, label)
        new = {"epsilon": spec.eps,
               "momentum": None if spec.momentum is None else _complement(
                   spec.momentum)}
        if (new["momentum"] is None) != (layer.momentum is None):
            raise ValueError(
                f"{label} has momentum={spec.momentum!r} but the Keras layer "
                f"{layer.name!r} has momentum={layer.momentum!r}: a "
                "cumulative average (momentum=None) keeps a "
                "num_batches_tracked weight, so it must be chosen when the "
                "layer is built.")
        if isinstance(layer, BatchNormalization):
            new["moving_variance_estimator"] = "unbiased"
        else:
            notes.append(
                f"{layer.name!r} is a keras.layers.BatchNormalization, which "
                "updates the moving variance with the biased batch variance; "
                "inference is the same, but for PyTorch's training rule "
                "convert the model with keras_bn.convert first.")
        values = {"gamma": spec.weight, "beta": spec.bias,
                  "moving_mean": spec.running_mean,
                  "moving_variance": spec.running_var}
        if spec.momentum is None:
            values["num_batches_tracked"] = np.asarray(
                spec.num_batches_tracked or 0)
        plan.append((layer, _values_for(layer, values, label)))
        changed = {k: (getattr(layer, k), v) for k, v in new.items()
                   if getattr(layer, k, None) != v}
        settings[layer] = changed
    _assign_all(plan)
    for layer, changed in settings.items():
        for key, (_, value) in changed.items():
            setattr(layer, key, value)
    if any(settings.values()) and isinstance(keras_model, keras.Model):
        # Traced with the old epsilon/momentum as constants; as compile().
        keras_model.train_function = None
        keras_model.test_function = None
        keras_model.predict_function = None
    return LoadReport(
        loaded=[(layer.name, name) for layer, (name, _) in pairs],
        skipped=skipped,
        settings={layer.name: changed for layer, changed in settings.items()
                  if changed},
        notes=notes)


def _pair(layers, modules, mapping, model_name):
    """`([(layer, (module name, module))], skipped layer names)`."""
    if mapping is None:
        if len(layers) != len(modules):
            raise ValueError(
                f"keras_model {model_name!r} has {len(layers)} batch-norm "
                f"layer(s) {[layer.name for layer in layers]}, torch_module "
                f"has {len(modules)} batch-norm module(s) "
                f"{[name for name, _ in modules]}; pass `mapping` to pair "
                "them by name.")
        return list(zip(layers, modules)), []
    names = [layer.name for layer in layers]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"keras_model has several batch-norm layers named "
                         f"{repeated}, which `mapping` cannot tell apart.")
    by_name = dict(zip(names, layers))
    by_module = dict(modules)
    unknown = sorted(set(mapping) - set(by_name))
    missing = [n for n in names if n not in mapping]
    bad = sorted(v for v in mapping.values()
                 if v is not None and v not in by_module)
    if unknown or missing or bad:
        raise ValueError(
            "`mapping` must map every batch-norm layer of keras_model to a "
            "batch-norm module of torch_module (or None). "
            + (f"Not batch-norm layers of keras_model: {unknown}. "
               if unknown else "")
            + (f"Missing layers: {missing}. " if missing else "")
            + (f"Not batch-norm modules of torch_module: {bad}. "
               if bad else "")
            + f"Layers: {names}; modules: {list(by_module)}")
    pairs = [(by_name[n], (mapping[n], by_module[mapping[n]])) for n in names
             if mapping[n] is not None]
    return pairs, [n for n in names if mapping[n] is None]
