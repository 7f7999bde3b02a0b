"""What structured pruning's `sparsity` counts, on a small model whose embedding is most of
its parameters: a sparsity the blocks cannot give is refused with the largest they can,
and `of="blocks"` (`--of blocks`) counts the blocks' parameters alone."""

import json

import pytest
import torch
from conftest import invoke_cli

import slimkit
from slimkit.core.errors import SlimkitError

FAST = {"calibration_samples": 2, "seq_len": 32, "batch_size": 2}


@pytest.fixture(scope="module")
def embedding_heavy(tmp_path_factory, tokenizer_dir):
    """4 layers of 37k parameters under a 262k-parameter embedding (vocabulary 4096, width 64):
    the MLPs are 24% of the model, so no MLP-only cut reaches 25% of it."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=3)
    path = tmp_path_factory.mktemp("embedding-heavy")
    T.LlamaForCausalLM(cfg).save_pretrained(path)
    T.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def test_a_sparsity_the_blocks_cannot_give_names_the_largest_they_can(embedding_heavy):
    lm = slimkit.load(embedding_heavy)
    with pytest.raises(SlimkitError) as info:
        slimkit.prune(lm, "structured", sparsity=0.25, **FAST)
    message = str(info.value)
    assert message.startswith("--sparsity 0.25: cannot remove 134 of the 128 MLP channels of model.layers.0, which needs at least one;")
    assert "the largest --sparsity this model allows with units mlp is 0.23" in message and "--of blocks" in message
    pruned = slimkit.prune(lm, "structured", sparsity=0.23, **FAST)  # the largest is reachable...
    assert pruned.manifest["prune_report"]["removed_fraction"] == pytest.approx(0.23, abs=0.005)
    with pytest.raises(SlimkitError, match="cannot remove 128 of the 128"):  # ...and the next hundredth is not
        slimkit.prune(lm, "structured", sparsity=0.24, **FAST)
    # one of the two kv groups a layer (0.17 of the blocks) is as far as heads go; up to 0.24 rounds to it
    with pytest.raises(SlimkitError, match=r"largest --sparsity this model allows with units heads is 0\.24 \(of its blocks' parameters\)"):
        slimkit.prune(lm, "structured", sparsity=0.5, units=["heads"], of="blocks", **FAST)


def test_of_blocks_counts_the_blocks_parameters_and_is_recorded(embedding_heavy, tmp_path):
    proc = invoke_cli("prune", str(embedding_heavy), "--method", "structured", "--sparsity", "0.25", "--of", "blocks",
                      *[f"-o{k}={v}" for k, v in FAST.items()], "--out", str(tmp_path / "p"), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["removed_fraction_of_blocks"] == pytest.approx(0.25, abs=0.01)
    assert out["removed_fraction"] == pytest.approx(0.25 * 147_968 / 410_176, abs=0.01)  # blocks' parameters / the model's
    step = json.loads((tmp_path / "p" / "slimkit.json").read_text())["recipe"][-1]
    assert (step["method"], step["sparsity"], step["of"]) == ("structured", 0.25, "blocks")


def test_of_is_checked(embedding_heavy, tmp_path):
    with pytest.raises(SlimkitError, match="of='layers': sparsity counts the parameters of the 'model'"):
        slimkit.prune(slimkit.load(embedding_heavy), "structured", of="layers")
    proc = invoke_cli("prune", str(embedding_heavy), "--method", "wanda", "--sparsity", "0.5", "--of", "blocks", "--out", str(tmp_path / "w"))
    assert proc.returncode == 2 and "drop --of" in proc.stderr
