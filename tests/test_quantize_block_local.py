"""Sensitivity (block-mse) and mixed precision on a lazy model, one block in memory at a time.

The lazy paths must give what the in-memory ones give: the same block-mse scores, the
same mixed model tensor for tensor, and a search whose chosen model meets its budget
when measured whole.
"""

import json

import pytest
import torch
from test_quantize_sensitivity import PROBE, SENSITIVE, make_sensitive

import slimkit
from slimkit.io.blockwise import Walk
from slimkit.io.lazy import is_lazy
from slimkit.io.loader import load
from slimkit.quantization.mixed import fallback
from slimkit.quantization.modules import WeightOnlyLinear
from slimkit.quantization.ranking import Probe

pytestmark = pytest.mark.usefixtures("one_thread")

LOW = {"low": "int4-wo", "low_options": {"group_size": 32}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    """The tiny Llama made sensitive in block 1 (one outlier layer), saved in shards as a big checkpoint is."""
    import transformers as T
    from conftest import build_tiny

    path = build_tiny("llama", tokenizer_dir, tmp_path_factory.mktemp("tiny") / "llama")
    lm = make_sensitive(slimkit.load(path))
    out = tmp_path_factory.mktemp("sensitive")
    lm.model.save_pretrained(out, max_shard_size="100KB")
    T.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture
def blocks_held(monkeypatch):
    """Records, for each block a walk yields, which blocks of the model then hold real tensors."""
    held = []
    walk_blocks = Walk.blocks

    def blocks(self, label):
        for prefix, block in walk_blocks(self, label):
            real = {n.split(".")[2] for n, p in self.lm.model.named_parameters() if n.startswith("model.layers.") and not p.is_meta}
            held.append((prefix, real))
            yield prefix, block

    monkeypatch.setattr(Walk, "blocks", blocks)
    return held


def _scores(report) -> dict[str, float]:
    return {u.name: u.score for u in report.units}


def test_block_mse_on_a_lazy_model_holds_one_block_and_equals_in_memory(checkpoint, blocks_held):
    lazy = load(checkpoint, lazy=True)
    r = slimkit.sensitivity(lazy, "int4-wo", {"group_size": 32}, granularity="layer", **PROBE)
    assert r.metric == "block-mse" and is_lazy(lazy.model)  # the default on a lazy model; the caller's model stays in its files
    assert [p for p, _ in blocks_held] == ["model.layers.0", "model.layers.1"]
    assert all(real == {prefix.split(".")[-1]} for prefix, real in blocks_held)  # only the block being measured
    assert r.units[0].name == SENSITIVE and r.units[0].score > 5 * r.units[1].score > 0
    memory = slimkit.sensitivity(slimkit.load(checkpoint), "int4-wo", {"group_size": 32}, granularity="layer", metric="block-mse", **PROBE)
    assert memory.metric == "block-mse" and len(memory.units) == len(r.units) == 14
    expected = _scores(memory)
    assert all(s == pytest.approx(expected[n], rel=1e-6) for n, s in _scores(r).items())


def test_block_mse_is_the_relative_error_of_the_blocks_output(checkpoint):
    """By hand: quantize block 1 alone with the method, and compare its output with the float block's on the same inputs, token by token."""
    lm = slimkit.load(checkpoint)
    r = slimkit.sensitivity(lm, "int4-wo", {"group_size": 32}, granularity="block", metric="block-mse", **PROBE)
    q = slimkit.quantize(lm, "int4-wo", group_size=32, targets=["model.layers.1.*"], embeddings=False)
    probe = Probe(lm, **PROBE)
    seen = {}
    hooks = [m.model.model.layers[1].register_forward_hook(lambda mod, args, kwargs, out, m=m: seen.setdefault(id(m), []).append((args, kwargs, out)),
                                                             with_kwargs=True) for m in (lm, q)]
    with torch.no_grad():
        for ids in probe.batches:
            lm.model(input_ids=ids, use_cache=False)
        ratios = []
        for args, kwargs, out in seen[id(lm)]:
            y = out[0] if isinstance(out, tuple) else out  # (B, T, H)
            y_q = q.model.model.layers[1](*args, **kwargs)
            y_q = y_q[0] if isinstance(y_q, tuple) else y_q
            ratios.append(((y_q - y).double().norm(dim=-1) ** 2 / y.double().norm(dim=-1) ** 2).flatten())  # per token
    for h in hooks:
        h.remove()
    assert _scores(r)["model.layers.1"] == pytest.approx(torch.cat(ratios).mean().item(), rel=1e-5)
    assert r.units[0].name == "model.layers.1"


@pytest.mark.parametrize("low,high", [(LOW, {"high": "int8-wo"}), ({"low": "nf4", "low_options": {"block_size": 32}}, {"high": "none"}),
                                      ({"low": "int4-wo", "low_options": {"group_size": 32, "embedding_bits": 4}}, {"high": "int8-wo"})],
                         ids=["int4-int8", "nf4-float", "int4-tied-head"])
def test_a_lazy_mixed_model_equals_the_in_memory_one(checkpoint, low, high):
    chosen = [SENSITIVE, "model.layers.0.self_attn.q_proj"]
    memory = slimkit.quantize(slimkit.load(checkpoint), "mixed", **low, **high, high_layers=chosen)
    lazy = slimkit.quantize(load(checkpoint, dtype=torch.float32, lazy=True), "mixed", **low, **high, high_layers=chosen)
    a, b = memory.model.state_dict(), lazy.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert [type(m).__name__ for m in memory.model.modules()] == [type(m).__name__ for m in lazy.model.modules()]
    assert lazy.manifest["recipe"][-1]["high_layers"] == chosen and len(lazy.manifest["recipe"]) == 1


def test_a_lazy_mixed_model_streams_to_the_same_artifact(checkpoint, tmp_path):
    chosen = [SENSITIVE]
    memory = slimkit.save(slimkit.quantize(slimkit.load(checkpoint), "mixed", **LOW, high_layers=chosen), tmp_path / "memory")
    q = slimkit.quantize(load(checkpoint, dtype=torch.float32, lazy=True), "mixed", **LOW, high_layers=chosen, stream=str(tmp_path))
    assert q.staged is not None and all(p.is_meta for p in q.model.parameters())  # nothing kept in memory
    streamed = slimkit.save(q, tmp_path / "streamed")
    a, b = slimkit.load(memory), slimkit.load(streamed)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    manifest = json.loads((streamed / "slimkit.json").read_text())
    assert manifest["modules"][SENSITIVE]["bits"] == 8 and manifest["recipe"][-1]["high_layers"] == chosen


def test_the_lazy_search_meets_the_budget_measured_whole(checkpoint, blocks_held):
    lazy = load(checkpoint, lazy=True)
    q, report = fallback(lazy, "int4-wo", {"group_size": 32}, "int8-wo", {"max_kl": 2e-4}, granularity="layer")
    assert report.sensitivity.metric == "block-mse" and report.sensitivity.units[0].name == SENSITIVE
    assert report.met and report.score <= 2e-4 < report.tried[0]["score"]  # all-low missed it
    assert SENSITIVE in report.high_layers
    passes = 1 + len(report.tried)  # the ranking, then one per measured assignment, then the build (held whole: not streamed)
    assert len(blocks_held) == 2 * (passes + 1)
    assert all(real == {prefix.split(".")[-1]} for prefix, real in blocks_held[:2 * passes])
    # measured whole and in memory, the chosen model scores what the search measured block by block
    whole = Probe(slimkit.load(checkpoint), "auto", None, 4, 256, 4)
    assert whole.score(q.model) == pytest.approx(report.score, rel=1e-4, abs=1e-9)
    bits = {n: m.bits for n, m in q.model.named_modules() if isinstance(m, WeightOnlyLinear)}
    assert {n for n, b in bits.items() if b == 8} == set(report.high_layers)
    assert q.manifest["recipe"][-1]["high_layers"] == report.high_layers


def test_calibrated_methods_read_a_lazy_model_whole(checkpoint):
    lazy = load(checkpoint, lazy=True)
    r = slimkit.sensitivity(lazy, "gptq", {"calibration_samples": 2, "seq_len": 64, "group_size": 32}, granularity="block", **PROBE)
    assert r.metric == "kl" and len(r.units) == 2 and r.units[0].name == "model.layers.1"
    r = slimkit.sensitivity(lazy, "gptq", {"calibration_samples": 2, "seq_len": 64, "group_size": 32}, granularity="block",
                            metric="block-mse", **PROBE)
    assert r.metric == "block-mse" and r.units[0].name == "model.layers.1" and r.units[1].score > 0


def test_cli_sensitivity_reads_a_checkpoint_block_by_block(checkpoint):
    from conftest import invoke_json

    report = invoke_json("sensitivity", str(checkpoint), "-o", "group_size=32", "--calibration-samples", "2", "--seq-len", "64", "--threads", "1")
    assert report["metric"] == "block-mse" and report["units"][0]["name"] == "model.layers.1"
    kl = invoke_json("sensitivity", str(checkpoint), "-o", "group_size=32", "--metric", "kl", "--calibration-samples", "2", "--seq-len", "64",
                     "--threads", "1")
    assert kl["metric"] == "kl" and kl["units"][0]["name"] == "model.layers.1"
