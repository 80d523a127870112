"""DataConfig and the "path", "path:weight", "path*count" file specifications."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import UserError
from ..settings import DataFormat, ExampleLength, Fraction, Seed, check_fields, coerce_fields


@dataclass
class DataConfig:
    train_files: list[str]
    eval_files: list[str] = field(default_factory=list)
    eval_fraction: Fraction = 0.0   # held-out fraction of train (deterministic by seed)
    format: DataFormat = "auto"     # chat: messages or ShareGPT
    context_field: str | None = None      # default: context / prompt / input
    completion_field: str | None = None   # default: completion / response / output
    max_len: ExampleLength = 1024   # tokens per example after truncation (incl. end marker)
    end_marker: str = "eos"         # "eos" -> token 0; any other string -> its tokens
    anchor_fraction: Fraction = 0.25
    skip_invalid: bool = False
    allow_unused_fields: bool = False  # text fields the format does not read: counted, not an error
    seed: Seed = 0

    def __post_init__(self):
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if isinstance(self.eval_files, str):
            self.eval_files = [self.eval_files]
        check_fields(self, "data.")
        if self.eval_fraction and self.eval_files:
            raise UserError("give either eval_files or eval_fraction, not both")
        if not self.end_marker:
            raise UserError("end_marker must not be empty")
        for name in ("context_field", "completion_field"):
            if getattr(self, name) == "":
                raise UserError(f"{name} must not be empty (leave it out for the default fields)")


@dataclass(frozen=True)
class FileSpec:
    path: str
    weight: float = 1.0   # examples of this file per epoch, per example (fractions sampled per epoch)


_SPEC = re.compile(r"^(?P<path>.+?)(?::(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)|\*(?P<count>[0-9]+))$")


def parse_file_spec(spec: str) -> FileSpec:
    """"data.jsonl" -> weight 1; "data.jsonl:0.5" -> weight 0.5; "data.jsonl*3" -> 3 copies per epoch.

    A path that itself ends in ":<number>" can be given as "path:1".
    """
    m = _SPEC.match(spec)
    if not m:
        return FileSpec(spec)
    weight = float(m["weight"]) if m["weight"] is not None else float(m["count"])
    if not 0 < weight < math.inf:
        raise UserError(f"{spec}: the weight or count of a file must be a positive finite number")
    return FileSpec(m["path"], weight)


def data_config_from_dict(data: dict, source: str = "config") -> DataConfig:
    """The data settings of a file or the command line; errors name `source`."""
    data = coerce_fields(data, DataConfig, source, table="data")
    if "train_files" not in data:
        raise UserError(f"{source}: no training data (give --data FILE or data.train_files)")
    try:
        return DataConfig(**data)
    except TypeError as e:
        raise UserError(f"{source}: {e}") from None
