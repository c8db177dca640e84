"""Datasets in the paper's released JSONL layout: record types, loader, hub access."""

from rtteval.data.hub import resolve_dataset_path
from rtteval.data.loader import check_summary, load_dataset
from rtteval.data.types import MCQ, Dataset, Passage

__all__ = ["MCQ", "Dataset", "Passage", "check_summary", "load_dataset", "resolve_dataset_path"]
