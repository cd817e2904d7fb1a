"""`depn serve`: vLLM's OpenAI-compatible server with per-tenant masks."""

from __future__ import annotations

from pathlib import Path

import click

from depn_serve_patches import DEFAULT_MAX_MASK_SLOTS

from depn_serve.artifacts.criteria import Criteria
from depn_serve.cli.options import existing_file, model_dir_option

REQUIRED = ("max_rate", "min_exposure_drop", "min_keep_ratio", "max_perplexity_increase")


def _required_criteria(command):
    """`--require-<criterion>`: the server's own criteria, over the tenants file's `criteria`."""
    for name in reversed(REQUIRED):
        info = Criteria.model_fields[name]
        command = click.option(f"--require-{name.replace('_', '-')}", name, type=float, default=None,
                               help=f"certificates must demand at least this: {info.description} (default: the "
                                    f"tenants file's `criteria`, else {info.default:g})")(command)
    return command


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@model_dir_option(required=True)
@existing_file("--tenants", "tenants_path", required=True)
@click.option("--mask-store", required=True, type=click.Path(path_type=Path, file_okay=False))
@existing_file("--admin-token-file", "token_file", required=True)
@click.option("--max-mask-slots", default=DEFAULT_MAX_MASK_SLOTS, show_default=True,
              help="masks resident on the device at once (1 bit per neuron: 10,000 take 0.57 GB at the Llama-3-8B "
                   "shape)")
@click.option("--max-mask-wait", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="seconds a tenant may wait for a mask slot before the running tenants are drained for it")
@click.option("--metrics-max-tenants", default=100, show_default=True,
              help="tenants with their own Prometheus label (the rest share '_other')")
@existing_file("--metrics-token-file", "metrics_token_file",
               help="a token that may read /metrics (Prometheus' bearer token); without it only the admin token may "
                    "(the metrics name tenants)")
@click.option("--max-behind", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="seconds a tenant may be served its previous masks when this server cannot apply the store's; "
                   "then it is refused (503) until it can")
@click.option("--masks-from", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="the unquantized checkpoint a quantized --model was made from: masks made for it are served on "
                   "this copy (the configs must match apart from quantization_config)")
@click.option("--allow-unverified", is_flag=True,
              help="serve masks without a passing verification certificate that meets the server's criteria (logged, "
                   "and counted in the metric depn_unverified_masks_in_use); by default such a mask is refused")
@_required_criteria
@click.pass_context
def serve(ctx: click.Context, model_dir: Path, tenants_path: Path, mask_store: Path, token_file: Path,
          max_mask_slots: int, max_mask_wait: float, metrics_max_tenants: int, metrics_token_file: Path | None,
          max_behind: float, masks_from: Path | None, allow_unverified: bool, **criteria: float | None) -> None:
    """vLLM's OpenAI-compatible server with per-tenant masks; any other option is passed to vLLM as is. Every mask
    must carry a passing verification certificate (`depn isolate`, `depn verify`) judged by criteria at least as
    strict as the server's, unless --allow-unverified."""
    from depn_serve.serving.server.serve import serve as run_server

    run_server(model_dir, tenants_path, mask_store, token_file, max_mask_slots, metrics_max_tenants, list(ctx.args),
               allow_unverified, max_mask_wait, masks_from, {k: v for k, v in criteria.items() if v is not None},
               max_behind, metrics_token_file)


COMMANDS = [serve]
