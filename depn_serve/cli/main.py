"""The `depn` group and the one place where the project's errors become command-line errors."""

from __future__ import annotations

import click
from pydantic import ValidationError

from depn_serve.core.errors import DepnError, one_line


class DepnGroup(click.Group):
    """Bad input anywhere below (a `DepnError`, or settings pydantic refused) ends the command with its one-line
    message and exit status 1; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DepnError as exc:
            raise click.ClickException(str(exc)) from exc
        except ValidationError as exc:
            raise click.ClickException(one_line(exc, f"{exc.title} settings")) from exc


@click.group(cls=DepnGroup)
@click.version_option(package_name="depn-serve")
def main() -> None:
    """DEPN: detect and edit privacy neurons, and serve per-tenant masks."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _register() -> None:
    from depn_serve.cli import (aggregate, bench, demo, detect, evaluate, isolate, masks, serve, study, tenants,
                                testbed)

    for module in (testbed, detect, aggregate, isolate, masks, evaluate, serve, tenants, demo, study, bench):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
