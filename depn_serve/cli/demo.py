"""`depn demo`: the whole story on the built-in test-bed."""

from __future__ import annotations

from pathlib import Path

import click

from depn_serve.testbed.profiles import PROFILES


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=Path("runs/demo"),
              show_default=True)
@click.option("--profile", type=click.Choice(list(PROFILES)), default="ci", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--design", type=click.Choice(["fit", "union"]), default="fit", show_default=True,
              help="how the isolation masks are built (see `depn isolate --help`)")
def demo(workdir: Path, profile: str, seed: int, design: str) -> None:
    """The whole story: test-bed -> one verified isolation mask per tenant -> the cross-tenant matrix on the model
    -> the same matrix through `depn serve`, each tenant with its own API key."""
    from depn_serve.demo.story import run_demo

    run_demo(workdir, profile, seed, design)


COMMANDS = [demo]
