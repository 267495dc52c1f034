"""The ``crvlm`` command line.

Exit codes: 0 success; 1 a user error (bad input, see the message); 2 bad usage (unknown
option, missing argument); 3 a bundle is missing, malformed, tampered with or for another
model; 4 no adapter fits the model; 5 plugin problem; 6 a model cannot be loaded.
User errors print one line and a hint, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from crvlm_sdk.errors import CrvlmError

app = typer.Typer(
    name="crvlm",
    help="Configurable refusal for vision-language models: build, inspect and use refusal bundles.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn :class:`CrvlmError` into one red line + hint and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CrvlmError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            if exc.hint:
                err_console.print(f"[dim]hint: {exc.hint}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@user_errors
def plugins() -> None:
    """List every installed component (built-in and plugin) and plugins that failed to load."""
    from crvlm_sdk.plugins import KINDS, get_plugin_manager

    manager = get_plugin_manager()
    table = Table(title="crvlm components")
    for column in ("kind", "name", "provider", "claims"):
        table.add_column(column, overflow="fold")
    for kind in KINDS:
        for component in manager.components(kind).values():
            claims = ", ".join(getattr(component.cls, "model_classes", ()) or ()) if kind == "adapter" else ""
            table.add_row(kind, component.name, component.provider, claims)
    console.print(table)
    if manager.failures:
        failed = Table(title="plugins that failed to load", title_style="bold red")
        failed.add_column("plugin")
        failed.add_column("error", overflow="fold")
        for failure in manager.failures:
            failed.add_row(failure.name, failure.error)
        console.print(failed)


@app.command()
@user_errors
def inspect(path: Annotated[Path, typer.Argument(help="bundle directory")]) -> None:
    """Pretty-print a bundle's manifest and tensors (validates schema and hash)."""
    from crvlm_sdk.bundle import Bundle

    bundle = Bundle.load(path)
    m = bundle.manifest
    table = Table(title=f"bundle {path}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows = [
        ("policy", f"{m.policy.name} (subject: {m.policy.subject or '-'}; "
                   f"{m.policy.n_in_scope} in-scope / {m.policy.n_out_of_scope} out-of-scope examples)"),
        ("backbone", f"{', '.join(m.backbone.architectures)} ({m.backbone.model_type}), "
                     f"{m.backbone.num_layers} layers × {m.backbone.hidden_size}, vocab {m.backbone.vocab_size}"),
        ("backbone hash", m.backbone.first_layer_sha256),
        ("adapter", m.adapter),
        ("steering", f"layers {m.layers}, α={m.alpha:g}, operator {m.operator}"),
        ("gate", f"{m.gate.type} at layer {m.gate.layer} "
                 f"({'unsteered pre-pass' if m.needs_prepass else 'read in the same pass'}); config {m.gate.config}"),
        ("extraction", ", ".join(f"{k}={v}" for k, v in m.extraction.items()) or "-"),
        ("validation", ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in m.validation.items()) or "-"),
        ("vectors", ", ".join(f"{layer}: |v|={float(v.norm()):.3g}" for layer, v in sorted(bundle.vectors.items()))),
        ("gate tensors", ", ".join(f"{k} {tuple(v.shape)}" for k, v in bundle.gate_tensors.items()) or "-"),
        ("format", f"{m.format_version} (crvlm {m.crvlm_version}), created {m.created}"),
        ("tensors sha256", m.tensors_sha256),
    ]
    for field, value in rows:
        table.add_row(field, value)
    console.print(table)


@app.command()
@user_errors
def verify(
    path: Annotated[Path, typer.Argument(help="bundle directory")],
    model: Annotated[str | None, typer.Option(help="model directory (or 'smollm2') to check the bundle against")] = None,
    gguf_file: Annotated[str | None, typer.Option(help="GGUF file name inside --model")] = None,
    adapter: Annotated[str | None, typer.Option(help="force a backbone adapter by name")] = None,
) -> None:
    """Check a bundle's schema, tensor hash and (with --model) that it fits the model."""
    from crvlm_sdk.backbones import adapter_for
    from crvlm_sdk.bundle import Bundle
    from crvlm_sdk.models import load_model

    backbone = None
    if model is not None:
        net, processor = load_model(model, gguf_file=gguf_file)
        backbone = adapter_for(net, processor, adapter)
    bundle = Bundle.load(path, adapter=backbone)
    if backbone is not None:
        bundle.gate()  # the gate's plugin must be installed too
    target = f" and fits {model}" if model else ""
    console.print(f"[green]OK[/]: {path} is a valid crvlm bundle ({bundle.name}){target}")


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="where the demo bundle is written")] = Path("demo-out"),
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 40,
) -> None:
    """Build a cooking-only bundle for SmolLM2-135M-Instruct and compare answers with and without it."""
    from crvlm_sdk.demo import run_demo

    run_demo(out, max_new_tokens=max_new_tokens, console=console)


def main() -> None:  # pragma: no cover - console-script shim
    app()


if __name__ == "__main__":
    sys.exit(app())
