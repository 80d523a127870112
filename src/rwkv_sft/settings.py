"""Each setting's type, once: the choice lists as `Literal` types, the numeric ranges as
`Annotated[..., Range]`, and the checks that read them.

TrainConfig and DataConfig annotate their fields with these types; the commands' flags take their
`choices` from them (`one_of`), a config file's or a command line's values are checked against
them (`coerce_fields`), and so is a config built in Python (`check_fields`). A field whose type
`coerce` does not know is a programming error (TypeError), never accepted unchecked. Nothing here
imports torch: every command's `--help` and argument errors stay instant.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Annotated, Literal, Union

from .errors import UserError

Dtype = Literal["bf16", "fp32"]                          # weights in memory / compute
Quantized = Literal["int8", "nf4"]                       # a frozen base stored quantized (adapters/quant.py)
Precision = Literal["auto", Dtype]                       # auto: bf16 autocast on a GPU that has it, else fp32
BaseDtype = Literal["auto", Dtype, Quantized]            # a PEFT run's frozen weights (auto: as the checkpoint)
Schedule = Literal["cosine", "linear", "constant"]
Parallel = Literal["ddp", "fsdp"]
Offload = Literal["cpu"]
Objective = Literal["sft", "dpo", "orpo", "simpo"]
LoraInit = Literal["lora", "pissa"]
WkvBackend = Literal["auto", "chunked", "reference", "cuda", "fla"]
ExportFormat = Literal["pth", "safetensors", "hf"]
ReportTo = Literal["tensorboard", "wandb", "none"]
DataFormat = Literal["auto", "completion", "alpaca", "chat", "text"]


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric setting takes: low <= value (< when open_low), value <= high (<
    when open_high); `why` is said after the bounds."""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    why: str = ""

    def check(self, name: str, value) -> None:
        if value is None:
            return
        if not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}")
        ok = ((self.low is None or (value > self.low if self.open_low else value >= self.low)) and
              (self.high is None or (value < self.high if self.open_high else value <= self.high)))
        if not ok:
            raise UserError(f"{name} must be {self}, got {value}{f' ({self.why})' if self.why else ''}")

    def __str__(self) -> str:
        if self.high is None:
            if (self.low, self.open_low) == (0, True):
                return "positive"
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        high = "2**63" if self.high == 2**63 else f"{self.high:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {high}{')' if self.open_high else ']'}"


Positive = Annotated[float, Range(0, open_low=True)]
NonNegative = Annotated[float, Range(0)]
Count = Annotated[int, Range(1)]                            # at least one
NonNegativeInt = Annotated[int, Range(0)]
Fraction = Annotated[float, Range(0, 1, open_high=True)]    # [0, 1)
Seed = Annotated[int, Range(0, 2**63, open_high=True)]
ExampleLength = Annotated[int, Range(2, why="one context and one completion token")]
WarmupRatio = Annotated[float, Range(0, 0.5, why="warmup takes at most half the run")]
LoraRank = Annotated[int, Range(1)]
LoraAlpha = Positive                                        # scale alpha / rank
LoraDropout = Fraction

_NONE = type(None)


def choices(kind) -> tuple:
    """The values of a Literal type, also inside `X | None` or `list[X]` (for argparse's choices)."""
    if typing.get_origin(kind) is Literal:
        return typing.get_args(kind)
    found = [c for arg in typing.get_args(kind) for c in choices(arg)]
    return tuple(found)


def field_types(cls) -> dict[str, object]:
    """A dataclass's fields and their types (resolved, not the annotations' strings), ranges included."""
    return typing.get_type_hints(cls, include_extras=True)


def _range(kind) -> Range | None:
    """The Range of an `Annotated[..., Range]` type, also inside `X | None`."""
    if typing.get_origin(kind) is Annotated:
        return next((m for m in kind.__metadata__ if isinstance(m, Range)), None)
    return next((r for r in map(_range, typing.get_args(kind)) if r is not None), None)


def check_value(name: str, kind, value) -> None:
    """One value against its type's choices and range (a value built in Python, not read from text)."""
    allowed = choices(kind)
    if allowed:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item not in allowed and not (item is None and _NONE in typing.get_args(kind)):
                raise UserError(f"{name}: expected one of {', '.join(allowed)}, got {item!r}")
    bounds = _range(kind)
    if bounds is not None:
        bounds.check(name, value)


def one_of(cls, name: str) -> tuple:
    """The choices of the setting `name` of the dataclass `cls` (for a flag's `choices=`)."""
    found = choices(field_types(cls)[name])
    if not found:
        raise TypeError(f"{cls.__name__}.{name} is not a choice among values")
    return found


def spell(kind) -> str:
    """A type as the messages name it: "float | None", "list[str]", "one of cosine, linear, constant"."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is _NONE:
        return "None"
    if origin is Annotated:
        return spell(args[0])
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " | ".join(spell(a) for a in args)
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(spell(a) for a in args)}]"
    return getattr(kind, "__name__", str(kind))


def coerce(value, kind, where: str, shown: str | None = None):
    """`value` (from a file or a command line) as a setting of type `kind` takes it, or a one-line
    UserError naming `where`.

    Numbers must be finite. A numeric setting also takes a string that spells a number: YAML 1.1
    reads `lr: 1e-4` as a string (it wants `1.0e-4`), and TOML or --set would give the number.
    An int takes a whole float (`max_steps: 1e4`), a float an int; a list takes one value. A
    number must lie in its type's Range."""
    shown = shown or spell(kind)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Annotated:
        value = coerce(value, args[0], where, shown)
        bounds = _range(kind)
        if bounds is not None:
            bounds.check(where, value)
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not _NONE]
        if value is None and len(options) < len(args):
            return None
        if len(options) != 1:
            raise TypeError(f"{where}: no check for a setting of type {shown}")
        return coerce(value, options[0], where, shown)
    if origin is Literal:
        if isinstance(value, bool) or value not in args:
            raise UserError(f"{where}: expected {spell(kind)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]  # a single file name where a list is expected
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected {shown}, got {value!r}")
        return [coerce(v, args[0], where) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected {shown}, got {value!r}")
        if len(value) != len(args):
            raise UserError(f"{where}: expected {len(args)} values ({shown}), got {len(value)}")
        return tuple(coerce(v, a, where) for v, a in zip(value, args))
    if kind in (int, float):
        return _number(value, kind, where, shown)
    if kind in (bool, str, dict):
        if not isinstance(value, kind):
            raise UserError(f"{where}: expected {shown}, got {value!r}")
        return value
    raise TypeError(f"{where}: no check for a setting of type {shown}")


def _number(value, kind, where: str, shown: str):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{where}: expected {shown}, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip().replace("_", ""))
        except ValueError:
            raise UserError(f"{where}: expected {shown}, got {value!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{where}: expected a finite number, got {value}")
    if kind is int and isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"{where}: expected a whole number, got {value:g}")
        return int(value)
    return kind(value)


def check_keys(d: dict, cls, where: str) -> None:
    """Every key of `d` is a setting of `cls`; an unknown one is an error with the closest name."""
    import difflib
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{where}: unknown setting {key!r}{hint}")


def coerce_fields(d: dict, cls, source: str, table: str = "") -> dict:
    """A mapping of `cls`'s settings (unknown keys refused), each value checked against its type;
    errors name the file and the setting ("run.yaml: data.max_len: expected int, got 'abc'")."""
    check_keys(d, cls, f"{source}: {table}" if table else source)
    kinds = field_types(cls)
    return {k: coerce(v, kinds[k], f"{source}: {table + '.' if table else ''}{k}") for k, v in d.items()}


def check_fields(obj, prefix: str = "") -> None:
    """The choice and numeric settings of a dataclass instance hold one of their values and lie in
    their range (lists: each item); errors name `prefix + field`."""
    for name, kind in field_types(type(obj)).items():
        check_value(prefix + name, kind, getattr(obj, name))


def check_lora(rank: int, alpha: float | None, dropout: float, init: str) -> None:
    """The LoRA settings, wherever they come from (a run's config, an adapter file, a Python call)."""
    for name, kind, value in (("lora_rank", LoraRank, rank), ("lora_alpha", LoraAlpha, alpha),
                              ("lora_dropout", LoraDropout, dropout), ("lora_init", LoraInit, init)):
        check_value(name, kind, value)
