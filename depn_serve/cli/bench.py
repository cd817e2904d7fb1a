"""`depn bench`: benchmarks that print a table for the docs (vLLM is imported only when one runs)."""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path

import click

from depn_serve.bench.serving import BenchSettings, Measurement, run_serving_bench
from depn_serve.cli.options import setting
from depn_serve.core.console import console


def _setting(name: str, **kwargs):
    return setting(BenchSettings, name.replace("-", "_"), **kwargs)


def _model_shape(command):
    """The bench model's shape and dtype options (the engine benchmarks share them)."""
    for name in ("dtype", "vocab", "kv-heads", "heads", "intermediate", "layers", "hidden"):
        command = _setting(name, **({"type": click.Choice(["bfloat16", "float32"])} if name == "dtype" else {}))(
            command)
    return command


@click.group()
def bench() -> None:
    """Benchmarks (figures for the docs, not tests)."""


@bench.command("serving")
@_model_shape
@click.option("--eager/--compile", default=False, show_default=True, help="enforce_eager, or vLLM's torch.compile")
@_setting("rounds")
@_setting("batch")
@_setting("prompt-tokens")
@_setting("max-tokens")
@_setting("tenants")
@_setting("mask-fraction")
@_setting("seed")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="write the result here")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path, dir_okay=False),
              help="write the table here")
def serving(json_path: Path | None, markdown_path: Path | None, **options) -> None:
    """Output tokens/s and per-token latency: (a) vLLM, (b) extension without masks, (c) many tenants' masks.

    One process holds all three engines (identical settings, random dummy weights) and runs them interleaved.
    """
    settings = BenchSettings(**options)

    def report(m: Measurement, warm_up: bool) -> None:
        tag = "warm-up" if warm_up else f"round {m.round}/{settings.rounds}"
        console.print(f"{tag:>12}  {m.config:<14} {m.tokens_per_s:8.1f} tok/s  {m.tpot_ms:8.2f} ms/token"
                      f"  ({m.seconds:.1f} s)")

    with tempfile.TemporaryDirectory(prefix="depn-bench-") as work:
        result = run_serving_bench(settings, Path(work), report)
    result.write(json_path, markdown_path)
    click.echo(result.markdown())


@bench.command("ratio")
@_model_shape
@click.option("--rounds", default=20, show_default=True, type=click.IntRange(min=1),
              help="runs of the batch, each step of which is half a pair")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1),
              help="prompts per run, one tenant each (64: as many distinct masks in the batch as --tenants)")
@_setting("prompt-tokens")
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(min=2),
              help="output tokens per prompt")
@_setting("tenants")
@_setting("mask-fraction")
@_setting("seed")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="write the result here")
def ratio(json_path: Path | None, **options) -> None:
    """Masked / plain throughput on one engine, masking switched on and off between forward steps: the ratio with its
    95 % confidence interval (the machine's drift hits both sides of every pair)."""
    from depn_serve.bench.ratio import StepPair, run_paired_ratio, summarize
    from depn_serve.core.fileio import atomic_write_text

    settings = BenchSettings(**options, eager=True)

    def report(run: int, pairs: list[StepPair]) -> None:
        so_far = summarize(settings, pairs, {})
        console.print(f"run {run:>3}/{settings.rounds}  {len(pairs)} pairs  ratio {so_far.ratio:.4f}  95 % CI "
                      f"{so_far.ci95[0]:.4f}–{so_far.ci95[1]:.4f}")

    with tempfile.TemporaryDirectory(prefix="depn-bench-") as work:
        result = run_paired_ratio(settings, Path(work), report)
    if json_path:
        atomic_write_text(json_path, result.model_dump_json(indent=2) + "\n")
    click.echo(result.markdown())


@bench.command("capacity")
@click.option("--layers", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--intermediate", default=14336, show_default=True, type=click.IntRange(min=1),
              help="neurons per layer (defaults: Llama-3-8B)")
@click.option("--masks", default=10000, show_default=True, type=click.IntRange(min=1),
              help="tenants, each with its own random mask")
@click.option("--slots", type=click.IntRange(min=1), help="resident slots  [default: --masks]")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1), help="tenants per step")
@click.option("--device", default="cpu", show_default=True, help="where the table lives (cpu, cuda)")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="write the result here")
def capacity(json_path: Path | None, **options) -> None:
    """Resident masks: the device table's size against bf16 rows, and the loads of a first and a steady round."""
    from depn_serve.bench.capacity import run_capacity
    from depn_serve.core.fileio import atomic_write_text

    with console.status(f"{options['masks']:,} masks"):
        report = run_capacity(**options)
    if json_path:
        atomic_write_text(json_path, report.model_dump_json(indent=2) + "\n")
    click.echo(report.markdown())


@bench.command("mlp")
@click.option("--hidden", default=4096, show_default=True)
@click.option("--intermediate", default=14336, show_default=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True)
@click.option("--tokens", default="32,256", show_default=True, help="token counts (decode batch, prefill chunk)")
def mlp(hidden: int, intermediate: int, dtype: str, tokens: str) -> None:
    """One MLP with and without the per-token mask (the engine's CPU op; defaults: Llama-3-8B shape)."""
    from depn_serve.bench.mlp import mlp_overhead

    counts = tuple(int(t) for t in tokens.split(","))
    click.echo(f"Llama MLP hidden {hidden}, intermediate {intermediate}, {dtype}; a different slot per token\n")
    click.echo("| tokens | plain, best (µs) | masked, best (µs) | plain / masked, best | from medians |")
    click.echo("|---:|---:|---:|---:|---:|")
    for row in mlp_overhead(hidden, intermediate, dtype, counts):
        click.echo(f"| {row.tokens} | {row.plain_us:.0f} | {row.masked_us:.0f} | {row.ratio:.3f} | "
                   f"{row.median_ratio:.3f} |")


@bench.command("holdback")
@click.option("--steps", default=10_000, show_default=True, type=click.IntRange(min=100),
              help="engine steps timed per queue length")
def holdback(steps: int) -> None:
    """The scheduler's hold-back per engine step (pure Python, no vLLM) while one tenant keeps 0, 20,000 or
    100,000 requests queued next to 7 others, through 4 mask slots."""
    from depn_serve.bench.holdback import markdown, run_holdback

    click.echo(markdown(run_holdback(steps=steps)))


@bench.command("tenants")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="the served model (its MLP shape and fingerprint; no weights are loaded)")
@click.option("--tenants", default=5000, show_default=True)
@click.option("--masked", default=200, show_default=True, help="tenants with a mask in the store (the others may "
                                                                 "run unmasked)")
@click.option("--lookups", default=20000, show_default=True, help="authentications timed")
def tenants(model_dir: Path, tenants: int, masked: int, lookups: int) -> None:
    """The control plane with thousands of tenants: start-up, authentication latency, reload, memory."""
    from depn_serve.bench.control import run_control_bench

    if not 0 <= masked <= tenants:
        raise click.BadParameter(f"expected 0 to --tenants ({tenants}), found {masked}", param_hint="--masked")
    with console.status(f"{tenants:,} tenants"), tempfile.TemporaryDirectory(prefix="depn-bench-") as work:
        report = run_control_bench(model_dir, Path(work), tenants, masked, lookups)
    click.echo(report.markdown())


def _testbed_bench(module: str, model: str, *names: str):
    """A test-bed benchmark's options: `--testbed` and the named fields of its settings model (`module.model`)."""

    def decorate(command):
        settings = getattr(importlib.import_module(module), model)
        for name in reversed(names):
            command = setting(settings, name.replace("-", "_"))(command)
        return click.option("--testbed", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
                            help="a `depn testbed build` folder (its model and record prompts)")(command)

    return decorate


@bench.command("soak")
@_testbed_bench("depn_serve.bench.soak", "SoakSettings", "seconds", "tenants", "slots", "concurrency", "push-every",
                "max-tokens", "mask-fraction", "hostile-every", "kills", "disk-faults", "seed")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="write the report here")
@click.option("--work", type=click.Path(path_type=Path, file_okay=False),
              help="keep the server's log, tenants file and store here (default: a temporary folder)")
def soak(testbed: Path, json_path: Path | None, work: Path | None, **options) -> None:
    """A real `depn serve` under load and hostile requests while masks are pushed and dropped, then killed -9
    during mask changes and made to fail store writes; exits 1 on any failure."""
    from depn_serve.bench.soak import SoakSettings, run_soak

    settings = SoakSettings(**options)
    if settings.slots >= settings.tenants:
        raise click.BadParameter(f"expected fewer slots than tenants ({settings.tenants})", param_hint="--slots")
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        report = run_soak(testbed, work, settings, log=console.print)
    else:
        with tempfile.TemporaryDirectory(prefix="depn-soak-") as temporary:
            report = run_soak(testbed, Path(temporary), settings, log=console.print)
    if json_path:
        json_path.write_text(report.model_dump_json(indent=2))
    click.echo(report.markdown())
    for example in [*report.failure_examples, *report.faults.problems]:
        click.echo(f"failure: {example}", err=True)
    if not report.passed:
        raise SystemExit(1)


@bench.command("flood")
@_testbed_bench("depn_serve.bench.flood", "FloodSettings", "seconds", "quiet-streams", "quiet-tokens",
                "flood-concurrency", "flood-n", "flood-tokens", "flood-big-n", "slots")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="write the report here")
def flood(testbed: Path, json_path: Path | None, **options) -> None:
    """One tenant floods a real `depn serve`: another tenant's inter-token latency alone, under the flood with the
    default tenant limits, and with the flooding tenant's limits lifted."""
    from depn_serve.bench.flood import FloodSettings, run_flood

    with tempfile.TemporaryDirectory(prefix="depn-flood-") as work:
        report = run_flood(testbed, Path(work), FloodSettings(**options), log=console.print)
    if json_path:
        report.write(json_path)
    click.echo(report.markdown())


@bench.command("detect")
@click.option("--testbed", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="a `depn testbed build` folder (its model and records.jsonl)")
@click.option("--records", "n_records", type=click.IntRange(min=1), default=4, show_default=True,
              help="the first N records are scored")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="integrated-gradient steps (DEPN's default)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="write the result here")
def detect(testbed: Path, n_records: int, steps: int, device: str, json_path: Path | None) -> None:
    """The batched detector against a straightforward per-token, per-layer, per-step integrated-gradients loop on
    the same records, in one process: the speed-up and the largest score difference (they compute the same
    scores, so the difference is float rounding)."""
    from depn_serve.bench.detector import compare

    with console.status(f"detector vs naive loop: {n_records} records, {steps} steps"):
        report = compare(testbed / "model", testbed / "records.jsonl", n_records, steps, device)
    if json_path:
        json_path.write_text(report.model_dump_json(indent=2))
    click.echo(report.markdown_header())
    click.echo(report.markdown_row())
    click.echo(f"\n{report.device}, torch {report.torch_version}, {report.threads} thread(s); allclose(rtol="
               f"{report.rtol:g}, atol={report.atol:.1e}): {report.allclose}")


COMMANDS = [bench]
