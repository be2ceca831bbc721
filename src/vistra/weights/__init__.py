"""Weights: vistra's own checkpoint files and, per source, converters of third-party ones."""

from .convert import convert_checkpoint
from .load import LoadReport, load_pretrained, read_pretrained
from .vistra_file import load_checkpoint, read_metadata, save_checkpoint, save_explain_choice

__all__ = ["LoadReport", "convert_checkpoint", "load_checkpoint", "load_pretrained",
           "read_metadata", "read_pretrained", "save_checkpoint", "save_explain_choice"]
