"""The command line, one module per command group; ``main`` is the console entry point."""

from rtteval.cli.main import app, main

__all__ = ["app", "main"]
