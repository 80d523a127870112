"""The context -> completion data pipeline: parse, tokenize (cached), truncate, mask, batch."""
from .batch import Batch
from .config import DataConfig, FileSpec, parse_file_spec
from .examples import TokenizedExamples
from .loader import BatchLoader
from .prepare import PreparedData, format_report, prepare_data
from .truncate import truncate

__all__ = ["Batch", "BatchLoader", "DataConfig", "FileSpec", "PreparedData", "TokenizedExamples",
           "format_report", "parse_file_spec", "prepare_data", "truncate"]
