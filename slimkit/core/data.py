"""Text corpora, their deterministic splits, and the token windows models read.

Sources (`TextSource.parse`):
  * `pydoc` (the default): CPython's `pydoc_data.topics`, English technical
    prose shipped with every Python install, so slimkit works offline;
  * a `.txt` file (paragraphs separated by blank lines);
  * a `.jsonl` file, one JSON object a line with a `text` field (and a
    `label` field for classifiers);
  * `hf:NAME[:CONFIG[:SPLIT]]`, a Hugging Face dataset, streamed (online, and
    `pip install slimkit[datasets]`).

Splits. Documents are cut into blocks of consecutive paragraphs (about
`BLOCK_CHARS` characters) and each block goes to `calibration` (60%),
`evaluation` (15%) or `heldout` (25%) by a hash of its text. The split is
therefore deterministic, independent of the Python version's corpus order,
and the three parts never share a block. Calibration feeds quantizers,
pruners and training; evaluation measures quality; held-out stays untouched
for a final check after anything trained on calibration.

Everything streams: texts are read and tokenized lazily, so memory does not
grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from slimkit.core.errors import SlimkitError, short_reason

SPLITS = ("calibration", "evaluation", "heldout", "all")
_BOUNDS = {"calibration": (0, 60), "evaluation": (60, 75), "heldout": (75, 100), "all": (0, 100)}
BLOCK_CHARS = 2000
EMBEDDED_CORPUS = "pydoc"
NOT_UTF8_TOLERANCE = 0.001  # bytes that are not UTF-8, as a fraction of a data file, before it is refused
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # where surrogateescape put them


@dataclass(frozen=True)
class TextSource:
    """Where text comes from, and which split of it to use."""

    kind: str  # "pydoc" | "txt" | "jsonl" | "hf"
    location: str
    split: str
    text_key: str = "text"
    label_key: str = "label"

    @classmethod
    def parse(cls, source: str | None = None, split: str | None = None, text_key: str = "text") -> "TextSource":
        """Build from a user string; split defaults to `evaluation` for the
        embedded corpus and `all` for the user's own files."""
        if split is not None and split not in SPLITS:
            raise SlimkitError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
        if source in (None, "", EMBEDDED_CORPUS):
            return cls("pydoc", EMBEDDED_CORPUS, split or "evaluation", text_key)
        if source.startswith("hf:"):
            if len(source) <= 3:
                raise SlimkitError("empty dataset name: write hf:NAME[:CONFIG[:SPLIT]]")
            return cls("hf", source[3:], split or "all", text_key)
        path = Path(source).expanduser()
        if not path.is_file():
            raise SlimkitError(f"no such data file: {source}; pass a .txt or .jsonl file, 'pydoc' or hf:NAME")
        suffix = path.suffix.lower()
        if suffix not in (".txt", ".jsonl", ".md"):
            raise SlimkitError(f"unsupported data file {source}: use .txt (plain text) or .jsonl (one {{\"text\": ...}} a line)")
        check_text_file(path)
        return cls("jsonl" if suffix == ".jsonl" else "txt", str(path), split or "all", text_key)

    @property
    def name(self) -> str:
        return f"{self.location}[{self.split}]"

    # ------------------------------------------------------------------ text

    def texts(self) -> Iterator[str]:
        """The split's blocks of text, streamed."""
        lo, hi = _BOUNDS[self.split]
        for block in blocks(self._documents()):
            if lo <= bucket(block) < hi:
                yield block

    def records(self) -> Iterator[dict]:
        """Whole JSON records (for labeled data); a record is never cut into blocks."""
        if self.kind not in ("jsonl", "hf"):
            raise SlimkitError(f"{self.location} has no labels: pass a .jsonl file with '{self.text_key}' and '{self.label_key}' fields")
        lo, hi = _BOUNDS[self.split]
        for rec in self._records():
            if lo <= bucket(str(rec.get(self.text_key, ""))) < hi:
                yield rec

    def _documents(self) -> Iterator[str]:
        if self.kind == "pydoc":
            from pydoc_data.topics import topics

            for key in sorted(topics):
                yield topics[key]
        elif self.kind == "txt":
            yield from _paragraph_documents(Path(self.location))
        else:
            for rec in self._records():
                text = rec.get(self.text_key)
                if not isinstance(text, str):
                    raise SlimkitError(
                        f"a record in {self.location} has no string '{self.text_key}' field: "
                        f"add it or choose the field with --text-key"
                    )
                yield text

    def _records(self) -> Iterator[dict]:
        if self.kind == "jsonl":
            with open(self.location, encoding="utf-8", errors="replace") as fh:  # the few bad bytes check_text_file lets through
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError as exc:
                        raise SlimkitError(f"{self.location}:{lineno} is not valid JSON ({short_reason(exc)}): fix that line") from exc
                    if not isinstance(rec, dict):
                        raise SlimkitError(f"{self.location}:{lineno} is not a JSON object: write one {{\"text\": ...}} object a line")
                    yield rec
        else:
            yield from _hf_records(self.location)


def check_text_file(path: Path, tolerance: float = NOT_UTF8_TOLERANCE) -> None:
    """Refuse a file that is not UTF-8 text, naming the offset of its first bad byte.

    Read as text, anything decodes (bad bytes become U+FFFD) and gets a score:
    5 KB of an executable had perplexity 50,566 and no error. A NUL byte (binary
    files, UTF-16 text) refuses the file; so do bytes that are not UTF-8 beyond
    `tolerance` of the file's size (a stray byte passes, another encoding does not).
    Read in chunks, so memory does not grow with the file.
    """
    size = path.stat().st_size
    allowed = int(size * tolerance)
    fix = "pass a UTF-8 text file (convert another encoding with iconv -t UTF-8)"
    bad, first, offset, carry = 0, None, 0, b""  # offset: where `data` starts in the file
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            data = carry + chunk
            nul = data.find(b"\0")
            if nul >= 0:
                raise SlimkitError(f"{path} is not text: byte {offset + nul} is NUL, as in binary files: {fix}")
            end = len(data) - (_incomplete_tail(data) if chunk else 0)
            text = data[:end].decode("utf-8", "surrogateescape")  # each bad byte -> one of U+DC80..U+DCFF
            if first is None and (found := _NOT_UTF8.search(text)):
                first = offset + len(text[: found.start()].encode("utf-8", "surrogateescape"))
                value = ord(found.group()) - 0xDC00
            bad += len(_NOT_UTF8.findall(text))
            if bad > allowed:
                raise SlimkitError(f"{path} is not UTF-8 text: byte {first} (0x{value:02x}) is the first of {bad}"
                                   f"{' or more' if fh.tell() < size else ''} bytes that are not UTF-8: {fix}")
            if not chunk:
                return
            carry, offset = data[end:], offset + end


def _incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of `data` begin a UTF-8 sequence that the next chunk completes."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # a lead byte or ASCII, not a continuation byte
            need = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
            return back if need > back else 0
    return 0


def _paragraph_documents(path: Path) -> Iterator[str]:
    """A text file as documents of up to ~BLOCK_CHARS, read line by line."""
    buf: list[str] = []
    size = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            buf.append(line)
            size += len(line)
            if size >= 8 * BLOCK_CHARS and not line.strip():
                yield "".join(buf)
                buf, size = [], 0
    if buf:
        yield "".join(buf)


def _hf_records(spec: str) -> Iterator[dict]:
    parts = spec.split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "train")
    try:
        import datasets
    except ImportError as exc:
        raise SlimkitError("Hugging Face datasets need the extra: pip install 'slimkit[datasets]'") from exc
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:
        raise SlimkitError(
            f"cannot open dataset '{name}' ({short_reason(exc)}): check the name and that you are "
            "online, or pass a local .txt/.jsonl file"
        ) from exc
    yield from ds


def blocks(documents: Iterable[str], block_chars: int = BLOCK_CHARS) -> Iterator[str]:
    """Cut documents into blocks of whole paragraphs of about `block_chars`."""
    for doc in documents:
        buf: list[str] = []
        size = 0
        for para in re.split(r"\n\s*\n", doc):
            para = para.strip("\n")
            if not para.strip():
                continue
            buf.append(para)
            size += len(para)
            if size >= block_chars:
                yield "\n\n".join(buf)
                buf, size = [], 0
        if buf:
            yield "\n\n".join(buf)


def bucket(text: str) -> int:
    """A stable number in [0, 100) from a text's content."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") % 100


# --------------------------------------------------------------------------- tokens


def token_stream(tokenizer, texts: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each text, blocks separated by a blank line."""
    for text in texts:
        ids = tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        if ids:
            yield ids


def lm_windows(
    tokenizer,
    texts: Iterable[str],
    window: int,
    stride: int,
    max_tokens: int | None = None,
) -> Iterator[tuple[list[int], int]]:
    """Sliding windows over the token stream, for perplexity.

    Yields (ids, n_scored): `ids` is at most `window` tokens, and only its last
    `n_scored` tokens are predictions not scored in an earlier window, so each
    token of the stream is scored once, with at least `window - stride` tokens
    of context (except at the start). The first token of the stream has no
    prediction and is never scored.
    """
    if not 0 < stride <= window:
        raise SlimkitError(f"stride must be in 1..window ({window}), got {stride}")
    buf: list[int] = []  # tokens from `begin` on
    begin = prev_end = 0  # absolute positions in the stream
    total = 0
    exhausted = False
    stream = token_stream(tokenizer, texts)
    while True:
        while not exhausted and len(buf) < window:
            try:
                ids = next(stream)
            except StopIteration:
                exhausted = True
                break
            if max_tokens is not None:
                ids = ids[: max(0, max_tokens - total)]
                exhausted = total + len(ids) >= max_tokens
            buf.extend(ids)
            total += len(ids)
        if not buf:
            return
        end = begin + min(window, len(buf))
        n_scored = end - max(prev_end, begin + 1) if begin == 0 else end - prev_end
        n_scored = min(n_scored, end - begin - 1)  # a window's first token has no context
        if n_scored > 0:
            yield buf[: end - begin], n_scored
        prev_end = end
        if exhausted and end - begin == len(buf):
            return
        buf = buf[stride:]
        begin += stride


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def lm_batches(windows: Iterable[tuple[list[int], int]], batch_size: int) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Stack windows of equal length into (input_ids (B, L), n_scored per row)."""
    pending: list[tuple[list[int], int]] = []
    for ids, n in windows:
        if pending and (len(pending) == batch_size or len(ids) != len(pending[0][0])):
            yield torch.tensor([p[0] for p in pending]), [p[1] for p in pending]
            pending = []
        pending.append((ids, n))
    if pending:
        yield torch.tensor([p[0] for p in pending]), [p[1] for p in pending]


def passages(texts: Iterable[str], min_words: int = 20, max_words: int = 120, limit: int | None = None) -> list[str]:
    """Paragraph-sized passages (for embeddings and retrieval), in stream order.

    Short paragraphs are merged until they reach `min_words`; long ones are cut
    every `max_words`.
    """
    out: list[str] = []
    for text in texts:
        words: list[str] = []
        for para in text.split("\n\n"):
            words.extend(para.split())
            if len(words) >= min_words:
                out.extend(" ".join(words[i : i + max_words]) for i in range(0, len(words), max_words))
                words = []
        if words:
            out.append(" ".join(words))
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def passage_views(texts: Iterable[str], views: int, seed: int = 0, min_words: int = 20, max_words: int = 120,
                  limit: int | None = None) -> list[str]:
    """`passages()` of `texts`, then `views - 1` further cuts of the same words.

    Each further view starts every text at a random word offset and cuts it at
    random lengths between `min_words` and `max_words` (seeded), so training
    that passes over a small split many times meets new passages, and new
    lengths, rather than the same ones again.
    """
    if views < 1:
        raise SlimkitError(f"text views must be at least 1, got {views}")
    texts = list(texts)
    out = passages(texts, min_words, max_words)
    rng = random.Random(seed)
    for _ in range(views - 1):
        for text in texts:
            words = text.split()
            i = rng.randrange(min_words)
            while i + min_words <= len(words):
                n = rng.randint(min_words, max_words)
                out.append(" ".join(words[i : i + n]))
                i += n
    return out[:limit] if limit is not None else out


def calibration_batches(tokenizer, source: TextSource | None = None, seq_len: int = 512, calibration_samples: int = 64, batch_size: int = 4) -> Iterator[torch.Tensor]:
    """Non-overlapping (B, seq_len) token batches from the calibration split."""
    source = source or TextSource.parse(None, "calibration")
    windows = lm_windows(tokenizer, source.texts(), seq_len, seq_len, max_tokens=seq_len * calibration_samples)
    full = (w for w in windows if len(w[0]) == seq_len)
    count = 0
    for ids, _ in lm_batches(full, batch_size):
        count += 1
        yield ids
    if count == 0:
        raise SlimkitError(
            f"calibration data {source.name} is shorter than one sequence of {seq_len} tokens: "
            "give more text or a smaller sequence length"
        )


def require_nonempty(count: int, source: TextSource, what: str = "text") -> None:
    if count == 0:
        raise SlimkitError(f"dataset {source.name} has no {what}: pass a file with non-empty text or another split")


def calibration_source(data: TextSource | str | None) -> TextSource | None:
    """What a technique calibrates on: a TextSource as given, a user's string as its calibration split, None as None."""
    if data is None or isinstance(data, TextSource):
        return data
    return TextSource.parse(data, "calibration")
