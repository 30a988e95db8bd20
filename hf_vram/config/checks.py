"""Validators for config settings: each takes a value and returns it (normalised where the saved form differs),
or raises ``Invalid`` with what is allowed. A section runs them over its fields and names the field in the error."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], Any]


_WHOLE = object()


class Invalid(Exception):
    """A value a setting does not allow; ``allowed`` says what it does. ``key``/``value``: the offending entry of a
    mapping (``layer_schemes['x']``), when it is one entry rather than the whole value."""

    def __init__(self, allowed: str, key: str = "", value: Any = _WHOLE) -> None:
        super().__init__(allowed)
        self.allowed, self.key, self.value = allowed, key, value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def choice(*options: Any, text: str = "") -> Check:
    """One of ``options`` (a bool never passes for an int option); ``text`` words the allowed values."""

    def check(value: Any) -> Any:
        if value not in options or (isinstance(value, bool) and not any(isinstance(o, bool) for o in options)):
            raise Invalid(text or "one of " + ", ".join(repr(o) for o in options))
        return value

    return check


def subset(*options: str) -> Check:
    """A non-empty list (or tuple) of distinct ``options``; kept as a list (what JSON gives back), so a saved config
    compares equal to the one it came from; a default may be a tuple."""

    def check(value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or not value or len(set(value)) != len(value):
            raise Invalid("a non-empty list of distinct values from " + ", ".join(map(repr, options)))
        for item in value:
            if item not in options:
                raise Invalid("one of " + ", ".join(map(repr, options)), value=item)
        return list(value)

    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("true or false")
    return value


def integer(value: Any) -> int:
    if not _is_int(value):
        raise Invalid("an integer")
    return value


def at_least(low: int, *, optional: bool = False) -> Check:
    """An integer ``>= low`` (``optional``: or None)."""

    def check(value: Any) -> Any:
        if value is None and optional:
            return value
        if not _is_int(value) or value < low:
            text = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise Invalid(text + (" or null" if optional else ""))
        return value

    return check


positive_int = at_least(1)


def number(low: float, high: float, *, low_open: bool = False, high_open: bool = False, example: str = "") -> Check:
    """A finite number in the interval (``inf`` for an unbounded side)."""

    def check(value: Any) -> Any:
        ok = _is_number(value) and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open else value <= high)
        if not ok:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            text = f"a number > {low:g}" if high == math.inf else f"a number in {left}{low:g}, {high:g}{right}"
            raise Invalid(text + (f", e.g. {example}" if example else ""))
        return value

    return check


ratio = number(0.0, 1.0, high_open=True)
weight = number(0.0, 1.0)


def ratio_or_per_layer(value: Any) -> Any:
    """A ratio in [0, 1) for every layer, or ``{layer index: ratio}`` (keys stored as strings, as config.json does)."""
    if isinstance(value, dict):
        out = {}
        for layer, r in value.items():
            if not _is_int(layer) and not (isinstance(layer, str) and layer.isdigit()):
                raise Invalid("a mapping of layer index (integer) to ratio")
            try:
                out[str(layer)] = ratio(r)
            except Invalid as err:
                raise Invalid(err.allowed, key=f"[{layer}]", value=r) from None
        return out
    return ratio(value)


def layer_indices_or_count(value: Any) -> Any:
    """None, a count of layers (an integer >= 1, for hf_vram to choose), or a non-empty list of distinct layer
    indices (integers >= 0), kept sorted."""
    if value is None or (_is_int(value) and value >= 1):
        return value
    if not isinstance(value, (list, tuple)) or not value or not all(_is_int(i) and i >= 0 for i in value):
        raise Invalid("null, a count of layers (an integer >= 1), or a non-empty list of layer indices (integers >= 0)")
    if len(set(value)) != len(value):
        raise Invalid("a list of distinct layer indices")
    return sorted(value)


def names(value: Any) -> Any:
    """None or a list of non-empty strings."""
    if value is not None and (not isinstance(value, list) or not all(isinstance(n, str) and n for n in value)):
        raise Invalid("null or a list of non-empty module names")
    return value


def patterns(value: Any) -> Any:
    """None or a list of module names, dotted suffixes or regular expressions."""
    if value is None:
        return value
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise Invalid("a list of non-empty module names, suffixes or regexes")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            raise Invalid(f"a valid regular expression ({err})", value=pattern) from None
    return value


def scheme_map(schemes: tuple[str, ...]) -> Check:
    """None or ``{exact module name: scheme}``."""

    def check(value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
            raise Invalid("a mapping {module name: scheme}")
        for name, scheme in value.items():
            if scheme not in schemes:
                raise Invalid("one of " + ", ".join(map(repr, schemes)), key=f"[{name!r}]", value=scheme)
        return value

    return check


def mapping(value: Any) -> Any:
    if value is not None and not isinstance(value, dict):
        raise Invalid("null or a mapping")
    return value


_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: Any, what: str = "planner.target_memory") -> int:
    """``"1.5GB"``/``"600MiB"``/``"64 MB"``/an int of bytes -> bytes (GB = 10^9, GiB = 2^30)."""
    if _is_int(value) and value > 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b)\s*", value.lower())
        if match and float(match.group(1)) > 0:
            return int(float(match.group(1)) * _UNITS[match.group(2)])
    raise ValueError(
        f"hf_vram config: {what}={value!r} is invalid; allowed: a positive byte count or a size such as '1.5GB', "
        "'600MiB' or '64 MB'."
    )


def byte_size(value: Any) -> Any:
    """None, or a size parsed to bytes (``parse_bytes``)."""
    if value is None:
        return value
    try:
        return parse_bytes(value)
    except ValueError:
        raise Invalid("a positive byte count or a size such as '1.5GB', '600MiB' or '64 MB'") from None
