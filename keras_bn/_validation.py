"""Argument checks shared by every public entry point.

Each check raises early, with a message that names the argument and the
value received: `TypeError` for a value of the wrong type, `ValueError`
for a value of the right type outside its range. Each returns the value
normalized (a Python `float`, `int`, list or dict), so callers store what
the check returns.
"""

from __future__ import annotations

import math
import numbers

CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def describe(value) -> str:
    """`value` as it appears in an error message, with its type."""
    return f"{value!r} (of type {type(value).__name__})"


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def unit_interval(name: str, value, allow_none: bool = False
                  ) -> float | None:
    """A float in `[0, 1]` (momentum), or None where `allow_none`."""
    if value is None and allow_none:
        return None
    what = "a float in [0, 1]" + (" or None" if allow_none else "")
    if not _is_real(value):
        raise TypeError(f"`{name}` must be {what}. Received: "
                        f"{name}={describe(value)}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be {what}. Received: "
                         f"{name}={value!r}")
    return float(value)


def positive_float(name: str, value) -> float:
    """A positive, finite float (epsilon)."""
    if not _is_real(value):
        raise TypeError(f"`{name}` must be a positive float. Received: "
                        f"{name}={describe(value)}")
    if not (float(value) > 0 and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a positive finite float. "
                         f"Received: {name}={value!r}")
    return float(value)


def integer(name: str, value, minimum: int = 1,
            allow_none: bool = False) -> int | None:
    """An int `>= minimum`, or None where `allow_none`."""
    if value is None and allow_none:
        return None
    what = f"an int >= {minimum}" + (" or None" if allow_none else "")
    if not _is_int(value):
        raise TypeError(f"`{name}` must be {what}. Received: "
                        f"{name}={describe(value)}")
    if value < minimum:
        raise ValueError(f"`{name}` must be {what}. Received: "
                         f"{name}={value!r}")
    return int(value)


def choice(name: str, value, choices):
    """One of `choices`."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}. "
                         f"Received: {name}={value!r}")
    return value


def keras_layer(name: str, value):
    """A Keras model or layer (what the model-level tools take)."""
    import keras

    if not isinstance(value, keras.layers.Layer):
        raise TypeError(f"`{name}` must be a Keras model or layer. "
                        f"Received: {name}={describe(value)}")
    return value


def boolean(name: str, value) -> bool:
    """True or False (not 0/1: a truthy value may be a mistake)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False. Received: "
                        f"{name}={describe(value)}")
    return value


def optional_bool(name: str, value) -> bool | None:
    """None, True or False (not 0/1: a truthy value may be a mistake)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"`{name}` must be None, True or False. Received: "
                        f"{name}={describe(value)}")
    return value


def name_mapping(name: str, value) -> dict[str, str | None] | None:
    """None, or a dict of str keys to str (or None) values (layer names)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"`{name}` must be a dict of names (str to str or "
                        f"None). Received: {name}={describe(value)}")
    for key, target in value.items():
        if not isinstance(key, str) or not (target is None
                                            or isinstance(target, str)):
            raise TypeError(f"`{name}` must map str to str or None. "
                            f"Received: {name}[{key!r}]={describe(target)}")
    return dict(value)


def axis(value) -> int | list[int]:
    """An int, or a non-empty list of distinct ints (feature axes)."""
    if _is_int(value):
        return int(value)
    if isinstance(value, (list, tuple)) and value and all(
        _is_int(a) for a in value
    ):
        if len(set(value)) != len(value):
            raise ValueError(f"`axis` has repeated entries. Received: "
                             f"axis={list(value)!r}")
        return [int(a) for a in value]
    raise TypeError(f"`axis` must be an int or a non-empty list of ints. "
                    f"Received: axis={describe(value)}")


def renorm_clipping(value) -> dict | None:
    """None, or a dict with keys among `CLIPPING_KEYS` and sane bounds."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"`renorm_clipping` must be a dict with keys among "
                        f"{CLIPPING_KEYS}. Received: renorm_clipping="
                        f"{describe(value)}")
    unknown = sorted(set(value) - set(CLIPPING_KEYS))
    if unknown:
        raise ValueError(f"`renorm_clipping` has unknown keys {unknown}; "
                         f"supported keys are {list(CLIPPING_KEYS)}. "
                         f"Received: renorm_clipping={value!r}")
    clipping = {}
    for key, bound in value.items():
        if bound is None:
            continue
        if not _is_real(bound):
            raise TypeError(f"`renorm_clipping['{key}']` must be a number. "
                            f"Received: {describe(bound)}")
        clipping[key] = float(bound)
    rmin, rmax = clipping.get("rmin"), clipping.get("rmax")
    if rmin is not None and rmax is not None and rmax < rmin:
        raise ValueError(f"`renorm_clipping` needs rmax >= rmin. Received: "
                         f"rmax={rmax}, rmin={rmin}")
    if clipping.get("dmax", 0.0) < 0:
        raise ValueError(f"`renorm_clipping` needs dmax >= 0. Received: "
                         f"dmax={clipping['dmax']}")
    return clipping
