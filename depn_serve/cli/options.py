"""What the commands share: options whose default and help come from a settings model (one source of defaults),
and the common path options."""

from __future__ import annotations

from pathlib import Path

import click
from pydantic import BaseModel


def setting(model: type[BaseModel], field: str, flag: str | None = None, **kwargs):
    """A click option for `model.<field>`: same default, help from the field's description; the parameter keeps
    the field's name, so `model(**{name: value})` takes it as is."""
    info = model.model_fields[field]
    kwargs.setdefault("help", info.description)
    return click.option(flag or f"--{field.replace('_', '-')}", field, default=info.default, show_default=True,
                        **kwargs)


def settings_from(model: type[BaseModel], values: dict) -> BaseModel:
    """`model` built from the command's parameters that are its fields."""
    return model(**{k: v for k, v in values.items() if k in model.model_fields})


def existing_file(flag: str, name: str, **kwargs):
    return click.option(flag, name, type=click.Path(path_type=Path, exists=True, dir_okay=False), **kwargs)


def model_dir_option(**kwargs):
    return click.option("--model", "model_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
                        **kwargs)


def out_file(**kwargs):
    return click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), **kwargs)


def ray_option():
    return click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
                        help="run the jobs on a Ray cluster (ADDRESS as for ray.init, e.g. ray://head:10001; `local` "
                             "starts one on this machine); every node must see the input paths. Same results.")
