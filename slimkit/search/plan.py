"""Plans: the candidates a search tries for a kind of model, a preset and a runtime, in order.

With `--runtime torch` a candidate is a recipe (PRESETS); with another runtime it is an export
(`slimkit.export`), its quality and speed measured through the runtime that serves it:
  onnxruntime  encoders and classifiers: ONNX Runtime graphs, fp32 with fusions, int8,
               int8-static, int4 (ORT_PRESETS)
  ort-genai    causal LMs: onnxruntime-genai model directories (GENAI_PRESETS): slimkit's int4
               with integer zero points, its codes carried exactly into MatMulNBits (a recipe
               step, then the export), the builder's own int4, and fp32
  tensorrt     encoders and classifiers on a CUDA GPU with TensorRT: fp16 and int8 engines
               (TRT_PRESETS); refused before any work where `exporters.tensorrt.check`
               says no engine can be built (without CUDA or TensorRT 10; the engine path is
               untested on a GPU in this version)
`auto` (the default) plans PyTorch's candidates and then, for encoders and classifiers, ONNX
Runtime's (`auto_runtimes`), so the fastest runtime present wins. A near miss's rollback is a plan
too, made during the search (`Fallback`: what `quantization.mixed.fallback` is asked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from slimkit.core import registry
from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.recipe import Recipe
from slimkit.exporters import ExportConfig, tensorrt
from slimkit.search.config import OptimizeConfig
from slimkit.search.presets import GENAI_PRESETS, ORT_PRESETS, PRESETS, TRT_PRESETS

if TYPE_CHECKING:
    from slimkit.exporters import ExportConfig


@dataclass(frozen=True)
class Fallback:
    """A near miss rolled back: `quantization.mixed.fallback(original, method, options, high, budget)`."""

    of: str  # the near miss's name
    method: str
    options: dict
    high: str  # the higher precision its most sensitive blocks keep
    budget: dict  # {"max_kl": x} or {"max_cosine_drop": x}: the bound on the calibration probe


@dataclass(frozen=True)
class Plan:
    """One candidate to try: a recipe, optionally exported to a runtime, or a near miss to roll back."""

    name: str
    recipe: Recipe
    export: ExportConfig | None = None  # --runtime other than torch: applied after the recipe's steps
    rollback: Fallback | None = None
    min_budget: float = 0.0  # tried only under a quality budget at least this wide


def auto_runtimes(kind: str) -> list[str]:
    """What `--runtime auto` searches: PyTorch, and for encoders and classifiers ONNX Runtime too
    where it is installed (its int8 MiniLM is 3.3x fp32 eager against 2.5x for torch.compile int8).
    Causal LMs stay on PyTorch: an onnxruntime-genai candidate is a model-builder export plus an
    evaluation through that runtime, minutes each on 2 cores, which the default 10-minute budget
    does not cover; ask for it with --runtime ort-genai."""
    runtimes = ["torch"]
    if kind != CAUSAL_LM:
        try:
            import onnxruntime  # noqa: F401

            runtimes.append("onnxruntime")
        except ImportError:
            pass
    return runtimes


def candidate_plans(kind: str, preset: str, runtime: str = "torch", seed: int = 0) -> list[Plan]:
    """The preset's candidates for this kind of model, in order (with `auto`: PyTorch's, then the exports')."""
    if runtime == "auto":
        plans = candidate_plans(kind, preset, "torch", seed)
        for other in auto_runtimes(kind)[1:]:
            plans += export_plans(other, preset, seed)
        return plans
    if runtime != "torch":
        return export_plans(runtime, preset, seed)
    entries = PRESETS[preset]
    if isinstance(entries, dict):
        entries = entries.get(kind, entries.get("*", []))
    available = {t.name for t in registry.techniques()}
    plans = []
    for entry in entries:
        steps, min_budget = entry if isinstance(entry, tuple) else (entry, 0.0)
        if all(m in available for m, _ in steps):
            recipe = Recipe.of(*steps, seed=seed)
            plans.append(Plan(recipe.label, recipe, min_budget=min_budget))
    return plans


def export_plans(runtime: str, preset: str, seed: int = 0) -> list[Plan]:
    """Exports to `runtime`: 'onnxruntime int8', or 'int4(zero_point=integer) -> ort-genai' where a recipe comes first."""
    if runtime == "ort-genai":
        entries = GENAI_PRESETS[preset]
    else:
        entries = [([], q) for q in (ORT_PRESETS if runtime == "onnxruntime" else TRT_PRESETS).get(preset, [])]
    plans = []
    for steps, quantize in entries:
        recipe = Recipe.of(*steps, seed=seed)
        name = f"{recipe.label} -> {runtime}" + (f" {quantize}" if quantize else "") if steps else f"{runtime} {quantize or 'fp32'}"
        plans.append(Plan(name, recipe, ExportConfig(runtime, quantize)))
    return plans


def check_installed(runtime: str) -> None:
    """Before any work: what `runtime` needs is here (for TensorRT, a CUDA GPU too); the error names the fix."""
    if runtime == "tensorrt":
        tensorrt.check("--runtime")
    elif runtime in ("onnxruntime", "ort-genai"):
        package = "onnxruntime" if runtime == "onnxruntime" else "onnxruntime_genai"
        try:
            __import__(package)
        except ImportError:
            raise SlimkitError(f"--runtime {runtime} needs {package.replace('_', '-')}: pip install 'slimkit[onnx]'") from None


def check_runtime(kind: str, config: OptimizeConfig) -> None:
    """`config.runtime` serves this kind of model (whether it is installed: `check_installed`)."""
    if config.runtime == "ort-genai" and kind != CAUSAL_LM:
        raise SlimkitError(f"--runtime ort-genai serves causal LMs, not {kind}s: use --runtime onnxruntime")
    if config.runtime in ("onnxruntime", "tensorrt") and kind == CAUSAL_LM:
        raise SlimkitError(f"--runtime {config.runtime} is for encoders and classifiers here: for a causal LM use "
                           "--runtime ort-genai or torch")
