import json

import pytest
import torch

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.io.artifacts import save


def _outputs(lm):
    ids = torch.arange(5, 45)[None]
    with torch.no_grad():
        out = lm.model(input_ids=ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "bert-cls"])
def test_round_trip_is_exact(tiny, tmp_path, arch):
    lm = slimkit.load(tiny(arch))
    out = save(lm, tmp_path / "a", metrics={"perplexity": 1.5})
    back = slimkit.load(str(out))
    assert back.kind == lm.kind and back.manifest["metrics"] == {"perplexity": 1.5}
    assert torch.equal(_outputs(lm), _outputs(back))
    manifest = json.loads((out / "slimkit.json").read_text())
    assert "model.safetensors" in manifest["files"] and manifest["format"] == "slimkit-artifact"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary directories left


def test_bf16_artifact_loads_as_bf16(tiny, tmp_path):
    lm = slimkit.load(tiny("llama"), dtype=torch.bfloat16)
    back = slimkit.load(str(save(lm, tmp_path / "a")))
    assert {p.dtype for p in back.model.parameters()} == {torch.bfloat16}
    assert torch.equal(_outputs(lm), _outputs(back))


def test_tampered_file_is_refused(tiny, tmp_path):
    out = save(slimkit.load(tiny("llama")), tmp_path / "a")
    cfg = json.loads((out / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SlimkitError, match="does not match its hash"):
        slimkit.load(str(out))


def test_missing_file_is_refused(tiny, tmp_path):
    out = save(slimkit.load(tiny("llama")), tmp_path / "a")
    (out / "model.safetensors").unlink()
    with pytest.raises(SlimkitError, match="missing model.safetensors"):
        slimkit.load(str(out))


def test_corrupt_manifest(tiny, tmp_path):
    out = save(slimkit.load(tiny("llama")), tmp_path / "a")
    (out / "slimkit.json").write_text("{")
    with pytest.raises(SlimkitError, match="unreadable"):
        slimkit.load(str(out))


def test_non_empty_destination_needs_overwrite(tiny, tmp_path):
    lm = slimkit.load(tiny("llama"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("mine")
    with pytest.raises(SlimkitError, match="--overwrite"):
        save(lm, tmp_path / "a")
    assert (tmp_path / "a" / "keep.txt").read_text() == "mine"
    save(lm, tmp_path / "a", overwrite=True)
    assert not (tmp_path / "a" / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_failed_save_leaves_nothing(tiny, tmp_path, monkeypatch):
    lm = slimkit.load(tiny("llama"))

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lm.tokenizer, "save_pretrained", boom)
    with pytest.raises(SlimkitError, match="free disk space"):
        save(lm, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_save_does_not_touch_the_callers_model(tiny, tmp_path):
    lm = slimkit.load(tiny("gpt2"))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    save(lm, tmp_path / "a")
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
