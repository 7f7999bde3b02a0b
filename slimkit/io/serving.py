"""How to serve what slimkit wrote: the exact lines that load it in each runtime that can.

`how_to_serve(path)` looks only at the files on disk, so it stays right whatever wrote
them and whatever formats are added later:

  *.gguf                              llama.cpp (`llama-cli`, `llama-server`), Ollama (a
                                      Modelfile `FROM` the file), transformers (`gguf_file=`)
  genai_config.json                   onnxruntime-genai (`og.Model(dir)`)
  model.onnx (or the manifest's graph) ONNX Runtime (not sentence-transformers' `backend="onnx"`:
                                      its Optimum needs transformers < 4.58, slimkit 5)
  the manifest's TensorRT engine      `trtexec --loadEngine`
  *.safetensors + config.json         transformers `from_pretrained`, vLLM for causal LMs
                                      (not for weight-only layers stored one int8 per
                                      weight: vLLM reads those only packed),
                                      sentence-transformers where modules.json is present;
                                      only when config.json describes the whole model:
                                      no quantization_config, or one whose quant_method is
                                      "compressed-tensors" (transformers and vLLM read it).
                                      Any other quant_method, and artifacts whose manifest
                                      records modules config.json lacks (slimkit's own
                                      quantized layers, non-uniformly pruned shapes), load
                                      only in slimkit: a plain loader would fail or, worse,
                                      build something else.
  anything slimkit can read           `slimkit.load(path)`, always listed last.

Paths are written as the caller names them (`shown`), quoted for the language of each
snippet, so the lines can be pasted as they are.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from slimkit.core.arch import CAUSAL_LM, CLASSIFIER, ENCODER, detect_kind
from slimkit.io.artifacts import OWN_LAYOUT, RECORDS, read_manifest
from slimkit.io.files import read_config
from slimkit.io.model import MANIFEST

COMPRESSED_TENSORS = "compressed-tensors"
AUTO_CLASS = {CAUSAL_LM: "AutoModelForCausalLM", ENCODER: "AutoModel", CLASSIFIER: "AutoModelForSequenceClassification"}


@dataclass(frozen=True)
class Serving:
    """One runtime's way to load the model: lines of `language` (python or shell), and what to install."""

    runtime: str
    language: str
    lines: tuple[str, ...]
    requires: str = ""  # e.g. "pip install vllm"; empty where slimkit's own dependencies suffice

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "language": self.language, "lines": list(self.lines), "requires": self.requires}


def how_to_serve(path: str | os.PathLike, shown: str | os.PathLike | None = None) -> list[Serving]:
    """The ways to load the model at `path`, most direct first, `slimkit.load` last.

    `shown`: how the lines spell the path (default: `path` as given), for a directory
    that will be renamed into place, or a path relative to where the user stands.
    """
    path = Path(path)
    where = os.fspath(shown if shown is not None else path)
    if path.is_file():
        found = _gguf(path, where) if path.suffix.lower() == ".gguf" else []
        return found + [_slimkit(where)]
    manifest = read_manifest(path) if (path / MANIFEST).is_file() else {}
    found: list[Serving] = []
    for gguf in sorted(path.glob("*.gguf")):
        found += _gguf(gguf, os.path.join(where, gguf.name))
    export = manifest.get("export") or {}
    graph = export.get("graph", "model.onnx")
    if (path / "genai_config.json").is_file():  # its graph is built for the genai runtime's generator
        found.append(_genai(where))
    elif (path / graph).is_file():
        found += _onnx(path, where, graph, manifest)
    if export.get("engine") and (path / export["engine"]).is_file():
        engine = shlex.quote(os.path.join(where, export["engine"]))
        found.append(Serving("TensorRT", "shell", (f"trtexec --loadEngine={engine}",), "TensorRT 10 on a CUDA GPU"))
    why = ""
    if manifest.get("runtime", "torch") == "torch" and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        plain, why = plain_loadable(path, manifest)
        found += _transformers(path, where, manifest) if plain else []
    return found + [_slimkit(where, why)]


def serving_lines(ways: list[Serving]) -> list[str]:
    """The ways as plain lines: a `# runtime (install)` comment, then the runtime's lines."""
    out = []
    for w in ways:
        out.append(f"# {w.runtime}" + (f"  ({w.requires})" if w.requires else ""))
        out.extend(w.lines)
    return out


def plain_loadable(path: Path, manifest: dict) -> tuple[bool, str]:
    """Whether config.json describes every weight in `path` (so plain loaders build the right model), and if not, why."""
    if "layout" in manifest:  # a slimkit artifact says which layout it was saved in, and why not a standard one
        only = manifest["layout"] == OWN_LAYOUT
        return not only, f"slimkit's own layout: {manifest.get('slimkit_only') or 'no standard equivalent'}" if only else ""
    config = json.loads((path / "config.json").read_text())
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method == COMPRESSED_TENSORS:
        return True, ""
    if method is not None:
        return False, f"config.json's quant_method '{method}' is not compressed-tensors, the one transformers and vLLM are known to read"
    recorded = [key for key in RECORDS if manifest.get(key)]
    if recorded:
        return False, f"config.json does not describe the layers listed under {', '.join(map(repr, recorded))} in {MANIFEST}"
    return True, ""


def _py(text: str) -> str:
    return json.dumps(text)


def _transformers(path: Path, where: str, manifest: dict) -> list[Serving]:
    kind = manifest.get("kind") or detect_kind(read_config(path))
    config = json.loads((path / "config.json").read_text())
    quantized = (config.get("quantization_config") or {}).get("quant_method") == COMPRESSED_TENSORS
    cls, d = AUTO_CLASS[kind], _py(where)
    use = {
        CAUSAL_LM: 'print(tokenizer.decode(model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=20)[0]))',
        ENCODER: 'hidden = model(**tokenizer(["Hello"], return_tensors="pt")).last_hidden_state',
        CLASSIFIER: 'print(model.config.id2label[int(model(**tokenizer(["Hello"], return_tensors="pt")).logits.argmax())])',
    }[kind]
    ways = []
    if (path / "modules.json").is_file():  # its pooling and normalization are what the embeddings mean
        ways.append(Serving("sentence-transformers", "python", (
            "from sentence_transformers import SentenceTransformer",
            f"model = SentenceTransformer({d})",
            'embeddings = model.encode(["Hello"])',
        ), "pip install compressed-tensors" if quantized else ""))
    ways.append(Serving("transformers", "python", (
        f"from transformers import {cls}, AutoTokenizer",
        f"model = {cls}.from_pretrained({d})",
        f"tokenizer = AutoTokenizer.from_pretrained({d})",
        use,
    ), "pip install compressed-tensors" if quantized else ""))
    refused = vllm_refuses(config)
    if kind == CAUSAL_LM and refused:
        ways[-1] = Serving("transformers", "python", ways[-1].lines + (f"# not vLLM: {refused}",), ways[-1].requires)
    elif kind == CAUSAL_LM:
        ways.append(Serving("vLLM server", "shell", (f"vllm serve {shlex.quote(where)}",), "pip install vllm"))
        ways.append(Serving("vLLM", "python", (
            "from vllm import LLM",
            f"llm = LLM({d})",
            'print(llm.generate("Hello")[0].outputs[0].text)',
        ), "pip install vllm"))
    return ways


def vllm_refuses(config: dict) -> str:
    """Why vLLM cannot read this config.json's compressed-tensors layers, or "".

    vLLM reads weight-only layers packed (pack-quantized) and int8 x int8 layers
    (int-quantized with activations); weight-only layers stored one int8 per weight
    (int-quantized: asymmetric grids, quantized embeddings) it has no scheme for."""
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != COMPRESSED_TENSORS:
        return ""
    for group in (quant.get("config_groups") or {}).values():
        if group.get("input_activations") is None and (group.get("format") or quant.get("format")) != "pack-quantized":
            return ("it reads weight-only layers packed, and these store one int8 per weight (asymmetric grids or quantized "
                    "embeddings): quantize with symmetric=true and embeddings=false for vLLM")
    return ""


def _gguf(file: Path, where: str) -> list[Serving]:
    """llama.cpp and Ollama read a GGUF file as it is; transformers dequantizes it to float."""
    name = re.sub(r"[^a-z0-9._-]+", "-", file.stem.lower()).strip("-.") or "model"
    shown = Path(where)
    explicit = shown.is_absolute() or where.startswith(("./", "../"))
    modelfile = where if explicit else f"./{where}"  # Ollama reads FROM relative to the Modelfile, written here
    return [
        Serving("llama.cpp", "shell", (f"llama-cli -m {shlex.quote(where)}", f"llama-server -m {shlex.quote(where)} --port 8080")),
        Serving("Ollama", "shell", (f"printf 'FROM %s\\n' {shlex.quote(modelfile)} > Modelfile",
                                    f"ollama create {name} -f Modelfile",
                                    f"ollama run {name} Hello")),
        Serving("transformers (dequantized to float)", "python", (
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"model = AutoModelForCausalLM.from_pretrained({_py(str(shown.parent))}, gguf_file={_py(shown.name)})",
            f"tokenizer = AutoTokenizer.from_pretrained({_py(str(shown.parent))}, gguf_file={_py(shown.name)})",
        ), "pip install gguf"),
    ]


def _genai(where: str) -> Serving:
    return Serving("onnxruntime-genai", "python", (
        "import onnxruntime_genai as og",
        f"model = og.Model({_py(where)})",
        "tokenizer = og.Tokenizer(model)",
        "params = og.GeneratorParams(model)",
        "params.set_search_options(max_length=64)",
        "generator = og.Generator(model, params)",
        'generator.append_tokens(tokenizer.encode("Hello"))',
        "while not generator.is_done():",
        "    generator.generate_next_token()",
        "print(tokenizer.decode(generator.get_sequence(0)))",
    ), "pip install onnxruntime-genai")


def _onnx(path: Path, where: str, graph: str, manifest: dict) -> list[Serving]:
    """ONNX Runtime runs the graph itself; an encoder's graph takes exactly what its tokenizer returns."""
    spec = (manifest.get("export") or {}).get("graph_spec") or {}
    inputs = spec.get("inputs") or []
    file = _py(os.path.join(where, graph))
    lines = ["import onnxruntime as ort", f"session = ort.InferenceSession({file})"]
    if spec.get("kind") in (ENCODER, CLASSIFIER) and (path / "tokenizer_config.json").is_file():
        lines += ["from transformers import AutoTokenizer",
                  f"tokenizer = AutoTokenizer.from_pretrained({_py(where)})",
                  'batch = tokenizer(["Hello"], return_tensors="np")',
                  f"(output,) = session.run(None, {{name: batch[name] for name in {inputs!r}}})"]
    elif inputs:
        lines.append(f"# inputs: {', '.join(inputs)}")
    return [Serving("ONNX Runtime", "python", tuple(lines))]


def _slimkit(where: str, why: str = "") -> Serving:
    """`why`: the reason plain loaders cannot read it, said with the way to a runtime that can."""
    lines = ("import slimkit", f"lm = slimkit.load({_py(where)})")
    if why:
        lines = (f"# only slimkit reads this model ({why}); `slimkit export` it for ONNX Runtime, onnxruntime-genai or llama.cpp (--format gguf)",) + lines
    return Serving("slimkit", "python", lines)
