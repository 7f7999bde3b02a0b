"""Block by block: quantize or prune a model one transformer block at a time, so that memory
holds one block, never the model. (It lives below the techniques, which never import one
another, because quantization and pruning both walk.)

`walk(lm, ...)` yields each block of the model (through the architecture adapter,
`core.adapter`) for the technique to change in place. With a lazy model (its
weights still in their files, `io.lazy`) the block is read from the files first,
and with `stream` set, once the technique is done the block's tensors go to the
artifact's shards (`io.shards`) and the block goes back to the meta device. The
modules outside the blocks (embeddings, final norm, head) come last (`rest`).

Calibrated methods go block by block: `Inputs` holds the inputs of the block about
to be changed, for every calibration window; the method measures its statistics on
them (GPTQ's Hessians, AWQ's activation magnitudes, SmoothQuant's channel ranges,
static int8's observers, Wanda's input norms), runs the float block on them to
get the next block's inputs, and changes the block. `calibrate` is that loop for the
methods whose statistics are forward hooks on the block's layers (a `Collector`):
every method but AWQ, whose scale search runs the block itself. So the statistics are the
float model's, as in one pass of the whole model, and peak memory is one block's
weights plus one block's activations for the calibration windows. (Feeding each
block what the already quantized blocks produce instead, as the GPTQ paper does,
scored worse on SmolLM2-135M: GPTQ, 16 windows of 512 tokens, perplexity 15.117
against 14.925 from float inputs.) The
arguments the model passes each block besides its input (rotary position embeddings,
masks, which differ between layers in models with sliding windows; BERT and GPT-2
pass their masks positionally) are recorded once, in a forward pass in which every
block is replaced by a recorder that returns its input.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from slimkit.core.adapter import adapter, find
from slimkit.core.memory import release_memory
from slimkit.core.progress import track
from slimkit.core.selection import set_module
from slimkit.io.artifacts import own_tensors, write_config
from slimkit.io.lazy import materialize, offload, unload
from slimkit.io.model import LoadedModel, copy_model
from slimkit.io.shards import STREAM_SHARD_BYTES, ShardWriter

METHODS = ("int4-wo", "int4", "int8-wo", "nf4", "gptq", "awq", "int8", "int8-dynamic", "int8-static",
           "wanda", "magnitude")  # what walks block by block (and streams a lazy model): quantize, then prune methods
WAY_OUT = "quantize it with a method that needs no calibration (int4-wo, int8-wo, nf4)"


@dataclass
class Walk:
    """A model being changed block by block; see the module docstring."""

    lm: LoadedModel
    stream: ShardWriter | None = None
    dtype: torch.dtype | None = None  # what a lazy model's blocks are read as (None: the checkpoint's own)
    done: list[str] = field(default_factory=list)

    @property
    def lazy(self) -> bool:
        return self.lm.weights is not None

    def load(self, module: nn.Module, prefix: str, dtype: torch.dtype | None = None, skip: tuple[str, ...] = ()) -> None:
        if self.lazy:
            materialize(module, prefix, self.lm.weights, dtype or self.dtype, skip=tuple(self.done) + skip)

    def blocks(self, label: str) -> Iterator[tuple[str, nn.Module]]:
        """Each block's qualified name and module, read from the files when lazy; streamed out after.
        A model the adapter does not know has no blocks here: `rest` then holds all of it."""
        arch = find(self.lm.model)
        for b in track(arch.blocks if arch else [], label):
            block = self.lm.model.get_submodule(b.name)
            self.load(block, b.name)
            yield b.name, block
            self.finish_part(block, b.name)

    def finish_part(self, module: nn.Module, prefix: str) -> None:
        """A finished part of the model: to the shards (and out of memory) when streaming."""
        self.done.append(prefix)
        if self.stream is not None:
            self.stream.add(own_tensors(module, prefix))  # a block's tensors together: a module's tensors share a shard
            offload(module)
            release_memory()

    def outside(self, names) -> list[str]:
        """Those of `names` that lie in no block walked so far (a head, a pooler; all of them for an unknown layout)."""
        return [n for n in names if not any(n.startswith(p + ".") for p in self.done)]

    def rest(self, dtype: torch.dtype | None = None, *, head: bool = True, blocks: bool = True) -> nn.Module:
        """The model with everything outside the blocks read in (the blocks walked so far stay as they are);
        head=False leaves an untied head in the files (it is as large as the embedding), blocks=False
        the blocks not yet walked (before the walk: reading them would read the whole model)."""
        model = self.lm.model
        out, emb = model.get_output_embeddings(), model.get_input_embeddings()
        untied = out is not None and emb is not None and getattr(out, "weight", None) is not getattr(emb, "weight", None)
        skip = (next(n for n, m in model.named_modules() if m is out),) if not head and untied else ()
        if not blocks:
            arch = find(model)
            skip += tuple(b.name for b in arch.blocks) if arch else ()
        self.load(model, "", dtype, skip)
        return model

    def close(self) -> LoadedModel:
        """After the rest is done: stream it out and hand the model (with its written shards) back."""
        lm = self.lm
        if self.stream is not None:
            write_config(lm.model, self.stream.out)
            self.stream.add({k: v for k, v in own_tensors(lm.model).items() if not v.is_meta})  # the rest: the blocks went already
            self.stream.close()
            lm.staged = self.stream.out
            offload(lm.model)
        lm.weights = None
        return lm


def read_whole(lm: LoadedModel, method: str, device: str | None = None) -> LoadedModel:
    """`lm` ready for `method`: a lazy model is read from its files whole (once, no copy made, `donated`)
    for a method that does not go block by block, or to run on a GPU; anything else as it is."""
    if lm.weights is None or (method in METHODS and (device is None or device == "cpu")):
        return lm
    read = copy_model(lm, "")
    read.source, read.path, read.donated = lm.source, lm.path, True  # the same model, read: the method changes it in place
    return read


def start(lm: LoadedModel, stream: bool | str | Path) -> Walk:
    """A walk over `lm` (a technique's own copy); stream: write finished blocks to a staging directory
    (for `save`) instead of keeping them, which only a lazy model needs. A directory for `stream` says
    where to stage (the artifact's parent, so that `save` moves the files instead of copying them).
    The staging directory goes when `lm` does, so a technique that fails leaves nothing behind."""
    writer = None
    if stream and lm.weights is not None:
        where = Path(stream) if not isinstance(stream, bool) and Path(stream).is_dir() else None
        staged = Path(tempfile.mkdtemp(prefix=".slimkit-stream-", dir=where))
        weakref.finalize(lm, shutil.rmtree, staged, ignore_errors=True)
        writer = ShardWriter(staged, STREAM_SHARD_BYTES)
    return Walk(lm, writer, lm.dtype)


class _Record(nn.Module):
    """Stands in for a block while the keyword arguments the model passes it are recorded."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def forward(self, hidden, *args, **kwargs):
        self.calls.append((args, kwargs))  # models pass some positionally (BERT's and GPT-2's attention masks)
        return hidden


class _Stop(Exception):
    pass


class _Replay(nn.Module):
    """Stands in for the first block and returns the last block's output; the other blocks pass it on."""

    def __init__(self, hidden: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden, *args, **kwargs):
        return hidden if self.hidden is None else self.hidden.to(hidden.dtype)


@dataclass
class Inputs:
    """The current block's input for every calibration window, and what the model passes each block besides."""

    hidden: list[torch.Tensor]  # (B, T, H) per window
    calls: list[list[tuple[tuple, dict]]]  # [window][block]: the positional arguments after the hidden states, the keyword ones

    def call(self, block: nn.Module, index: int, w: int) -> torch.Tensor:
        """Block number `index`'s output on window w's input (in the block's own dtype: a model in memory may be bf16)."""
        args, kwargs = self.calls[w][index]
        x = self.hidden[w]
        dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), x.dtype)
        out = block(x.to(dtype), *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def run(self, block: nn.Module, index: int, before_each=None) -> None:
        """Replace the inputs by `block`'s outputs on them (the next block's inputs); `before_each()`
        is called before each window (hooks on the block can gather statistics meanwhile)."""
        with torch.inference_mode():
            for w in range(len(self.hidden)):
                if before_each is not None:
                    before_each()
                self.hidden[w] = self.call(block, index, w)


def model_inputs(batch: torch.Tensor | dict, device) -> dict:
    """A calibration batch as the model's keyword arguments: token ids (B, T), or a tokenizer's dict
    (an encoder's padded passages with their attention mask)."""
    batch = batch if isinstance(batch, dict) else {"input_ids": batch}
    return {k: v.to(device) for k, v in batch.items()}


def run_model(model: nn.Module, batch: torch.Tensor | dict, causal: bool):
    """The model's output on one calibration batch (no cache: nothing is generated)."""
    emb = model.get_input_embeddings()  # where the ids go: float, or int8 rows (buffers)
    args = model_inputs(batch, next((t.device for t in itertools.chain(emb.parameters(), emb.buffers()) if not t.is_meta), "cpu"))
    return model(**args, use_cache=False) if causal else model(**args)


def after_blocks(model: nn.Module, inputs: Inputs, batches: list, causal: bool) -> list:
    """One call per calibration window that runs what comes after the blocks (final norm, head, pooler:
    whatever the model's own forward does there) on the last block's output, and returns the model's
    output (logits, or the last hidden state) in fp32. The embeddings run too, and are thrown away."""
    arch = adapter(model, "block-by-block calibration", WAY_OUT)
    names = [b.name for b in arch.blocks]

    def window(w: int) -> torch.Tensor:
        real = [model.get_submodule(n) for n in names]
        try:
            for k, n in enumerate(names):
                set_module(model, n, _Replay(inputs.hidden[w] if k == 0 else None))
            out = run_model(model, batches[w], causal)
        finally:
            for n, block in zip(names, real):
                set_module(model, n, block)
        return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()

    return [lambda w=w: window(w) for w in range(len(batches))]


def first_inputs(walk: Walk, batches: list, causal: bool, dtype: torch.dtype = torch.float32) -> Inputs:
    """Block 0's inputs and what the model passes every block, for each calibration window (token ids, or a
    tokenizer's dict). `dtype`: what a lazy model's embeddings are read as."""
    emb = walk.lm.model.get_input_embeddings()
    read = walk.lazy and emb is not None and any(p.is_meta for p in emb.parameters())  # read from the files here, for this only
    model = walk.rest(dtype, head=False, blocks=False)  # the forward stops at the first block, the recorders at none
    arch = adapter(model, "block-by-block calibration", WAY_OUT)
    names = [b.name for b in arch.blocks]
    real = [model.get_submodule(n) for n in names]
    hidden, calls = [], []

    def stop(*_):
        raise _Stop

    try:
        for batch in batches:
            made: list = []
            for n in names:
                set_module(model, n, _Record(made))
            first = model.get_submodule(names[0])
            grab = first.register_forward_pre_hook(lambda m, args, kw: hidden.append(args[0] if args else kw["hidden_states"]), with_kwargs=True)
            last = model.get_submodule(names[-1]).register_forward_hook(stop)
            try:
                with torch.inference_mode():
                    run_model(model, batch, causal)
            except _Stop:
                pass
            finally:
                grab.remove()
                last.remove()
            calls.append([(args, {k: v for k, v in kw.items() if k != "hidden_states"}) for args, kw in made])
    finally:
        for n, block in zip(names, real):
            set_module(model, n, block)
    if read:  # the embedding (as large as a few blocks, in fp32) goes back to its file until the end of the walk
        unload(model, emb)
    return Inputs([h.float() for h in hidden], calls)


class Collector(Protocol):
    """Statistics that forward hooks on some layers gather while their part of the model runs its windows."""

    def next_window(self) -> None: ...

    def close(self) -> dict:  # layer -> its statistic; the hooks go
        ...


Collect = Callable[[nn.Module, list[str], dict], Collector]  # (part, its layers' names in it, what the passes before found)
Change = Callable[[nn.Module, str, list[str], dict], None]  # (part, its qualified name: "" for the model, its layers' names in it,
#                                                           what the last pass found): change them in place


def calibrate(walk: Walk, names: list[str], batches: list, causal: bool, passes: Sequence[Collect], change: Change, label: str,
              dtype: torch.dtype = torch.float32) -> None:
    """Change the layers `names` (qualified) part by part, each from statistics of the float model's inputs.

    For each block: each of `passes` hooks its collector on the block's selected layers and runs the block's
    calibration windows (the last pass also makes the next block's inputs), then `change` changes the block
    in place. Several passes serve a statistic that needs another first (static int8's observers read the
    inputs that SmoothQuant's channel ranges scale), and cost one run of the block each. Then the layers
    outside the blocks (an untied head that is not ignored, a pooler), on what the last block makes. A
    model the adapter does not know is one part: the whole model, run on each window. No passes: no
    calibration at all, the blocks are only walked (read, changed, streamed). `dtype`: what a lazy model's
    parts are read and run in; calibrated blocks run in it whatever the checkpoint holds.
    """
    if not passes:
        for prefix, block in walk.blocks(label):
            change(block, prefix, _under(names, prefix), {})
        rest = walk.rest()
        change(rest, "", walk.outside(names), {})
        return
    if find(walk.lm.model) is None:  # no blocks known: the whole model at once
        model = walk.rest(dtype)
        _passes(model, "", names, passes, [lambda b=b: run_model(model, b, causal) for b in batches], change)
        return
    inputs = first_inputs(walk, batches, causal, dtype)
    walk.dtype = dtype
    for i, (prefix, block) in enumerate(walk.blocks(label)):
        windows = [lambda w=w: inputs.call(block, i, w) for w in range(len(batches))]
        _passes(block, prefix, _under(names, prefix), passes, windows, change, advance=lambda c: inputs.run(block, i, c.next_window))
    outside = walk.outside(names)
    if outside:  # layers after the blocks read what the last block makes
        rest = walk.rest()
        _passes(rest, "", outside, passes, after_blocks(rest, inputs, batches, causal), change)
    inputs.hidden.clear()


def _under(names: list[str], prefix: str) -> list[str]:
    """The names inside the block `prefix`, relative to it."""
    return [n[len(prefix) + 1:] for n in names if n.startswith(prefix + ".")]


def _passes(part: nn.Module, prefix: str, names: list[str], passes: Sequence[Collect], windows: list, change: Change, advance=None) -> None:
    """Each pass over `part`'s windows (the last through `advance`, which also makes the next inputs), then `change`."""
    found: dict = {}
    for k, collect in enumerate(passes):
        last = k == len(passes) - 1
        if not names and not last:
            continue
        collector = collect(part, names, found)
        if last and advance is not None:
            advance(collector)  # even without layers here: the next block needs its inputs
        else:
            with torch.inference_mode():
                for window in windows if names else []:
                    collector.next_window()
                    window()
        found = collector.close()
    change(part, prefix, names, found)
