"""Commands that make a model smaller: quantize, sensitivity, prune, distill, export, run, optimize."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimkit.cli.base import (
    Data,
    Device,
    Json,
    MaxMemory,
    ModelArg,
    Options,
    Overwrite,
    Seed,
    Threads,
    TrustRemote,
    bench_config,
    check_memory,
    command,
    emit,
    items,
    load_model,
    show_serving,
    stdout,
)
from slimkit.cli.display import bench_rows, eval_rows, fmt, table
from slimkit.core import registry
from slimkit.core.data import calibration_source
from slimkit.core.errors import SlimkitError
from slimkit.core.hardware import resolve_device, training_device
from slimkit.core.options import make_config, parse_options
from slimkit.core.progress import search_progress
from slimkit.core.recipe import Recipe
from slimkit.core.registry import Context
from slimkit.distillation.method import DistillConfig, apply
from slimkit.exporters import ExportConfig, export
from slimkit.exporters import summary as export_summary
from slimkit.io.artifacts import check_destination, check_layout, read_manifest, save
from slimkit.io.blockwise import METHODS as BLOCKWISE
from slimkit.io.model import placed
from slimkit.io.serving import how_to_serve
from slimkit.io.sources import DEFAULT_MODEL
from slimkit.measure.quality import EvalConfig, evaluate
from slimkit.measure.speed import benchmark, dir_size_mb
from slimkit.pruning import cli_options, prune
from slimkit.pruning import summary as prune_summary
from slimkit.pruning.unstructured import by_block, calibrates
from slimkit.quantization import quantize
from slimkit.quantization.common import quantized_modules
from slimkit.quantization.ranking import sensitivity
from slimkit.quantization.weight_only import ROUNDING
from slimkit.report import recommendation
from slimkit.search.config import OptimizeConfig, parse_duration, parse_fraction
from slimkit.search.loop import optimize
from slimkit.search.plan import check_installed


@command("quantize")
def quantize_cmd(
    model: Annotated[str | None, typer.Argument(help="model to quantize (embedded name, HF directory, artifact, .gguf, hub id)")] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="quantization method (see --list)")] = None,
    out_dir: Annotated[str | None, typer.Option("--out", help="artifact directory to write")] = None,
    option: Options = None,
    data: Data = None,
    seed: Seed = 0,
    list_methods: Annotated[bool, typer.Option("--list", help="list every quantization method and exit")] = False,
    layout: Annotated[str | None, typer.Option("--layout", help="how the artifact stores quantized layers: compressed-tensors "
                                               "(transformers and vLLM read it) or slimkit; default: compressed-tensors where exact")] = None,
    overwrite: Overwrite = False,
    threads: Threads = None,
    device: Device = "cpu",
    trust_remote_code: TrustRemote = False,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Quantize a model and save it as an artifact that `eval` and `bench` accept."""
    if list_methods:
        rows = [{"name": t.name, "summary": t.summary} for t in registry.techniques("quantize")]
        return emit(as_json, {"methods": rows}, [table("Quantization methods", [(r["name"], r["summary"]) for r in rows], ("method", "what it does"))])
    missing = [flag for flag, value in (("MODEL", model), ("--method", method), ("--out", out_dir)) if not value]
    if missing:
        raise SlimkitError(f"quantize needs {', '.join(missing)}: e.g. slimkit quantize smollm2-135m --method int8 --out ./smollm2-int8")
    options = parse_options(method, option or [], "quantize")
    check_layout(layout)
    device = resolve_device(device)  # a missing GPU is refused before the model loads
    data = calibration_source(data)  # a bad file is refused before the model loads
    check_memory("training" if method == "qat" else "quantize", model, max_memory, blockwise=_calibration(method, options) if device == "cpu" else None)
    # on the CPU, lazy and streamed: a method that goes block by block reads one block from the files at a time and
    # writes it out when done; the others read the whole model from the files (no copy of it is made)
    lazy = device == "cpu"
    q = quantize(load_model(model, "fp32", threads, trust_remote_code, lazy=lazy), method, data=data, seed=seed, device=device,
                 stream=str(Path(out_dir).expanduser().absolute().parent) if lazy else False, **options)
    training = {"training": q.manifest["training"]} if "training" in q.manifest else {}  # methods that train (qat)
    with placed(q, device="cpu"):  # saved from CPU tensors: the same files whatever the device
        path = save(q, out_dir, overwrite=overwrite, metrics=training, layout=layout)
    manifest = read_manifest(path)
    loads = {"layout": manifest["layout"], **({"slimkit_only": manifest["slimkit_only"]} if "slimkit_only" in manifest else {})}
    info = {"model": model, "method": method, "options": options, "out": str(path), "quantized_modules": len(quantized_modules(q.model)),
            "parameters": q.num_parameters(), "size_on_disk_mb": round(dir_size_mb(path), 3), **loads, **training}
    emit(as_json, info, [table(f"Quantized {model} with {method}", [(k, str(v)) for k, v in info.items()])], served=path)


def _calibration(method: str, options: dict, stage: str = "quantize") -> dict | None:
    """What the memory guard needs of a method that goes block by block: its calibration windows ({} for none); None otherwise."""
    config = make_config(method, options, stage)
    if stage == "quantize" and method == "mixed" and config.low in ROUNDING and config.high in ROUNDING + ("none",):  # probe windows through one block
        return {"samples": config.calibration_samples, "seq_len": config.seq_len}
    if method not in BLOCKWISE:
        return None
    if stage == "prune" and not by_block(config):
        return None  # read whole
    samples = getattr(config, "calibration_samples", 0) if stage == "quantize" or calibrates(config) else 0
    return {"samples": samples, "seq_len": config.seq_len} if samples else {}


@command("sensitivity")
def sensitivity_cmd(
    model: ModelArg,
    method: Annotated[str, typer.Option("--method", "-m", help="quantize method whose per-layer loss to measure")] = "int4-wo",
    option: Options = None,
    granularity: Annotated[str, typer.Option(help="block (each transformer block's linears together) or layer (each linear)")] = "block",
    metric: Annotated[str, typer.Option(help="auto, kl, ppl (causal LMs), cosine (encoders) or block-mse (each block's output; "
                                        "auto on the CPU for int4-wo, int8-wo and nf4, reading one block at a time)")] = "auto",
    calibration_samples: Annotated[int, typer.Option(help="calibration windows to measure on")] = 4,
    seq_len: Annotated[int, typer.Option(help="tokens per window")] = 256,
    data: Data = None,
    threads: Threads = None,
    device: Device = "cpu",
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Rank layers (or blocks) by how much quantizing each alone hurts quality, most sensitive first."""
    options = parse_options(method, option or [], "quantize")
    device = resolve_device(device)
    data = calibration_source(data)
    blockwise = {"samples": calibration_samples, "seq_len": seq_len} if device == "cpu" and metric in ("auto", "block-mse") and method in ROUNDING else None
    check_memory("quantize", model, max_memory, blockwise=blockwise)
    # on the CPU, lazy: block-mse reads one block from the files at a time; the other metrics read the model whole
    r = sensitivity(load_model(model, "fp32", threads, lazy=device == "cpu"), method, options, data=data, device=device, granularity=granularity, metric=metric,
                    calibration_samples=calibration_samples, seq_len=seq_len)
    rows = [(f"{i + 1}. {u.name}" + (f" ({len(u.layers)} layers)" if len(u.layers) > 1 else ""), fmt(u.score, 6)) for i, u in enumerate(r.units)]
    title = f"Sensitivity of {model} to {method} ({r.metric} on {r.tokens} calibration tokens, {r.seconds:.0f} s)"
    emit(as_json, r.to_dict(), [table(title, rows, (r.granularity, r.metric))])


@command("prune")
def prune_cmd(
    model: ModelArg,
    method: Annotated[str, typer.Option("--method", "-m", help="magnitude, wanda, 2:4 (or any N:M), structured, gradual")],
    out_dir: Annotated[str, typer.Option("--out", help="artifact directory to write")],
    sparsity: Annotated[float | None, typer.Option(help="fraction of weights zeroed; for structured, of parameters removed")] = None,
    of: Annotated[str | None, typer.Option("--of", help="structured: --sparsity counts the parameters of the whole model "
                                           "(default, embeddings included) or of its transformer blocks alone: model or blocks")] = None,
    recover_minutes: Annotated[float, typer.Option(help="recovery training budget on the calibration split (minutes)")] = 0.0,
    option: Options = None,
    data: Data = None,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    threads: Threads = None,
    device: Device = "cpu",
    trust_remote_code: TrustRemote = False,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Prune a model (unstructured, N:M or structured) and save it as an artifact."""
    name, options = cli_options(method, sparsity, recover_minutes, of)
    options = {**parse_options(name, option or [], "prune"), **options}
    device = resolve_device(device)
    data = calibration_source(data)
    blockwise = _calibration(name, options, "prune") if device == "cpu" else None
    check_memory("training" if options.get("recover_minutes") else "prune", model, max_memory, blockwise=blockwise)
    # on the CPU, wanda and magnitude read one block from the files at a time and write it out when done (see `prune`)
    lazy = blockwise is not None
    lm = load_model(model, "auto", threads, trust_remote_code, lazy=lazy)
    pruned = prune(lm, name, data=data, seed=seed, device=device, stream=str(Path(out_dir).expanduser().absolute().parent) if lazy else False, **options)
    with placed(pruned, device="cpu"):  # saved from CPU tensors: the same files whatever the device
        path = save(pruned, out_dir, overwrite=overwrite)
    info = {**prune_summary(pruned, lm.num_parameters()), "out": str(path)}
    rows = [(k.replace("_", " "), fmt(v)) for k, v in info.items() if k != "layers" and v is not None]
    emit(as_json, info, [table(f"Pruned {model} with {method}", rows)], served=path)


@command("distill")
def distill_cmd(
    teacher: ModelArg,
    out_dir: Annotated[str, typer.Option("--out", help="artifact directory for the trained student")],
    student_layers: Annotated[str, typer.Option(help="N (drop the run of teacher layers that turns the hidden states least) or a comma list of teacher layers to keep")] = "",
    minutes: Annotated[float | None, typer.Option(help="wall-clock training budget")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps (default: as many as --minutes allows)")] = None,
    loss: Annotated[str, typer.Option(help="kd: learn from the teacher; ce: labels only, without the teacher (baseline)")] = "kd",
    temperature: float = 1.0,
    alpha: Annotated[float, typer.Option(help="share of KD against hard-label cross-entropy")] = 0.9,
    lr: float = 1e-4,
    batch_size: int = 4,
    seq_len: int = 256,
    dropout: Annotated[float | None, typer.Option(help="the student's dropout while training (default: the model's own; 0 fits faster on short budgets)")] = None,
    hidden_weight: Annotated[float, typer.Option(help="weight of hidden-state matching through --layer-map (0: off)")] = 0.0,
    hidden_loss: Annotated[str, typer.Option(help="hidden-state matching: mse or cosine (per token)")] = "mse",
    layer_map: Annotated[str, typer.Option(help="student:teacher block pairs for hidden matching, e.g. 2:5 (default: each student block and its source)")] = "",
    freeze: Annotated[str, typer.Option(help="comma list of student module names kept as copied, e.g. embeddings")] = "",
    text_views: Annotated[int, typer.Option(help="encoders: cut the training passages this many ways")] = 1,
    cache_teacher: Annotated[str | None, typer.Option(help="cache the teacher's outputs in this directory for repeated epochs")] = None,
    data: Annotated[str | None, typer.Option(help="pydoc (default), a .txt/.jsonl file, or hf:NAME; its calibration split trains")] = None,
    seed: Seed = 0,
    checkpoint_dir: Annotated[str | None, typer.Option(help="write checkpoints here (with --checkpoint-every) and --resume from them")] = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    log_dir: Annotated[str | None, typer.Option(help="write metrics.jsonl (and TensorBoard logs when installed) here")] = None,
    threads: Threads = None,
    device: Device = "auto",
    overwrite: Overwrite = False,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Distil a smaller student (fewer layers) from TEACHER and save it as an artifact."""
    import dataclasses

    layers = _layer_spec(student_layers)
    config = DistillConfig(student_layers=layers, minutes=minutes, steps=steps, loss=loss, temperature=temperature, alpha=alpha,
                           lr=lr, batch_size=batch_size, seq_len=seq_len, dropout=dropout, hidden_weight=hidden_weight, hidden_loss=hidden_loss,
                           layer_map=_layer_pairs(layer_map), freeze=tuple(items(freeze)),
                           text_views=text_views, cache_teacher=cache_teacher, checkpoint_dir=checkpoint_dir,
                           checkpoint_every=checkpoint_every, resume=resume, log_dir=log_dir)
    trains_on = training_device(device)  # a missing GPU is refused before the model loads
    source = calibration_source(data)
    check_memory("distill", teacher, max_memory)
    student = apply(load_model(teacher, "auto", threads), config, Context(source, seed, trains_on))
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under torchrun: one process writes
        return
    training = student.manifest["training"]
    with placed(student, device="cpu"):  # saved from CPU tensors: the same files whatever the device
        path = save(student, out_dir, recipe=student.manifest["recipe"], metrics={"training": training}, overwrite=overwrite)
    rows = [(k, str(v)) for k, v in training.items() if k != "history"] + [("artifact", str(path))]
    emit(as_json, {"artifact": str(path), "config": dataclasses.asdict(config), "training": training}, [table(f"Distilled {teacher}", rows)], served=path)


@command("export")
def export_cmd(
    model: ModelArg,
    out_dir: Annotated[str | None, typer.Option("--out", help="directory to write (new or empty); gguf: the file (default MODEL-TYPE.gguf)")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx, onnxruntime, ort-genai, tensorrt or gguf")] = "onnx",
    quantize: Annotated[str | None, typer.Option(help="onnxruntime: int8, int8-static, int4; ort-genai: int4; tensorrt: fp16, int8; "
                                                      "gguf: f32, f16 (default), q8_0, q4_0, q4_1")] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="gguf: quantize with awq, gptq or awq-gptq on the type's grid first, "
                                                                       "then carry the codes exactly")] = None,
    block_size: Annotated[int, typer.Option(help="int4: weights per quantization block")] = 32,
    accuracy_level: Annotated[int, typer.Option(help="ort-genai int4/int8: 4 = int8 activations (fast), 0 = fp32 (exact)")] = 4,
    optimize: Annotated[bool, typer.Option(help="onnxruntime: apply transformer fusions")] = True,
    exporter: Annotated[str, typer.Option(help="auto, dynamo (torch.export) or torchscript")] = "auto",
    tolerance: Annotated[float | None, typer.Option(help="parity tolerance (default: the format's)")] = None,
    overwrite: Overwrite = False,
    threads: Threads = None,
    trust_remote_code: TrustRemote = False,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Export to a deployment runtime (ONNX, ONNX Runtime, onnxruntime-genai, TensorRT, a GGUF file for llama.cpp), checked."""
    config = ExportConfig(fmt, quantize, exporter=exporter, tolerance=tolerance, optimize=optimize, block_size=block_size,
                          accuracy_level=accuracy_level, method=method)
    if out_dir is None:
        if fmt != "gguf":
            raise SlimkitError(f"export needs --out: e.g. slimkit export {model} --format {fmt} --out ./exported")
        out_dir = f"{Path(model).name.removesuffix('.gguf')}-{config.quantize}.gguf"
    check_memory("export", model, max_memory)
    lm = load_model(model, "auto", threads, trust_remote_code)
    path = export(lm, out_dir, config, overwrite=overwrite)
    info = export_summary(path)
    emit(as_json, info, [table(f"Exported {model}", [(k, str(v)) for k, v in info.items()])], served=path)


@command("run")
def run_cmd(
    recipe: Annotated[str, typer.Argument(help="recipe file (.yaml or .json)")],
    out: Annotated[str, typer.Option("--out", help="directory for the resulting artifact")],
    model: Annotated[str | None, typer.Option(help="model to compress (default: the recipe's, else smollm2-135m)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="score at most this many tokens")] = None,
    overwrite: Overwrite = False,
    threads: Threads = None,
    device: Annotated[str, typer.Option(help="where the result is evaluated and benchmarked: cpu, cuda (or cuda:N) or auto")] = "cpu",
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Apply a recipe, measure the result against the original, and save the artifact."""
    device = resolve_device(device)
    plan = Recipe.load(recipe)
    confined = plan.confined(out)  # logs and checkpoints go inside OUT, never elsewhere
    check_destination(out, overwrite)
    check_memory("run", model or plan.model or DEFAULT_MODEL, max_memory)
    original = load_model(model or plan.model or DEFAULT_MODEL, "auto", threads)
    compressed = confined.apply(original)
    quality = evaluate(compressed, original, config=EvalConfig(max_tokens=max_tokens), device=device)
    speed = benchmark(compressed, bench_config(128, "1,4,8", 64, threads), device=device)
    metrics = {"eval": quality.to_dict(), "bench": speed.to_dict()}
    kept = confined.written(out)  # OUT may now hold them: checked empty (or --overwrite) above
    path = save(compressed, out, recipe=plan.to_dict(), metrics=metrics, overwrite=overwrite or bool(kept), keep=kept)
    emit(as_json, {"artifact": str(path), **metrics}, [table(f"{plan.label} -> {path}", eval_rows(quality) + bench_rows(speed))], served=path)


@command("optimize")
def optimize_cmd(
    model: Annotated[str, typer.Argument(help="model to optimize (default: the embedded smollm2-135m)")] = "smollm2-135m",
    target: Annotated[str, typer.Option(help="latency, throughput, memory or size")] = "latency",
    max_quality_drop: Annotated[str, typer.Option(help="quality budget, e.g. 1% (perplexity ratio, 1 - cosine)")] = "1%",
    preset: Annotated[str | None, typer.Option(help="latency, throughput, memory, size or edge (default: the target's)")] = None,
    runtime: Annotated[str, typer.Option(help="runtime that will serve the model: auto (torch, and onnxruntime for encoders and "
                                              "classifiers), torch, onnxruntime (encoders, classifiers), ort-genai (causal LMs) "
                                              "or tensorrt (encoders, classifiers; CUDA)")] = "auto",
    time_budget: Annotated[str, typer.Option(help="wall-clock budget for the whole run, e.g. 10m")] = "10m",
    out: Annotated[str, typer.Option(help="output directory: model/, report.html, report.md, results.json")] = "slimkit-out",
    overwrite: Overwrite = False,
    compiled: Annotated[bool | None, typer.Option("--compile/--no-compile", help="benchmark candidates through torch.compile (default: for the latency target)")] = None,
    seed: Annotated[int, typer.Option(help="seed of every candidate's recipe: the same seed gives the same candidates")] = 0,
    threads: Threads = None,
    device: Annotated[str, typer.Option(help="where candidates are evaluated and benchmarked: cpu, cuda (or cuda:N) or auto; "
                                             "they are built on the CPU")] = "cpu",
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Search for the fastest / smallest model within a quality budget, and report."""
    import time

    started = time.perf_counter()
    config = OptimizeConfig(target=target, max_quality_drop=parse_fraction(max_quality_drop), preset=preset, runtime=runtime,
                            time_budget_s=parse_duration(time_budget), threads=threads, seed=seed, compile=compiled, device=device)
    check_installed(runtime)  # before the model loads: a missing runtime (or GPU) is known without it
    check_memory("optimize", model, max_memory)
    with search_progress() as progress:  # the model is not kept here, so the search can drop it from memory
        results = optimize(load_model(model, "auto", threads), config, out, overwrite=overwrite, on_progress=progress, started=started)

    if as_json:
        emit(True, results, [])
    else:
        stdout.print(recommendation(results), highlight=False)
        stdout.print(f"model: {out}/model   report: {out}/report.html", highlight=False)
        show_serving(how_to_serve(Path(out) / "model"))


def _layer_pairs(text: str) -> tuple[tuple[int, int], ...] | None:
    """--layer-map "2:5,1:4" as ((2, 5), (1, 4)); empty: None (the default map)."""
    if not text.strip():
        return None
    try:
        return tuple((int(a), int(b)) for a, b in (pair.split(":") for pair in items(text)))
    except ValueError:
        raise SlimkitError(f"--layer-map takes student:teacher pairs of block numbers, e.g. 2:5 or 1:4,2:5; got '{text}'") from None


def _layer_spec(text: str) -> int | tuple[int, ...]:
    try:
        values = tuple(int(v) for v in items(text))
    except ValueError:
        values = ()
    if not values:
        raise SlimkitError(f"--student-layers must be a layer count or a comma list of teacher layers, got '{text}'")
    return values[0] if len(values) == 1 else values
