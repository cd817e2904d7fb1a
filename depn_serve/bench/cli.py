"""`depn bench`: benchmarks that print a table for the docs. vLLM and torch are imported only when one runs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
from rich.console import Console

console = Console()


@click.group()
def bench() -> None:
    """Benchmarks (figures for the docs, not tests)."""


@bench.command("serving")
@click.option("--hidden", type=int, default=1024, show_default=True)
@click.option("--layers", type=int, default=8, show_default=True)
@click.option("--intermediate", type=int, default=2816, show_default=True)
@click.option("--heads", type=int, default=16, show_default=True)
@click.option("--kv-heads", type=int, default=4, show_default=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True)
@click.option("--eager/--compile", default=False, show_default=True, help="enforce_eager, or vLLM's torch.compile")
@click.option("--rounds", type=int, default=3, show_default=True, help="measured rounds (plus one warm-up)")
@click.option("--batch", type=int, default=32, show_default=True, help="prompts per run")
@click.option("--prompt-tokens", type=int, default=32, show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True, help="output tokens per prompt")
@click.option("--tenants", type=int, default=16, show_default=True, help="distinct masks in configuration (c)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="write the result here")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path, dir_okay=False),
              help="write the table here")
def serving(json_path: Path | None, markdown_path: Path | None, **options) -> None:
    """Output tokens/s and per-token latency: (a) vLLM, (b) extension without masks, (c) many tenants' masks.

    One process holds all three engines (identical settings, random dummy weights) and runs them interleaved.
    """
    from pydantic import ValidationError

    from depn_serve.bench.serving import BenchSettings, Measurement, run_serving_bench

    try:
        settings = BenchSettings(**options)
    except ValidationError as exc:
        raise click.ClickException(str(exc)) from exc

    def report(m: Measurement, warm_up: bool) -> None:
        tag = "warm-up" if warm_up else f"round {m.round}/{settings.rounds}"
        console.print(f"{tag:>12}  {m.config:<14} {m.tokens_per_s:8.1f} tok/s  {m.tpot_ms:8.2f} ms/token"
                      f"  ({m.seconds:.1f} s)")

    with tempfile.TemporaryDirectory(prefix="depn-bench-") as work:
        result = run_serving_bench(settings, Path(work), report)
    result.write(json_path, markdown_path)
    console.print(result.markdown(), markup=False)
