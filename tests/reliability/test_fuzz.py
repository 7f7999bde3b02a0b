"""Property-based tests of the data and file-format code."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.core import data as D
from slimkit.core.errors import SlimkitError
from slimkit.io.files import check_safetensors
from slimkit.measure.speed import latency_stats


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


@settings(max_examples=150, deadline=None)
@given(
    n_chars=st.integers(0, 300),
    window=st.integers(2, 40),
    stride_frac=st.floats(0.01, 1.0),
    max_tokens=st.one_of(st.none(), st.integers(2, 400)),
)
def test_windows_cover_the_stream_once(n_chars, window, stride_frac, max_tokens):
    stride = max(1, int(window * stride_frac))
    text = "".join(chr(65 + (i * 7) % 50) for i in range(n_chars))
    stream = [ord(c) for c in text + "\n\n"] if n_chars else []
    if max_tokens is not None:
        stream = stream[:max_tokens]
    windows = list(D.lm_windows(CharTokenizer(), [text] if n_chars else [], window, stride, max_tokens))
    scored = sum(n for _, n in windows)
    assert all(len(ids) <= window and 0 < n < len(ids) for ids, n in windows)
    n = len(stream)
    if stride < window:  # every token but the first is scored exactly once
        assert scored == max(0, n - 1)
    else:  # disjoint windows: each window's first token has no context
        assert scored == n - -(-n // window)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_check_safetensors_only_raises_user_errors(tmp_path_factory, blob):
    f = tmp_path_factory.mktemp("st") / "x.safetensors"
    f.write_bytes(blob)
    try:
        check_safetensors(f)
    except SlimkitError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.integers(0, 2**40), max_size=4))
def test_check_safetensors_with_json_headers(tmp_path_factory, entries):
    import json

    header = json.dumps({k: {"dtype": "F32", "shape": [1], "data_offsets": [0, v]} for k, v in entries.items()}).encode()
    f = tmp_path_factory.mktemp("st") / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    try:
        check_safetensors(f)
    except SlimkitError:
        pass


@given(st.lists(st.text(alphabet="ab \n", max_size=60), max_size=8), st.integers(1, 30), st.integers(1, 50))
def test_passages_keep_every_word(texts, min_words, max_words):
    out = D.passages(texts, min_words=min_words, max_words=max(max_words, min_words))
    assert sum(len(p.split()) for p in out) == sum(len(t.split()) for t in texts)


@given(st.lists(st.floats(1e-6, 10.0), min_size=1, max_size=300))
def test_latency_percentiles_are_ordered(samples):
    s = latency_stats(samples)
    assert min(samples) * 1000 <= s.p50 <= s.p90 <= s.p99 <= max(samples) * 1000 + 1e-9
