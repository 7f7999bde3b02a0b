"""Encoders stay sentence-transformers models: the pooling and normalisation files travel
through every technique and export, sentence-transformers itself loads the outputs and
embeds as slimkit does, and evaluation pools as the model says."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import slimkit
from slimkit.io.sentence import pooling_modes, read_layout
from slimkit.measure.quality import embed, pool

TEXTS = [
    "The interpreter reads a module once and keeps it in memory.",
    "A short one.",
    "Tuples are immutable sequences, typically used to store collections of heterogeneous data items.",
]
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def sentence_model(tiny, root, pooling: str, transformer_dir: str = ""):
    """The tiny random BERT as a sentence-transformers directory pooling by `pooling` (legacy boolean form)."""
    path = root / f"st-{pooling}"
    shutil.copytree(tiny("bert"), path / transformer_dir)
    modules = [dict(MODULES[0], path=transformer_dir), *MODULES[1:]]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean"}))
    (path / transformer_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    return path


@pytest.fixture(scope="module")
def cls_dir(tiny, tmp_path_factory):
    return sentence_model(tiny, tmp_path_factory.mktemp("sentence"), "cls")


def st_embeddings(path, **kw) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu", **kw)
    return torch.as_tensor(model.encode(TEXTS, convert_to_numpy=True))


def assert_same(a: torch.Tensor, b: torch.Tensor, floor: float = 0.9999):
    cos = F.cosine_similarity(a, b, dim=-1)
    assert cos.min().item() >= floor, cos


def test_pool_matches_sentence_transformers_pooling_for_every_mode():
    from sentence_transformers.models import Pooling

    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16)  # (B, T, H)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    for modes in (("cls",), ("mean",), ("max",), ("mean_sqrt_len_tokens",), ("weightedmean",), ("lasttoken",), ("cls", "mean")):
        ref = Pooling(16, pooling_mode=modes if len(modes) > 1 else modes[0])
        want = ref({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
        torch.testing.assert_close(pool(hidden, mask, modes), want, msg=str(modes))


def test_pooling_mode_is_read_in_both_config_forms(cls_dir, tmp_path):
    assert pooling_modes(read_layout(cls_dir)) == ("cls",)
    assert pooling_modes({}) == ("mean",)  # an encoder without the layout
    new = tmp_path / "new"
    shutil.copytree(cls_dir, new)
    (new / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 64, "pooling_mode": ["max", "mean"]}))
    assert pooling_modes(read_layout(new)) == ("max", "mean")


def test_evaluation_pools_a_cls_model_with_cls(cls_dir):
    lm = slimkit.load(str(cls_dir))
    enc = lm.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = lm.model(**enc).last_hidden_state  # (B, T, H)
    cls = F.normalize(hidden[:, 0], dim=-1)
    mean = F.normalize((hidden * enc["attention_mask"][..., None]).sum(1) / enc["attention_mask"].sum(1, keepdim=True), dim=-1)
    with torch.no_grad():
        got = embed(lm, TEXTS)
    torch.testing.assert_close(got, cls)
    assert F.cosine_similarity(got, mean).min() < 0.99  # the two poolings differ on this model: the test can tell them apart
    assert_same(got, st_embeddings(cls_dir))


@pytest.mark.parametrize("step", ["float", "magnitude", "structured", "distill"])
def test_sentence_transformers_loads_every_float_output(cls_dir, tmp_path, step):
    lm = slimkit.load(str(cls_dir))
    if step == "magnitude":
        lm = slimkit.prune(lm, "magnitude", sparsity=0.3)
    elif step == "structured":
        lm = slimkit.prune(lm, "structured", mlp_channels=32, calibration_samples=4, seq_len=32)
    elif step == "distill":
        lm = slimkit.distill(lm, student_layers=1, steps=1, seq_len=32, batch_size=2, eval_batches=1, max_samples=4)
    out = slimkit.save(lm, tmp_path / "out")
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file() and (out / "2_Normalize").is_dir()
    with torch.no_grad():
        ours = embed(slimkit.load(str(out)), TEXTS)
    assert_same(st_embeddings(out), ours)
    if step == "float":  # nothing changed: the same vectors as the original directory
        assert_same(st_embeddings(cls_dir), ours)


def test_quantized_artifact_carries_the_layout_and_keeps_its_pooling(cls_dir, tmp_path):
    out = slimkit.save(slimkit.quantize(str(cls_dir), "int8-wo"), tmp_path / "q")
    assert json.loads((out / "modules.json").read_text())[1]["path"] == "1_Pooling"
    assert pooling_modes(slimkit.load(str(out)).sentence) == ("cls",)


def test_onnx_export_loads_with_the_onnx_backend(cls_dir, tmp_path):
    pytest.importorskip("optimum.onnxruntime", reason="sentence-transformers' ONNX backend needs optimum-onnx")
    out = slimkit.export(str(cls_dir), tmp_path / "onnx", slimkit.ExportConfig("onnx"))
    with torch.no_grad():
        ours = embed(slimkit.load(str(cls_dir)), TEXTS)
    assert_same(st_embeddings(out, backend="onnx"), ours)


def test_export_carries_the_layout_and_is_pooled_as_the_model_says(cls_dir, tmp_path):
    out = slimkit.export(str(cls_dir), tmp_path / "onnx", slimkit.ExportConfig("onnx"))
    served = slimkit.load(str(out))  # served by ONNX Runtime
    assert pooling_modes(served.sentence) == ("cls",)
    with torch.no_grad():
        assert_same(embed(served, TEXTS), embed(slimkit.load(str(cls_dir)), TEXTS))


def test_a_transformer_in_a_subfolder_is_not_carried(tiny, tmp_path):
    """The old layout keeps the weights in 0_Transformer/: they must not travel to load in place of the new ones."""
    path = sentence_model(tiny, tmp_path, "mean", transformer_dir="0_Transformer")
    shutil.copy(path / "0_Transformer" / "config.json", path / "config.json")
    files = read_layout(path)
    assert not any(name.startswith("0_Transformer") for name in files)
    assert json.loads(files["modules.json"])[0]["path"] == ""
    assert "sentence_bert_config.json" in files


@pytest.mark.slow
def test_minilm_keeps_its_mean_pooling_and_normalize(tmp_path):
    lm = slimkit.load("minilm-l6")
    assert pooling_modes(lm.sentence) == ("mean",)
    out = slimkit.save(lm, tmp_path / "minilm")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize"]
    with torch.no_grad():
        assert_same(torch.as_tensor(st.encode(TEXTS)), embed(lm, TEXTS))
