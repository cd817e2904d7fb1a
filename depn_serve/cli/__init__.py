"""The `depn` command line: one module per command group, each a thin layer over library functions."""

from depn_serve.cli.main import main

__all__ = ["main"]
