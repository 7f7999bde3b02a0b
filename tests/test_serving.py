"""How to serve what slimkit wrote: the lines are chosen from the files on disk, and the
printed Python runs as printed (in a fresh interpreter, against the real directory)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import invoke_cli

import slimkit
from slimkit.io.serving import how_to_serve, serving_lines


def runtimes(path, shown=None):
    return [w.runtime for w in how_to_serve(path, shown)]


def run_printed(cwd, *ways, after: str = "") -> str:
    """Run the ways' Python lines as printed, one after the other, then `after`, in a new interpreter started in `cwd`."""
    script = "\n".join(line for w in ways for line in w.lines) + "\n" + after
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def float_artifact(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "fp32"
    return slimkit.save(slimkit.load(tiny("llama")), out)


def test_a_float_artifact_loads_as_printed_in_transformers_and_slimkit(float_artifact):
    ways = how_to_serve(float_artifact, "fp32")  # spelled relative to where the user stands
    assert [w.runtime for w in ways] == ["transformers", "vLLM server", "vLLM", "slimkit"]
    by = {w.runtime: w for w in ways}
    assert by["transformers"].lines[1] == 'model = AutoModelForCausalLM.from_pretrained("fp32")'
    assert by["vLLM server"].lines == ("vllm serve fp32",) and by["vLLM"].lines[1] == 'llm = LLM("fp32")'
    assert serving_lines(ways)[-2:] == ["import slimkit", 'lm = slimkit.load("fp32")']
    out = run_printed(float_artifact.parent, by["transformers"], by["slimkit"])
    assert out.strip()  # the printed generate() ran and decoded something


def test_a_slimkit_quantized_artifact_is_served_by_slimkit_only(tiny, tmp_path):
    path = slimkit.save(slimkit.quantize(slimkit.load(tiny("llama")), "nf4"), tmp_path / "q")
    (way,) = how_to_serve(path)
    assert way.runtime == "slimkit" and "slimkit's own layout: nf4 modules" in way.lines[0]
    assert "slimkit export" in way.lines[0]


def test_a_compressed_tensors_artifact_is_served_by_transformers_and_vllm(tiny, tmp_path):
    q = slimkit.quantize(slimkit.load(tiny("llama")), "int4-wo", symmetric=True, embeddings=False)
    path = slimkit.save(q, tmp_path / "q")
    ways = how_to_serve(path)
    assert [w.runtime for w in ways] == ["transformers", "vLLM server", "vLLM", "slimkit"]
    assert "compressed-tensors" in ways[0].requires


def test_an_int8_per_weight_artifact_is_served_by_transformers_and_not_by_vllm(tiny, tmp_path):
    """Asymmetric int4 with int8 embeddings (the default int4) is compressed-tensors' int-quantized format:
    transformers reads it, vLLM has no scheme for weight-only layers that are not packed."""
    path = slimkit.save(slimkit.quantize(slimkit.load(tiny("llama")), "int4"), tmp_path / "q")
    ways = how_to_serve(path)
    assert [w.runtime for w in ways] == ["transformers", "slimkit"]
    assert ways[0].lines[-1].startswith("# not vLLM:") and "symmetric=true" in ways[0].lines[-1]


def test_bert_heads_pruned_apart_from_the_config_are_served_by_slimkit_only(tiny, tmp_path):
    path = slimkit.save(slimkit.prune(slimkit.load(tiny("bert")), "structured", head_groups=1, importance="magnitude-l1"), tmp_path / "p")
    (way,) = how_to_serve(path)
    assert way.runtime == "slimkit" and "layer shapes that config.json cannot express" in way.lines[0]


def _hf_copy(src, dst, quant_method):
    """A plain Hugging Face directory whose config.json carries a quantization_config of `quant_method`."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": quant_method, "format": "pack-quantized"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_the_quant_method_in_config_json_decides_the_runtimes(tiny, tmp_path):
    ct = _hf_copy(tiny("llama"), tmp_path / "ct", "compressed-tensors")
    ways = {w.runtime: w for w in how_to_serve(ct)}
    assert list(ways) == ["transformers", "vLLM server", "vLLM", "slimkit"]
    assert ways["transformers"].requires == "pip install compressed-tensors"
    own = _hf_copy(tiny("llama"), tmp_path / "own", "slimkit-int4")
    (way,) = how_to_serve(own)
    assert way.runtime == "slimkit" and "quant_method 'slimkit-int4'" in way.lines[0]


def test_a_classifier_prints_its_auto_class(tiny):
    ways = {w.runtime: w for w in how_to_serve(tiny("bert-cls"))}
    assert list(ways) == ["transformers", "slimkit"]  # no vLLM for a classifier
    assert "AutoModelForSequenceClassification.from_pretrained" in ways["transformers"].lines[1]


def test_a_sentence_transformers_directory_loads_as_printed(tiny, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    body = Transformer(str(tiny("bert")))
    st = SentenceTransformer(modules=[body, Pooling(body.get_embedding_dimension())])
    st.save(str(tmp_path / "st"))
    ways = how_to_serve(tmp_path / "st", "st")
    assert [w.runtime for w in ways] == ["sentence-transformers", "transformers", "slimkit"]
    want = st.encode(["Hello"])
    out = run_printed(tmp_path, ways[1], ways[0], after="print(embeddings[0][:4].tolist())")  # the transformers lines run too
    assert np.allclose(json.loads(out), want[0][:4], atol=1e-5)


def _gguf(path):
    """A real (tiny, meaningless) GGUF file: a header, metadata and one tensor."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_is_served_by_llama_cpp_ollama_transformers_and_slimkit(tmp_path):
    import gguf

    file = _gguf(tmp_path / "Tiny Q4.gguf")
    assert gguf.GGUFReader(str(file)).tensors[0].name == "token_embd.weight"
    ways = {w.runtime: w for w in how_to_serve(file, "out/Tiny Q4.gguf")}
    assert list(ways) == ["llama.cpp", "Ollama", "transformers (dequantized to float)", "slimkit"]
    assert ways["llama.cpp"].lines[0] == "llama-cli -m 'out/Tiny Q4.gguf'"
    assert ways["Ollama"].lines == ("printf 'FROM %s\\n' './out/Tiny Q4.gguf' > Modelfile", "ollama create tiny-q4 -f Modelfile",
                                    "ollama run tiny-q4 Hello")
    assert ways["transformers (dequantized to float)"].lines[1] == (
        'model = AutoModelForCausalLM.from_pretrained("out", gguf_file="Tiny Q4.gguf")')
    # `slimkit export --format gguf` may write a directory holding the file: the lines name the file inside it
    (tmp_path / "exported").mkdir()
    shutil.copy(file, tmp_path / "exported" / "model.gguf")
    ways = {w.runtime: w for w in how_to_serve(tmp_path / "exported", "/srv/exported")}
    assert ways["llama.cpp"].lines[0] == "llama-cli -m /srv/exported/model.gguf"
    assert ways["Ollama"].lines[0] == "printf 'FROM %s\\n' /srv/exported/model.gguf > Modelfile"
    assert ways["slimkit"].lines[-1] == 'lm = slimkit.load("/srv/exported")'


def test_the_printed_transformers_line_reads_a_gguf_file(tiny, tmp_path):
    """A tiny Llama exported as Q4_1, the embedded SmolLM2's type (transformers reads the 30-layer file in tens of
    seconds; slimkit.load("smollm2-135m") reads it through the same gguf_file= call when it converts it)."""
    from slimkit.exporters import ExportConfig, export

    (tmp_path / "m").mkdir()
    export(slimkit.load(tiny("llama")), tmp_path / "m" / "tiny.gguf", ExportConfig("gguf", quantize="q4_1"))
    ways = {w.runtime: w for w in how_to_serve(tmp_path / "m" / "tiny.gguf", "m/tiny.gguf")}
    out = run_printed(tmp_path, ways["transformers (dequantized to float)"],
                      after="print(model.config.num_hidden_layers, model.config.vocab_size, tokenizer.vocab_size)")
    assert out.split() == ["2", "512", "512"]


def test_cli_commands_end_with_the_lines(tiny, tmp_path):
    proc = invoke_cli("prune", str(tiny("llama")), "--method", "magnitude", "--sparsity", "0.5", "--out", str(tmp_path / "p"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1] == f'lm = slimkit.load("{tmp_path / "p"}")'
    assert f'model = AutoModelForCausalLM.from_pretrained("{tmp_path / "p"}")' in lines  # zeroed weights: still plain transformers
    proc = invoke_cli("quantize", str(tiny("llama")), "--method", "int4-wo", "--out", str(tmp_path / "q"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert [w["runtime"] for w in json.loads(proc.stdout)["serve"]] == ["transformers", "slimkit"]  # int-quantized: not vLLM
