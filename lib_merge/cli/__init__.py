"""The command line: ``python -m lib_merge`` (``main``) and its recipe commands (``recipes``)."""

from .main import main

__all__ = ["main"]
