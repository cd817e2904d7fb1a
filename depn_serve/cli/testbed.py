"""`depn testbed build`: the built-in memorizing test-bed."""

from __future__ import annotations

from pathlib import Path

import click

from depn_serve.core.console import console
from depn_serve.testbed.profiles import PROFILES


@click.group()
def testbed() -> None:
    """The built-in memorizing test-bed."""


@testbed.command("build")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--profile", type=click.Choice(list(PROFILES)), default="ci", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoints", default=0, show_default=True,
              help="also save N-1 evenly spaced training checkpoints under OUT/checkpoints/ (for `depn study training`)")
def build(out: Path, profile: str, seed: int, checkpoints: int) -> None:
    """Build a small Llama that has memorized private records injected into synthetic e-mail."""
    from depn_serve.testbed import build_testbed

    info = build_testbed(out, profile, seed, progress=True, checkpoints=checkpoints)
    console.print_json(info.model_dump_json())


COMMANDS = [testbed]
