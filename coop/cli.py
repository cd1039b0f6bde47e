"""The `coop` command line: parses flags, builds settings, calls components. Nothing else."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from coop.errors import CoopError

app = typer.Typer(no_args_is_help=True, help="Coop: a cooperative compute pool for large language models.")
model_app = typer.Typer(no_args_is_help=True, help="Prepare and inspect model stores.")
app.add_typer(model_app, name="model")

console = Console()
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def _fail(exc: CoopError) -> None:
    err_console.print(f"[red]error:[/] {exc}")
    raise typer.Exit(code=1)


def parse_spans(text: str) -> list[tuple[int, int]]:
    """'0:10,10:20' -> [(0, 10), (10, 20)]"""
    spans = []
    for part in text.split(","):
        try:
            start, end = (int(x) for x in part.split(":"))
        except ValueError as exc:
            raise typer.BadParameter(f"span {part!r} is not START:END") from exc
        spans.append((start, end))
    return spans


@model_app.command("prepare")
def model_prepare(
    src: Annotated[str, typer.Argument(help="HF model directory, .gguf file, or 'smollm2-demo'")],
    out: Annotated[Path, typer.Option("--out", help="directory to write the model store to")],
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
) -> None:
    """Convert a model into per-block files that nodes load one span at a time."""
    from coop.model.prepare import prepare

    try:
        prepare(src, out, dtype=dtype)
    except CoopError as exc:
        _fail(exc)


@model_app.command("info")
def model_info(
    model_dir: Annotated[Path, typer.Argument(help="a prepared model directory")],
    verify: Annotated[bool, typer.Option("--verify", help="check every file's sha256")] = False,
) -> None:
    """Show a prepared model's manifest."""
    from coop.model.files import verify_all
    from coop.model.manifest import Manifest

    try:
        manifest = Manifest.load(model_dir)
        table = Table(title=f"{manifest.name} ({model_dir})", show_header=False)
        for key, value in [
            ("architecture", manifest.architecture),
            ("model type", manifest.model_type),
            ("dtype", manifest.dtype),
            ("blocks", str(manifest.num_blocks)),
            ("hidden size", str(manifest.hidden_size)),
            ("vocab size", str(manifest.vocab_size)),
            ("block parameters", f"{sum(b.param_count for b in manifest.blocks):,}"),
            ("client parameters", f"{manifest.client_param_count:,}"),
            ("GFLOPs per token", f"{manifest.total_flops_per_token / 1e9:.3f}"),
            ("tokenizer", "yes" if manifest.has_tokenizer else "no"),
            ("content hash", manifest.content_hash),
            ("source", f"{manifest.source.kind}: {manifest.source.path}"),
        ]:
            table.add_row(key, value)
        console.print(table)
        if verify:
            verify_all(model_dir, manifest)
            console.print(f"[green]verified[/] {len(manifest.files)} files")
    except CoopError as exc:
        _fail(exc)


@app.command("generate")
def generate(
    prompt: Annotated[str, typer.Argument(help="the user's message")],
    model: Annotated[Path, typer.Option("--model", help="a prepared model directory")],
    spans: Annotated[str, typer.Option(help="spans to chain in this process, e.g. 0:10,10:20,20:30")] = "",
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 64,
    temperature: Annotated[float, typer.Option()] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k")] = 0,
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "auto",
) -> None:
    """Generate locally through a chain of spans: the reference path the swarm must match."""
    from coop.coordinator.generation import LocalChain, collect_tokens
    from coop.coordinator.sampling import SamplingParams
    from coop.model.client_part import ClientPart
    from coop.model.manifest import Manifest
    from coop.node.engine import SpanEngine

    try:
        manifest = Manifest.load(model)
        span_list = parse_spans(spans) if spans else [(0, manifest.num_blocks)]
        client = ClientPart.load(model, device=device)
        engines = [SpanEngine.load(model, a, b, device=device) for a, b in span_list]
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        prompt_ids = client.encode_chat([{"role": "user", "content": prompt}])
        chain = LocalChain(engines, max_length=len(prompt_ids) + max_tokens)
        tokens = asyncio.run(collect_tokens(client, chain, prompt_ids, params))
        console.print(client.decode(tokens))
    except CoopError as exc:
        _fail(exc)


if __name__ == "__main__":
    app()
