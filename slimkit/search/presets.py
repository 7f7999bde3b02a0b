"""What `slimkit optimize` tries, as data: the candidates of each preset per runtime, and the margins
of the search (when a near miss is rolled back, when a failing proxy is still benchmarked).

Each preset is an ordered list of candidates: order matters when the time budget runs short, so the
likely winners come first. Planning them for a model kind and a runtime is `slimkit.search.plan`'s job.
"""

from __future__ import annotations

from slimkit.core.arch import CAUSAL_LM

TARGETS = ("latency", "throughput", "memory", "size")
RUNTIMES = ("auto", "torch", "onnxruntime", "ort-genai", "tensorrt")

# Each preset is an ordered list of candidate recipes (as step lists), either
# for every kind or per model kind ("*": the others). Unregistered methods are
# skipped. Order matters when the time budget runs short: the likely winners
# come first. Latency, measured (benchmarks/RESULTS-quantize.md, vs fp32 eager):
#   SmolLM2 decode, compiled: int4 4.91x (+0.37% ppl), int8 3.86x (+0.24%), bf16 1.92x
#   MiniLM p50, compiled:     int8-dynamic 2.58x (cosine 0.9979), bf16 1.88x, int8-static 2.79x (0.9835)
_INT8_DYNAMIC = [("int8-dynamic", {"smooth_alpha": 0.5})]
# A combination: 9% of the parameters out as whole MLP channels (OBS choice, least-squares refit; about
# 30% of MiniLM's channels: 1.21x faster, cosine 0.981 one-shot, benchmarks/RESULTS-prune.md), then int8.
# An entry (steps, min_budget) is tried only when --max-quality-drop is at least min_budget.
_PRUNED_INT8 = ([("structured", {"units": ["mlp"], "sparsity": 0.09}), *_INT8_DYNAMIC], 0.02)
PRESETS: dict[str, list | dict[str, list]] = {
    "latency": {
        CAUSAL_LM: [[("int4", {})], [("int8", {})], [("bf16", {})]],
        "*": [_INT8_DYNAMIC, [("bf16", {})], [("int8-static", {})], _PRUNED_INT8],
    },
    "throughput": {
        CAUSAL_LM: [[("bf16", {})], _INT8_DYNAMIC, [("int8-wo", {})]],
        "*": [[("bf16", {})], _INT8_DYNAMIC, [("int8-wo", {})], _PRUNED_INT8],
    },
    "memory": [[("int4", {})], [("int8-wo", {})], [("nf4", {"double_quant": True})], [("bf16", {})]],
    "size": [[("int4", {})], [("nf4", {"double_quant": True})], [("int8-wo", {})], [("bf16", {})]],
    "edge": [[("int4", {})], [("int8-wo", {})], _INT8_DYNAMIC],
}

# --runtime onnxruntime: `slimkit export --format onnxruntime --quantize Q` (None: fp32 with fusions).
ORT_PRESETS: dict[str, list[str | None]] = {
    "latency": ["int8", None, "int8-static"],
    "throughput": ["int8", None, "int8-static"],
    "memory": ["int4", "int8", None],
    "size": ["int4", "int8", None],
    "edge": ["int8", "int4"],
}

# --runtime ort-genai (causal LMs): (recipe steps applied first, then `slimkit export --format ort-genai
# --quantize Q`). Measured on SmolLM2-135M (benchmarks/RESULTS-export.md): the builder's int4 and
# slimkit's carried int4 decode at the same speed, slimkit's with lower perplexity (+19.5% vs +35.9%);
# fp32 decodes 5.9x faster than eager PyTorch and loses nothing.
_CARRIED_INT4 = [("int4", {"zero_point": "integer"})]  # integer zero points: MatMulNBits holds the codes exactly
_GENAI = [(_CARRIED_INT4, None), ([], "int4"), ([], None)]
GENAI_PRESETS: dict[str, list[tuple[list, str | None]]] = {
    "latency": _GENAI, "throughput": _GENAI, "memory": _GENAI, "size": _GENAI, "edge": _GENAI[:2]}

# --runtime tensorrt (encoders and classifiers, CUDA): `slimkit export --format tensorrt --quantize Q`.
TRT_PRESETS: dict[str, list[str | None]] = {
    "latency": ["fp16", "int8"],
    "throughput": ["fp16", "int8"],
    "memory": ["int8", "fp16"],
    "size": ["int8", "fp16"],
    "edge": ["int8", "fp16"],
}

# Methods whose near misses roll back, and to what. Each is cheap to rank per
# block (no calibration, or a forward pass); calibrated methods (awq, the int8
# alias, gptq, qat, int8-static) would recalibrate once per block.
ROLLBACK_HIGH = {"int4": "int8-wo", "int4-wo": "int8-wo", "nf4": "int8-wo", "int8-wo": "none", "int8-dynamic": "none"}
ROLLBACK_MARGIN = 0.7  # aim the rollback's probe loss at 70% of what the proportional reduction asks
# techniques whose apply reads its input model only to copy it (`copy_model`): a candidate of one of them
# can be built on its own load of the original, changed in place (`LoadedModel.donated`)
DONATABLE = {"int4", "int8", "bf16", "fp16", "int4-wo", "int8-wo", "nf4", "awq", "gptq", "int8-dynamic", "int8-static"}
NEAR_MISS = 2.0  # a proxy drop up to 2x the budget is rolled back
BENCH_WITHIN = 3.0  # a proxy drop up to 3x the budget is still benchmarked (for the report and its rollback)
