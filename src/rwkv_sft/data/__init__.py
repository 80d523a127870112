"""The context -> completion data pipeline: parse, tokenize (cached), truncate, mask, batch."""
import importlib

from .config import DataConfig, FileSpec, parse_file_spec
from .truncate import truncate  # eager: the function shadows its module's name

# The rest needs torch: imported on first use.
_LAZY = {"Batch": ".batch", "TokenizedExamples": ".examples", "BatchLoader": ".loader", "PreparedData": ".prepare",
         "format_report": ".prepare", "prepare_data": ".prepare"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Batch", "BatchLoader", "DataConfig", "FileSpec", "PreparedData", "TokenizedExamples",
           "format_report", "parse_file_spec", "prepare_data", "truncate"]
