"""`depn demo`: the whole story on the built-in test-bed."""

from __future__ import annotations

from pathlib import Path

import click

from depn_serve.selection import DEFAULT_METHOD, METHODS
from depn_serve.testbed.profiles import PROFILES


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=Path("runs/demo"),
              show_default=True)
@click.option("--profile", type=click.Choice(list(PROFILES)), default="ci", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tenant", default=None, help="tenant to protect (default: the first one)")
@click.option("--method", "method_name", type=click.Choice(list(METHODS)), default=DEFAULT_METHOD, show_default=True,
              help="how to choose the neurons (see `depn aggregate --help`)")
@click.option("--top-z", "top_z", type=int, default=None, help="mask size (default: the method's own)")
def demo(workdir: Path, profile: str, seed: int, tenant: str | None, method_name: str, top_z: int | None) -> None:
    """The whole story: test-bed -> detect -> select -> evaluate -> serve two tenants side by side."""
    from depn_serve.demo.story import run_demo

    run_demo(workdir, profile, seed, tenant, method_name, top_z)


COMMANDS = [demo]
