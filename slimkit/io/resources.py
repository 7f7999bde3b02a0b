"""Memory guard: estimate a command's peak memory before any weights are loaded.

    peak ~ 400 MiB + factor x parameters x 4 bytes

`--max-memory 4GiB` refuses a command whose estimate exceeds the limit (one
line, exit 2, nothing written); without it, an estimate above the memory
available now only prints a warning, since the estimate is rough and the
system may swap or free memory.

Parameters are counted from files, never by loading the model: an artifact's
or export's manifest (`parameters`), else the tensor shapes in the safetensors
headers, else (only with --max-memory: it takes seconds) the tensor records
of a GGUF file. A hub id is counted from the local Hugging Face cache, or
downloaded first when --max-memory asks for a check (loading would download
it next anyway). A source whose files cannot be read gets no estimate; loading
it then reports what is wrong.

4 bytes a parameter: slimkit works in fp32 (Hugging Face directories and GGUF
files load as fp32, quantize asks for fp32). Artifacts saved in bf16 or
quantized load as saved, so for them the estimate is an upper bound.

400 MiB is Python with torch, transformers and slimkit imported (measured:
245 MiB resident after the imports, 360 MiB quantizing a tiny model).

The factor counts the fp32 copies of the model alive at the command's peak.
In brackets, what was measured: (peak RSS - 400 MiB) / model size, for
SmolLM2-135M (513 MiB in fp32; all-MiniLM-L6-v2 for export) on one CPU
thread. Each factor is rounded up past its measurement, so the estimate errs
on the high side.

  eval      2.5, and 1.5 for a reference (3.4 for both). The model, one window's
            logits over the vocabulary and their log-softmax (100 MB each at
            512 tokens x 49k), and the reference run beside it.
  bench     2 (1.3). The model, the KV cache and the largest batch's activations.
  quantize  5 (2.0 int8-wo, 4.4 gptq). The original, the copy being quantized
            (techniques never change their input), calibration activations and
            Hessians.
  prune     5 (3.9 magnitude). The original, the pruned copy, importance scores
            and the sorted magnitudes that pick the threshold.
  export    6 (4.7). The model, the exported graph, the graph read back to write
            it as one file, and an ONNX Runtime session for the parity check.
  distill   6 (4.2 with a half-size student). The teacher, the student (at most
            the teacher's size), its gradients and two Adam moments, and the
            activations of both.
  training  6. qat, and prune with recovery: weights, gradients, two Adam
            moments, and the frozen original as the teacher.
  optimize  5. The original and a candidate evaluated side by side (as eval),
            after the candidate was built from a copy.
  run       5. A recipe's steps (as quantize), then eval against the original.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from slimkit.core.errors import SlimkitError
from slimkit.core.progress import console
from slimkit.io.model import MANIFEST
from slimkit.io.sources import EMBEDDED, HUB_ID, cached_snapshot, embedded_path, hub_snapshot, looks_like_path

BYTES_PER_PARAMETER = 4
RUNTIME_BYTES = 400 * 2**20
FACTORS = {"eval": 2.5, "bench": 2.0, "quantize": 5.0, "prune": 5.0, "export": 6.0, "distill": 6.0, "training": 6.0,
           "optimize": 5.0, "run": 5.0}
REFERENCE_FACTOR = 1.5  # a second model that is only run (eval's reference)

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512MiB', '4GiB', '4G', '4gb', '1024' (bytes) -> bytes. Units are powers of 1024."""
    m = _SIZE.match(text)
    if not m:
        raise SlimkitError(f"cannot read --max-memory '{text}': write a size such as 512MiB, 4GiB or 4G")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise SlimkitError(f"--max-memory must be more than 0 bytes, got '{text}': e.g. --max-memory 4GiB")
    return size


def human(n: float) -> str:
    """Bytes as the largest binary unit under 1024 of it: '1.5 GiB'."""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


@dataclass(frozen=True)
class Estimate:
    command: str
    source: str
    parameters: int
    factor: float
    bytes: int
    extra_parameters: int = 0  # models loaded once beside it (eval's reference)
    way_out: str = "raise the limit or choose a smaller model"

    def describe(self) -> str:
        extra = (f" + {self.extra_parameters / 1e6:.1f}M x {BYTES_PER_PARAMETER} x {REFERENCE_FACTOR:g} for the reference"
                 if self.extra_parameters else "")
        return (f"{self.command} of {self.source} needs about {human(self.bytes)} ({self.parameters / 1e6:.1f}M parameters x "
                f"{BYTES_PER_PARAMETER} bytes x {self.factor:g}{extra} + {human(RUNTIME_BYTES)} for Python and torch)")


def estimate(command: str, source: str, parameters: int, extra_parameters: int = 0) -> Estimate:
    """Peak bytes of `command` on a model of `parameters` (plus `extra_parameters` of a reference it runs)."""
    factor = FACTORS[command]
    total = RUNTIME_BYTES + int((factor * parameters + REFERENCE_FACTOR * extra_parameters) * BYTES_PER_PARAMETER)
    return Estimate(command, source, parameters, factor, total, extra_parameters)


def guard(command: str, source: str, max_memory: str | None, *, also: tuple[str | None, ...] = (), blockwise: dict | None = None) -> Estimate | None:
    """Refuse (`max_memory`) or warn (too little memory available) before `command` loads `source`.

    `also`: further models the command loads once each (eval's reference). `blockwise`: for a
    quantize method that goes block by block (`io.blockwise`), its calibration
    (`{"samples": n, "seq_len": t}`, or {} for none): the estimate is then one block's, see
    `blockwise_estimate`.
    """
    limit = parse_size(max_memory) if max_memory is not None else None
    est = blockwise_estimate(source, blockwise, command) if blockwise is not None else None
    if est is not None:
        return _check(est, limit, max_memory)
    counts = [parameters(s, thorough=limit is not None) for s in (source, *[a for a in also if a])]
    if any(c is None for c in counts):
        if limit is not None:
            console.print(f"[yellow]warning:[/] cannot count the parameters of {source} from its files: "
                          "--max-memory is not checked", highlight=False, soft_wrap=True)
        return None
    return _check(estimate(command, source, counts[0], sum(counts[1:])), limit, max_memory)


def _check(est, limit: int | None, max_memory: str | None):
    if limit is not None and est.bytes > limit:
        raise SlimkitError(f"{est.describe()}, over --max-memory {max_memory}: {est.way_out}")
    free = available()
    if free is not None and est.bytes > free:
        console.print(f"[yellow]warning:[/] {est.describe()}, but only {human(free)} is available: "
                      "it may swap or be killed; free memory or choose a smaller model", highlight=False, soft_wrap=True)
    return est


@dataclass(frozen=True)
class BlockwiseEstimate:
    """A command that goes block by block over a Hugging Face checkpoint: its peak is the largest of
    three stages (`blockwise_estimate`), each counted from the tensors in the safetensors headers."""

    command: str
    source: str
    parameters: int
    block: int  # parameters of the largest block
    outside: int  # parameters outside the blocks (embeddings, head, norms)
    activations: int  # bytes of the calibration windows' hidden states and one block's Hessians
    stages: dict  # stage -> bytes above the runtime's
    bytes: int
    way_out: str

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stages.get)

    def describe(self) -> str:
        stage = self.peak_stage
        what = {"block": f"one block, {self.block / 1e6:.0f}M parameters"
                         + (f", with {human(self.activations)} of calibration activations and Hessians" if self.activations else ""),
                "outside": f"the {self.outside / 1e6:.0f}M parameters outside the blocks (embeddings, head)",
                "save": "converting the written shards"}[stage]
        return (f"{self.command} of {self.source} ({self.parameters / 1e6:.1f}M parameters) block by block needs about {human(self.bytes)} at its peak ({what}, "
                f"+ {human(RUNTIME_BYTES)} for Python and torch)")


SAVE_FACTOR = 4.5  # x a staged shard: it, its compressed-tensors form (int8 codes: twice packed int4) and the read-back check
_BLOCK = re.compile(r"^(.*?\.(?:layers|h|layer|blocks)\.\d+)\.")
_EMBEDDING = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in)\.weight$")
_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def blockwise_estimate(source: str, calibration: dict, command: str = "quantize") -> BlockwiseEstimate | None:
    """Peak bytes of `command` going block by block over `source`, from its safetensors headers; None when
    they cannot be read. The peak is the runtime plus the largest of three stages, each with the shard
    queued for writing (`STREAM_SHARD_BYTES`, or the whole checkpoint if smaller):

      block    the block as read (fp32 when calibrating, else the checkpoint's dtype), its largest layer
               twice more in fp32 as it is rounded, and when calibrating the hidden states of every
               window (fp32), one window's activations, the Hessians of the block's inputs and
               GPTQ's working copies of the largest;
      outside  the embedding as read and as int8 rows, and an untied head as read and cast to fp32
               (a tied head is calibrated on the last block's outputs instead, which are then still held);
      save     converting one written shard to compressed-tensors (`SAVE_FACTOR`).

    Measured against it: `benchmarks/big_models.py` prints each run's estimate beside its peak."""
    from slimkit.io.shards import STREAM_SHARD_BYTES

    path = Path(source).expanduser() if source not in EMBEDDED else embedded_path(source)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() and not (path / MANIFEST).exists() else []
    if not files:
        return None
    try:
        tensors = {}  # name -> (elements, shape, bytes per element)
        for f in files:
            for name, e in _safetensors_header(f).items():
                shape = [int(d) for d in e["shape"]]
                tensors[name] = (math.prod(shape), shape, _DTYPE_BYTES[e["dtype"]])
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    blocks: dict[str, int] = {}
    dims: dict[int, int] = {}  # the smaller side of the blocks' matrices: mostly the hidden size
    layer = hidden = width = embedding = head = outside = 0
    stored = 2  # bytes per element of the blocks' matrices in the files
    for name, (count, shape, size) in tensors.items():
        m = _BLOCK.match(name)
        if m:
            blocks[m.group(1)] = blocks.get(m.group(1), 0) + count
            if len(shape) == 2:
                layer, stored, width = max(layer, count), size, max(width, *shape)
                dims[min(shape)] = dims.get(min(shape), 0) + 1
        else:
            outside += count
            if len(shape) == 2 and _EMBEDDING.search(name):
                embedding, hidden = max(embedding, count), shape[-1]
            elif len(shape) == 2 and count > head:
                head = count  # an untied head (a tied one is not in the files)
    if not blocks:
        return None
    block = max(blocks.values())
    hidden = hidden or max(dims, key=dims.get)
    samples, seq = calibration.get("samples", 0), calibration.get("seq_len", 0)
    read = 4 if samples else stored
    hidden_states = samples * seq * hidden * 4  # every window's, fp32: kept past the blocks for a tied head's calibration
    # one window's activations inside the block (attention and MLP), the Hessians of the block's distinct
    # inputs (q/k/v's, o's, gate/up's and down's), and GPTQ's working copies of the largest while it solves
    activations = (hidden_states + 8 * seq * width * 4 + (3 * hidden * hidden + width * width) * 4 + 4 * width * width * 4) if samples else 0
    shard = min(STREAM_SHARD_BYTES, sum(count * size for count, _, size in tensors.values()))  # a small model's one shard is smaller
    stages = {"block": shard + block * read + 2 * layer * 4 + activations,
              "outside": shard + embedding * (read + 1) + head * (read + 4) + (hidden_states if not head else 0),
              "save": int(SAVE_FACTOR * shard)}
    total = RUNTIME_BYTES + max(stages.values())
    way_out = ("pass fewer calibration windows (-o calibration_samples=N) or shorter ones (-o seq_len=N), or raise the limit"
               if samples and max(stages, key=stages.get) == "block" else "raise the limit")
    return BlockwiseEstimate(command, source, sum(blocks.values()) + outside, block, outside, activations, stages, total, way_out)


# --------------------------------------------------------------------------- counting


def parameters(source: str, *, thorough: bool = False) -> int | None:
    """Parameters of a model source, from its files only; None when they cannot be read.

    thorough: also read GGUF tensor records and download hub ids (seconds or more).
    """
    if source in EMBEDDED:
        path = embedded_path(source)  # a missing package is the same error loading would give
    else:
        path = Path(source).expanduser()
        if not path.exists():
            if looks_like_path(source) or not HUB_ID.match(source):
                return None
            if thorough:
                path = hub_snapshot(source)  # the same download (and errors) as loading
            else:
                path = cached_snapshot(source)
                if path is None:
                    return None
    try:
        if path.is_file():
            return _gguf_parameters(path) if thorough and path.suffix.lower() == ".gguf" else None
        if (path / MANIFEST).is_file():
            count = json.loads((path / MANIFEST).read_text()).get("parameters")
            return count if isinstance(count, int) and count > 0 else None
        files = sorted(path.glob("*.safetensors"))
        return sum(_safetensors_parameters(f) for f in files) if files else None
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def _safetensors_header(path: Path) -> dict[str, dict]:
    """Every tensor's entry (dtype, shape, offsets) in a safetensors file, from its JSON header (8-byte length, then the header)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > 100 * 2**20:
            raise ValueError("header too large")
        header = json.loads(fh.read(n))
    return {name: entry for name, entry in header.items() if name != "__metadata__"}


def _safetensors_parameters(path: Path) -> int:
    """Elements of every tensor in a safetensors file."""
    return sum(math.prod(int(d) for d in entry["shape"]) for entry in _safetensors_header(path).values())


def _gguf_parameters(path: Path) -> int | None:
    try:
        from gguf import GGUFReader

        return sum(int(t.n_elements) for t in GGUFReader(path).tensors)
    except Exception:  # noqa: BLE001 -- the reader raises many types on damaged files; loading reports them
        return None


# --------------------------------------------------------------------------- available memory


def available() -> int | None:
    """Bytes this process could still use: the system's available memory, capped by a cgroup (container) limit."""
    free = None
    try:
        import psutil

        free = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cap != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free if free is not None else 2**63, int(cap) - used)
    except (OSError, ValueError):
        pass
    return free
