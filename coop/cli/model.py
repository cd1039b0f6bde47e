"""`coop model prepare|info` and `coop generate`: model stores, and the in-process reference path."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from coop.cli.console import console, plain
from coop.cli.options import ModelOption

model_app = typer.Typer(no_args_is_help=True, help="Prepare and inspect model stores.")


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
    src: Annotated[
        str, typer.Argument(help="HF model directory, .gguf file, or a packaged model: 'smollm2-demo', 'gemma3-270m'")
    ],
    out: Annotated[Path, typer.Option("--out", help="directory to write the model store to")],
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    quantize: Annotated[
        str, typer.Option(help="none | int8 | int4: weight-only quantization of the blocks (torchao)")
    ] = "none",
    temperature: Annotated[
        float | None, typer.Option(help="recommended temperature, for requests that set none", min=0.0)
    ] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="recommended top-p", min=0.0, max=1.0)] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="recommended top-k (0 = no limit)", min=0)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar, no messages")] = False,
) -> None:
    """Convert a model into per-block files that nodes load one span at a time.

    The sampling parameters given here override the source's generation_config.json and model card
    (see `coop model info`); the API uses them for what a request leaves unset.
    """
    from coop.errors import ModelStoreError
    from coop.model.manifest import SamplingDefaults
    from coop.model.prepare import prepare

    stated = {k: v for k, v in {"temperature": temperature, "top_p": top_p, "top_k": top_k}.items() if v is not None}
    try:
        sampling = SamplingDefaults.model_validate({**stated, "origin": "command line"})
    except ValueError as exc:
        raise ModelStoreError(f"invalid sampling defaults: {exc}") from exc
    prepare(src, out, dtype=dtype, quantize=quantize, sampling=sampling, quiet=quiet)


@model_app.command("info")
def model_info(
    model_dir: Annotated[Path, typer.Argument(help="a prepared model directory")],
    verify: Annotated[bool, typer.Option("--verify", help="check every file's sha256")] = False,
) -> None:
    """Show a prepared model's manifest."""
    from coop.model.files import verify_all
    from coop.model.manifest import Manifest

    manifest = Manifest.load(model_dir)
    table = Table(title=plain(f"{manifest.name} ({model_dir})"), show_header=False)
    for key, value in [
        ("architecture", manifest.architecture),
        ("model type", manifest.model_type),
        ("dtype", manifest.dtype),
        ("quantization", manifest.quantization),
        ("blocks", str(manifest.num_blocks)),
        ("hidden size", str(manifest.hidden_size)),
        ("vocab size", str(manifest.vocab_size)),
        ("block parameters", f"{sum(b.param_count for b in manifest.blocks):,}"),
        ("client parameters", f"{manifest.client_param_count:,}"),
        ("GFLOPs per token", f"{manifest.total_flops_per_token / 1e9:.3f}"),
        ("tokenizer", "yes" if manifest.has_tokenizer else "no"),
        ("content hash", manifest.content_hash),
        ("source", f"{manifest.source.kind}: {manifest.source.path}"),
        ("sampling defaults", manifest.sampling_defaults.describe()),
    ]:
        table.add_row(key, plain(value))
    console.print(table)
    if verify:
        verify_all(model_dir, manifest)
        console.print(f"[green]verified[/] {len(manifest.files)} files")


def generate(
    prompt: Annotated[str, typer.Argument(help="the user's message")],
    model: ModelOption,
    spans: Annotated[str, typer.Option(help="spans to chain in this process, e.g. 0:10,10:20,20:30")] = "",
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 64,
    temperature: Annotated[float, typer.Option()] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k")] = 0,
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "auto",
) -> None:
    """Generate locally through a chain of spans: the reference path the swarm must match."""
    from coop.pipeline.generation import collect_tokens
    from coop.pipeline.local import LocalBackend
    from coop.pipeline.sampling import SamplingParams

    # LocalBackend checks that the spans tile the model before it loads any weights.
    backend = LocalBackend(model, parse_spans(spans) if spans else None, device=device)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    prompt_ids = backend.client.encode_chat([{"role": "user", "content": prompt}])

    async def run() -> list[int]:
        chain = await backend.open_chain(len(prompt_ids) + max_tokens)
        try:
            return await collect_tokens(backend.client, chain, prompt_ids, params)
        finally:
            await chain.close()

    console.print(plain(backend.client.decode(asyncio.run(run()))))
