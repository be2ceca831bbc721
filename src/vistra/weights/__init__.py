"""Weights: vistra's own checkpoint files and, per source, converters of third-party ones."""

from .vistra_file import load_checkpoint, read_metadata, save_checkpoint

__all__ = ["load_checkpoint", "read_metadata", "save_checkpoint"]
