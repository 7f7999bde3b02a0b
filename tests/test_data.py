import json

import pytest
import torch

from slimkit.core import data as D
from slimkit.core.errors import SlimkitError


class CharTokenizer:
    """One token per character: makes window arithmetic easy to check."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 1000 for c in text]}


def test_embedded_splits_are_disjoint_deterministic_and_sized():
    parts = {s: list(D.TextSource.parse(None, s).texts()) for s in ("calibration", "evaluation", "heldout")}
    everything = list(D.TextSource.parse(None, "all").texts())
    sets = {s: set(t) for s, t in parts.items()}
    assert not sets["calibration"] & sets["evaluation"]
    assert not sets["calibration"] & sets["heldout"]
    assert not sets["evaluation"] & sets["heldout"]
    assert sum(len(t) for t in parts.values()) == len(everything)
    total = sum(map(len, everything))
    share = {s: sum(map(len, t)) / total for s, t in parts.items()}
    assert 0.5 < share["calibration"] < 0.7
    assert 0.08 < share["evaluation"] < 0.22
    assert 0.17 < share["heldout"] < 0.33
    assert parts["evaluation"] == list(D.TextSource.parse(None, "evaluation").texts())


def test_blocks_keep_whole_paragraphs():
    doc = "\n\n".join(f"paragraph {i} " + "x" * 300 for i in range(20))
    out = list(D.blocks([doc], block_chars=1000))
    assert len(out) > 3
    assert "\n\n".join(out) == doc
    assert all(len(b) >= 1000 for b in out[:-1])


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 8), (16, 5), (7, 1)])
def test_windows_score_each_token_once_with_context(window, stride):
    text = "".join(chr(97 + i % 26) for i in range(200))
    tok = CharTokenizer()
    stream = tok(text + "\n\n")["input_ids"]
    scored = []
    begin = 0
    for ids, n in D.lm_windows(tok, [text], window, stride):
        assert len(ids) <= window and 0 < n < len(ids)
        # locate the window in the stream and collect the absolute positions it scores
        while stream[begin : begin + len(ids)] != ids:
            begin += 1
        start = begin + len(ids) - n
        if scored:  # every scored token after the first window sees >= window - stride - 1 context
            assert start - begin >= min(window - stride, window - 1) - 1
        scored.extend(range(start, begin + len(ids)))
        begin += 1
    assert scored == sorted(set(scored))
    lost = len(stream) - 1 - len(scored)  # with stride == window each window's first token has no context
    assert lost == (0 if stride < window else (len(stream) - 1) // window)


def test_windows_respect_max_tokens():
    tok = CharTokenizer()
    windows = list(D.lm_windows(tok, ["abc" * 100], 32, 32, max_tokens=70))
    assert sum(len(w) for w, _ in windows) == 70


def test_lm_batches_stack_equal_lengths():
    windows = [([1] * 8, 7), ([2] * 8, 8), ([3] * 8, 8), ([4] * 3, 2)]
    batches = list(D.lm_batches(iter(windows), 2))
    assert [b[0].shape for b in batches] == [torch.Size([2, 8]), torch.Size([1, 8]), torch.Size([1, 3])]
    assert batches[0][1] == [7, 8]


def test_passages_merge_short_and_cut_long():
    text = "one two\n\n" + " ".join(["w"] * 30) + "\n\n" + " ".join(["z"] * 250)
    out = D.passages([text], min_words=20, max_words=100)
    assert out[0].startswith("one two w")
    assert max(len(p.split()) for p in out) <= 100
    assert sum(len(p.split()) for p in out) == 282


def test_passage_views_add_new_cuts_of_the_same_words():
    text = " ".join(f"w{i}" for i in range(1000))
    plain = D.passages([text], min_words=20, max_words=100)
    views = D.passage_views([text], 3, seed=1, min_words=20, max_words=100)
    assert views[: len(plain)] == plain  # the first view is the plain cut
    extra = views[len(plain):]
    assert extra and all(20 <= len(p.split()) <= 100 for p in extra)
    assert not set(extra) & set(plain)  # new offsets and lengths, not repeats
    assert views == D.passage_views([text], 3, seed=1, min_words=20, max_words=100)  # seeded
    assert D.passage_views([text], 1) == D.passages([text])
    with pytest.raises(SlimkitError, match="at least 1"):
        D.passage_views([text], 0)


def test_txt_and_jsonl_sources(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("First paragraph.\n\nSecond paragraph here.\n")
    assert "Second paragraph here." in "".join(D.TextSource.parse(str(txt)).texts())
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"record {i}", "label": i % 2}) for i in range(10)) + "\n")
    src = D.TextSource.parse(str(jl))
    assert len(list(src.texts())) == 10
    assert [r["label"] for r in src.records()][:3] == [0, 1, 0]


def test_calibration_batches_come_from_calibration_only(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    batches = list(D.calibration_batches(tok, seq_len=64, calibration_samples=8, batch_size=4))
    assert [b.shape for b in batches] == [torch.Size([4, 64])] * 2
    calib = "".join(D.TextSource.parse(None, "calibration").texts())
    assert tok.decode(batches[0][0][:20]) in calib


@pytest.mark.parametrize(
    "source,split,fragment",
    [
        ("missing.txt", None, "no such data file"),
        ("pydoc", "training", "unknown split"),
        ("hf:", None, "empty dataset name"),
    ],
)
def test_bad_sources(source, split, fragment):
    with pytest.raises(SlimkitError, match=fragment):
        D.TextSource.parse(source, split)


def test_bad_jsonl_line_names_the_line(tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(SlimkitError, match=r"bad.jsonl:2 is not valid JSON"):
        list(D.TextSource.parse(str(jl)).texts())
    jl.write_text('{"body": "no text field"}\n')
    with pytest.raises(SlimkitError, match="--text-key"):
        list(D.TextSource.parse(str(jl)).texts())


def _executable_head() -> bytes:
    import sys
    from pathlib import Path

    return Path(sys.executable).resolve().read_bytes()[:5000]


@pytest.mark.parametrize(
    "name,content,fragment",
    [
        ("program.txt", _executable_head(), r"program.txt is not text: byte \d+ is NUL"),
        ("utf16.jsonl", json.dumps({"text": "hi"}).encode("utf-16"), "utf16.jsonl is not text: byte 3 is NUL"),
        ("latin1.txt", "Voilà déjà l'été.\n".encode("latin-1") * 50, r"latin1.txt is not UTF-8 text: byte 4 \(0xe0\) is the first of 250 bytes"),
    ],
)
def test_files_that_are_not_text_are_refused_at_their_first_bad_byte(tmp_path, name, content, fragment):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SlimkitError, match=fragment) as info:
        D.TextSource.parse(str(tmp_path / name))
    assert "iconv -t UTF-8" in str(info.value)


def test_text_with_a_stray_byte_or_characters_across_read_chunks_is_accepted(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"plain words " * 1000 + b"\xff" + b" more words")  # one byte in 12,000: a stray, not an encoding
    assert "more words" in "".join(D.TextSource.parse(str(f)).texts())
    f.write_bytes("€".encode() * 400_000)  # 1.2 MB of 3-byte characters: one straddles the 1 MiB read
    D.check_text_file(f, tolerance=0)
    f.write_bytes(f.read_bytes()[:-1])  # the last one cut short
    with pytest.raises(SlimkitError, match="byte 1199997 .0xe2. is the first of 2 bytes"):
        D.check_text_file(f, tolerance=0)
