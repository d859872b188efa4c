"""Each node input declared once: the declaration makes ``INPUT_TYPES``, ``VALIDATE_INPUTS`` and the apply check.

ComfyUI's queue-time validation (``execution.validate_inputs`` at the pinned commit) works per input: it
converts a widget value to its type (``int()``, ``float()``), compares it with ``min``/``max`` and checks combo
values, and each failure names that one input. Two rules of it shape this module:

- every input named in a node's ``VALIDATE_INPUTS`` signature skips those checks, and a failing
  ``VALIDATE_INPUTS`` is reported against *every* input of its signature. So the generated ``VALIDATE_INPUTS``
  names only the inputs of the node's cross-input rules (none: no ``VALIDATE_INPUTS`` at all), checks those
  inputs itself, and every other input is left to ComfyUI's per-input checks;
- ComfyUI's own checks do not see NaN (it compares false with both bounds) or a size's multiple. The ``min`` a
  declaration hands ComfyUI is therefore a ``float``/``int`` subclass whose comparison with a value also fails
  those values, so they are refused against the one input too. It serialises as the plain number.

Values that arrive through links are not seen at queue time; ``Inputs.check`` runs the same checks, total over
any Python value, when the node runs.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

COMBO = "COMBO"


class GuidanceInputError(ValueError):
    """Bad node input. The message names the node, the input and the valid range."""

    def __init__(self, node: str, input_name: str, message: str):
        super().__init__(f"{node}: input '{input_name}' {message}")
        self.node = node
        self.input_name = input_name


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) and not value.is_integer() else repr(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Input:
    """One node input. ``kind``: "FLOAT", "INT", "BOOLEAN", "STRING", a link type ("MODEL", ...) or COMBO."""

    name: str
    kind: str
    tooltip: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple[str, ...] = ()  # COMBO only
    multiple: int | None = None  # INT only: the value must be a multiple of this
    sentinel: float | None = None  # one value below ``min`` that is also valid (e.g. -1 = automatic)
    optional: bool = False
    extra: dict = field(default_factory=dict)  # other widget options, passed through ("round", "multiline")

    def requirement(self) -> str:
        """What a valid value is, as the error messages say it."""
        if self.kind == COMBO:
            return f"one of {', '.join(self.options)}"
        if self.kind in ("FLOAT", "INT"):
            noun = "a number" if self.kind == "FLOAT" else "an integer"
            if self.multiple:
                noun = f"a multiple of {self.multiple}"
            text = f"{noun} between {_number(self.min)} and {_number(self.max)}"
            return text if self.sentinel is None else f"{_number(self.sentinel)} (automatic) or {text}"
        if self.kind == "BOOLEAN":
            return "true or false"
        if self.kind == "STRING":
            return "a string"
        return f"a {self.kind}"

    def problem(self, value: Any) -> str | None:
        """None if ``value`` is valid, else why not (total over any value)."""
        kind = self.kind
        if kind == COMBO:
            ok = isinstance(value, str) and value in self.options
        elif kind in ("FLOAT", "INT"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                ok = False
            elif kind == "INT" and not (isinstance(value, int) or float(value).is_integer()):
                ok = False
            else:
                ok = self._number_ok(value)
        elif kind == "BOOLEAN":
            ok = isinstance(value, bool)
        elif kind == "STRING":
            ok = isinstance(value, str)
        else:
            return None  # a link type (MODEL, VAE, ...): ComfyUI checks the link's type
        return None if ok else f"must be {self.requirement()}, got {_shown(value)}"

    def _number_ok(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.sentinel is not None and value == self.sentinel:
            return True
        if self.multiple and int(value) % self.multiple:
            return False
        return self.min <= value <= self.max  # int vs float compares exactly, however large

    def convert(self, value: Any) -> Any:
        """The checked value in its type (float for FLOAT, int for INT, bool for BOOLEAN)."""
        if self.kind == "FLOAT":
            return float(value)
        if self.kind == "INT":
            return int(value)
        if self.kind == "BOOLEAN":
            return bool(value)
        return value

    def input_type(self, node: str) -> tuple:
        """This input's ``INPUT_TYPES`` entry (``node``: the name its bounds' messages use)."""
        options: dict[str, Any] = {}
        if self.default is not None:
            options["default"] = self.default
        if self.kind in ("FLOAT", "INT"):
            widget_min = self.min if self.sentinel is None else min(self.min, self.sentinel)
            number = float if self.kind == "FLOAT" else int
            options.update(
                min=_bound(number, widget_min, self, node, low=True),
                max=_bound(number, self.max, self, node, low=False),
            )
        if self.step is not None:
            options["step"] = self.step
        options.update(self.extra)
        options["tooltip"] = self.tooltip
        return (list(self.options) if self.kind == COMBO else self.kind, options)


class _LowBound:
    """A ``min`` that is also greater than every value its input refuses (NaN, a wrong multiple).

    ComfyUI tests ``value < min``; Python asks this subclass's ``__gt__`` first, so the refusal names the input.
    """

    def __gt__(self, other):
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return not self.input._number_ok(other) and not other > self.input.max
        return NotImplemented


class _Message:
    """ComfyUI's messages ("Value ... smaller than min of {min}") then also say what the input accepts."""

    def __format__(self, spec: str) -> str:
        return f"{self.number(self)!r}; {self.node}: input '{self.input.name}' must be {self.input.requirement()}"

    def __reduce__(self):  # copies are the plain number
        return (self.number, (self.number(self),))


_BOUND_TYPES: dict[tuple[type, bool], type] = {}


def _bound(number: type, value: float, declaration: Input, node: str, low: bool):
    key = (number, low)
    if key not in _BOUND_TYPES:
        bases = (_LowBound, _Message, number) if low else (_Message, number)
        _BOUND_TYPES[key] = type(f"{'Low' if low else 'High'}{number.__name__.title()}Bound", bases, {})
    bound = _BOUND_TYPES[key](value)
    bound.input, bound.node, bound.number = declaration, node, number
    return bound


@dataclass(frozen=True)
class Rule:
    """A cross-input rule: ``problem(**values)`` returns None or why the combination is invalid.

    ``inputs``: the inputs it reads (all are named when it fails); ``blame``: the one its message names.
    """

    inputs: tuple[str, ...]
    problem: Callable[..., str | None]
    blame: str = ""

    @property
    def named(self) -> str:
        return self.blame or self.inputs[0]


def ordered(low: str, high: str, low_label: str = "", high_label: str = "") -> Rule:
    """The rule ``low <= high`` between two number inputs."""

    def problem(**values):
        a, b = values[low], values[high]
        if a > b:
            return (
                f"must not exceed {high} (valid: {low_label or '0'} <= {low} <= {high} <= {high_label or '1'}), "
                f"got {low}={_number(a)} > {high}={_number(b)}"
            )
        return None

    return Rule((low, high), problem, low)


class Inputs:
    """The inputs of one node, in widget order, and its cross-input rules.

    ``node``: the name error messages use. ``hidden``: ComfyUI hidden inputs (``{"unique_id": "UNIQUE_ID"}``).
    """

    def __init__(
        self,
        node: str,
        inputs: Iterable[Input],
        rules: Iterable[Rule] = (),
        hidden: dict[str, str] | None = None,
    ):
        self.node = node
        self.inputs = {spec.name: spec for spec in inputs}
        self.rules = tuple(rules)
        self.hidden = dict(hidden or {})
        for rule in self.rules:
            for name in rule.inputs:
                if self.inputs[name].kind not in ("FLOAT", "INT"):
                    raise TypeError(f"{node}: rule input {name} must be a number input")

    def __getitem__(self, name: str) -> Input:
        return self.inputs[name]

    def defaults(self) -> dict[str, Any]:
        """Default of every widget input, by name."""
        return {n: spec.default for n, spec in self.inputs.items() if spec.default is not None}

    def widget_names(self) -> list[str]:
        return [n for n, spec in self.inputs.items() if spec.kind in WIDGET_KINDS]

    # -- INPUT_TYPES

    def input_types(self) -> dict:
        required, optional = {}, {}
        for spec in self.inputs.values():
            entry = spec.input_type(self.node)
            (optional if spec.optional else required)[spec.name] = entry
        types: dict[str, dict] = {"required": required}
        if optional:
            types["optional"] = optional
        if self.hidden:
            types["hidden"] = dict(self.hidden)
        return types

    # -- VALIDATE_INPUTS

    def rule_inputs(self) -> list[str]:
        names: list[str] = []
        for rule in self.rules:
            names += [n for n in rule.inputs if n not in names]
        return names

    def validate_inputs(self) -> classmethod | None:
        """A ``VALIDATE_INPUTS`` naming only the rules' inputs (None when the node has no rule).

        ComfyUI passes those inputs converted to their type, a link as None, and a value it failed to convert
        as received (it has reported that one already).
        """
        names = self.rule_inputs()
        if not names:
            return None

        def VALIDATE_INPUTS(cls, **values):
            return self.queue_check(values)

        parameters = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        parameters += [
            inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names
        ]
        VALIDATE_INPUTS.__signature__ = inspect.Signature(parameters)
        return classmethod(VALIDATE_INPUTS)

    def queue_check(self, values: dict) -> bool | str:
        """True, or the message of the first failed check of the rules' inputs and then of the rules."""
        known = {}
        for name in self.rule_inputs():
            value = values.get(name)
            if value is None:
                continue  # a link: checked when the node runs
            spec = self.inputs[name]
            try:
                value = spec.convert(value)
            except (TypeError, ValueError, OverflowError):
                continue  # ComfyUI failed to convert it and has said so
            problem = spec.problem(value)
            if problem is not None:
                return str(GuidanceInputError(self.node, name, problem))
            known[name] = value
        for rule in self.rules:
            if all(n in known for n in rule.inputs):
                problem = rule.problem(**{n: known[n] for n in rule.inputs})
                if problem is not None:
                    return str(GuidanceInputError(self.node, rule.named, problem))
        return True

    # -- when the node runs

    def check(self, **values) -> dict[str, Any]:
        """Check values as the node received them (widgets or links); returns them converted to their types.

        Raises GuidanceInputError naming the node and the input (a rule: the input its message names).
        """
        out = {}
        for name, value in values.items():
            spec = self.inputs[name]
            problem = spec.problem(value)
            if problem is not None:
                raise GuidanceInputError(self.node, name, problem)
            out[name] = spec.convert(value)
        for rule in self.rules:
            if all(n in out for n in rule.inputs):
                problem = rule.problem(**{n: out[n] for n in rule.inputs})
                if problem is not None:
                    raise GuidanceInputError(self.node, rule.named, problem)
        return out


WIDGET_KINDS = ("FLOAT", "INT", "BOOLEAN", "STRING", COMBO)


def declare(cls: type) -> type:
    """Class decorator: give a node class with an ``INPUTS`` declaration its ``INPUT_TYPES`` and
    ``VALIDATE_INPUTS``."""
    spec: Inputs = cls.INPUTS

    def INPUT_TYPES(klass):
        return spec.input_types()

    cls.INPUT_TYPES = classmethod(INPUT_TYPES)
    validate = spec.validate_inputs()
    if validate is not None:
        cls.VALIDATE_INPUTS = validate
    elif "VALIDATE_INPUTS" in cls.__dict__:
        raise TypeError(f"{cls.__name__}: VALIDATE_INPUTS comes from its INPUTS rules")
    return cls


# ----------------------------------------------------------------------------------------------------------
# Memory guard for nodes whose work grows with their size inputs

MEMORY_LIMIT_ENV = "FREE_GUIDANCE_MEMORY_LIMIT_GB"
MEMORY_NOTE = (
    f"A size whose estimated memory exceeds the device's total memory is refused before sampling (set the "
    f"environment variable {MEMORY_LIMIT_ENV} to another limit in GiB)."
)


def memory_limit(device_total: int) -> tuple[int, str]:
    """The memory a node may plan to use, in bytes, and where the number comes from.

    ``FREE_GUIDANCE_MEMORY_LIMIT_GB`` (GiB, > 0) when set, else ``device_total`` (the device's total memory).
    """
    raw = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if raw:
        try:
            gib = float(raw)
        except ValueError:
            gib = math.nan
        if not math.isfinite(gib) or gib <= 0:
            raise GuidanceInputError(
                "Free Guidance",
                MEMORY_LIMIT_ENV,
                f"(environment variable) must be a number of GiB > 0, got {raw!r}",
            )
        return int(gib * 2**30), f"{MEMORY_LIMIT_ENV}={raw}"
    return int(device_total), f"the device's total memory; set {MEMORY_LIMIT_ENV} (GiB) to change it"


def activation_bytes(base_model, shape: list[int]) -> float:
    """Bytes the diffusion model's activations need for a forward of ``shape`` (rows, channels, *spatial).

    ComfyUI's estimate for memory-efficient attention (``BaseModel.memory_required`` with xformers or flash SDPA),
    taken on every device: without those, ComfyUI splits attention into chunks to fit, so its larger estimate
    there is no floor and would refuse sizes it samples."""
    import comfy.model_management

    dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    area = shape[0] * math.prod(shape[2:])
    return area * comfy.model_management.dtype_size(dtype) * 0.01 * base_model.memory_usage_factor * 2**20


def check_memory(node: str, input_name: str, needed: float, device_total: int, what: str) -> None:
    """Refuse, before any work, a run whose estimated memory ``needed`` (bytes) exceeds the limit.

    ``what`` says what was estimated (sizes, batch); the message gives the estimate and the limit.
    """
    limit, source = memory_limit(device_total)
    if needed > limit:
        raise GuidanceInputError(
            node,
            input_name,
            f"asks for more memory than the limit: {what} needs an estimated {needed / 2**30:.1f} GiB, the limit "
            f"is {limit / 2**30:.1f} GiB ({source}). Use a smaller size or raise the limit",
        )
