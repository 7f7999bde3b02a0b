"""The embedded models under the recommended methods: the issue's quality bars, on small samples."""

import pytest

import slimkit
from slimkit.measure.quality import EvalConfig, evaluate


def _state_bytes(lm) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in lm.model.state_dict().values()}.values())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "int8-dynamic"])
def test_minilm_int8_cosine(method):
    ref = slimkit.load("minilm-l6")
    q = slimkit.quantize(ref, method)
    result = evaluate(q, ref, config=EvalConfig(max_passages=48))
    assert result.cosine_to_reference >= 0.995


@pytest.mark.slow
@pytest.mark.parametrize("method,max_size", [("int8", 0.30), ("int4", 0.20)])
def test_smollm2_quality_and_size(method, max_size):
    ref = slimkit.load("smollm2-135m")
    q = slimkit.quantize(ref, method)
    result = evaluate(q, ref, config=EvalConfig(max_tokens=300, window=256, stride=128))
    assert result.kl_divergence < 0.02
    assert result.perplexity < result.reference_perplexity * 1.03
    assert _state_bytes(q) < max_size * _state_bytes(ref)
