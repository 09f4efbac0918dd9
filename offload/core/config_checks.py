"""Checking a model's configs against sane bounds and against its weights' headers, before anything is built.

A ``config.json`` is data from the internet, and the constructors that read it allocate what it says:
``rope_max_seq_len: 1e7`` builds 2.2 GB of rotary tables, ``num_layers: 5000`` builds for 42 s before the weights
are found not to match, ``num_train_timesteps: 1e8`` allocates 4 GB at the first scheduler step. A family's
``ModelSpec.check_configs(source)`` reads each number it will build with through :class:`ConfigReader` (bounds,
types) and compares it with what the safetensors headers hold (:func:`numbered_blocks`, :func:`expect_shape`);
the registry runs it when a model is opened, so a hostile folder fails in milliseconds with the file, the field
and the fix named.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import ModelLoadError, echo


class ConfigReader:
    """The config of one component, read field by field with bounds. Errors name the file and the field."""

    def __init__(self, source: Any, component: str):
        self.source = source
        self.component = component
        self.config = source.config(component)
        path = getattr(source, "config_path", None)
        self.where = str(path(component)) if path is not None else f"{source.name}/{component} (config)"

    def fail(self, key: str, value: Any, problem: str) -> ModelLoadError:
        return ModelLoadError(
            f"{self.where}: {key}={echo(value)} {problem}. The model folder is damaged or not a model of this "
            f"kind. Fix: re-download the '{self.component}' folder."
        )

    def _present(self, key: str, default: Any, optional: bool) -> Any:
        """``key``'s value (``default`` when absent); None only when ``optional``, else a missing value fails."""
        value = self.config.get(key, default)
        if value is None and not optional:
            raise self.fail(key, value, "is missing")
        return value

    def int(self, key: str, low: int, high: int, default: int | None = None, *, optional: bool = False) -> int | None:
        """A whole number in ``[low, high]`` (``default`` when absent; with ``optional`` None is allowed too)."""
        value = self._present(key, default, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, value, f"must be a whole number from {low} to {high}")
        if not low <= value <= high:
            raise self.fail(key, value, f"must be from {low} to {high}")
        return value

    def number(self, key: str, low: float, high: float, default: float | None = None, *, optional: bool = False) -> float | None:
        value = self._present(key, default, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, value, f"must be a finite number from {low} to {high}")
        if not low <= value <= high:
            raise self.fail(key, value, f"must be from {low} to {high}")
        return float(value)

    def ints(self, key: str, low: int, high: int, length: tuple[int, int], default: Any = None) -> tuple[int, ...]:
        """A list of whole numbers, each in ``[low, high]``, of a length in ``length`` (inclusive)."""
        value = self.config.get(key, default)
        if not isinstance(value, (list, tuple)) or not length[0] <= len(value) <= length[1]:
            count = str(length[0]) if length[0] == length[1] else f"{length[0]} to {length[1]}"
            raise self.fail(key, value, f"must be a list of {count} whole numbers")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or not low <= item <= high:
                raise self.fail(key, value, f"must hold whole numbers from {low} to {high}")
        return tuple(value)

    def numbers(self, key: str, length: int, *, positive: bool = False) -> tuple[float, ...] | None:
        """An optional list of ``length`` finite numbers (per-channel statistics)."""
        value = self.config.get(key)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or len(value) != length or not all(
            not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not positive)
            for v in value
        ):
            kind = "positive" if positive else "finite"
            raise self.fail(key, value, f"must be a list of {length} {kind} numbers")
        return tuple(float(v) for v in value)

    def entries(self) -> dict[str, Any]:
        """The component's tensors as its safetensors headers describe them (name -> entry with ``shape``)."""
        entries = getattr(self.source, "tensor_entries", None)
        return entries(self.component) if entries is not None else {}

    def expect_blocks(self, key: str, value: int, prefix: str) -> None:
        """``value`` (a layer count) equals the number of ``<prefix>.<N>.`` blocks in the headers."""
        entries = self.entries()
        if not entries:
            return
        found = numbered_blocks(entries, prefix)
        if found != value:
            raise self.fail(key, value, f"does not match the weights, which hold {found} blocks ('{prefix}.N')")

    def expect_shape(self, tensor: str, axis: int, expected: int, key: str) -> None:
        """Axis ``axis`` of ``tensor``'s stored shape is ``expected`` (the config field ``key`` implies it)."""
        entry = self.entries().get(tensor)
        if entry is None:
            return  # a missing tensor is named by the full check after construction
        shape = tuple(entry.shape)
        if len(shape) <= axis or shape[axis] != expected:
            raise self.fail(key, self.config.get(key), f"does not match the weights: {tensor} has shape {shape}")


def numbered_blocks(entries: dict[str, Any], prefix: str) -> int:
    """How many distinct blocks ``<prefix>.<N>.`` the tensor names hold (0 when none)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({match.group(1) for match in map(pattern.match, entries) if match})
