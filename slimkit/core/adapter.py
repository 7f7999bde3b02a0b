"""The architecture adapter: where a model keeps its blocks, projections, norms and head.

Techniques ask here and never match module names themselves. Each family is one
`Family` record of names relative to a block (or to the base model that holds the
blocks, or to the root for heads); supporting a new family is one more record in
`FAMILIES`, nothing else.

Recognition is by module names, not by `config.model_type`: a ModuleList whose
path ends in the family's `layers` and whose every block holds all the family's
block-relative modules. So a base model (LlamaModel, `layers`), a model under a
head (`model.layers`, `bert.encoder.layer`, `roberta.encoder.layer`) and a class
of the same layout that is not listed (Gemma's first generation is Llama-shaped)
are found alike. The cost: a family whose blocks carry the same names but are
wired differently needs its own, more specific record listed earlier (Gemma 2,
whose MLP reads `pre_feedforward_layernorm`, comes before Llama; Gemma 3's text
model has the same names and wiring, its q/k norms act within a head, and is
found as Gemma 2).

What `Adapter` answers, per block (`Block`): the attention projections q, k, v,
o (or a fused qkv), the MLP inputs (gate/up, a fused gate_up, or fc) and output
(down), the norm
whose output the attention inputs read and the norm whose output the MLP inputs
read, head_dim and the kv groups (grouped-query attention), and which layer's
output rows reach o's and down's input columns through a channel-wise operation
(v through attention, up through the gated product): `row_source`. For the model:
the block list, the final norm, the head and the norm that feeds it, the input
embeddings, and the config fields holding the layer count and the MLP width.

Pre-norm blocks read their own norms. In a post-norm block (BERT, OPT-350m) the
norm after each residual add feeds the next sublayer and the residual stream
too: the attention inputs of block i read block i-1's MLP norm (block 0 reads
the embeddings' norm), the MLP inputs read the block's attention norm. The
adapter says which norm is read; whether a scale folds into it exactly is for
the technique to check (it does not here: the residual also carries it).

Fused projections (Phi-3). A stacked qkv holds q's rows, then k's, then v's; a
stacked gate_up holds gate's rows, then up's (the forward splits them in equal
halves). Where the family says its fused layers are stacked, the adapter names
the rows of each part (`qkv_rows`, `mlp_rows`), so the techniques cut or scale
a head or a channel in the fused layer as in separate ones. GPT-2's c_attn and
GPT-NeoX's query_key_value (interleaved per head) are not read this way: their
heads stay whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.selection import linear_weight, set_module

FINAL = "<final>"  # in Family.reads: the norm after the last block


@dataclass(frozen=True)
class Family:
    """One layout, as names. Block-relative unless said otherwise; None where there is none."""

    name: str
    title: str  # for messages
    layers: str  # the ModuleList of blocks, relative to the base model
    o: str
    mlp_in: tuple[str, ...]  # input projections (gate, up; or fc)
    mlp_out: str  # output projection (down)
    attn_norm: str | None  # the norm of the attention sublayer (before it pre-norm, after the residual add post-norm)
    mlp_norm: str | None  # the same for the MLP
    head_dim: str  # attribute holding the head width
    embeddings: str  # relative to the base model
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # one fused projection instead of q, k, v
    mlp_up: str | None = None  # the MLP input whose rows reach mlp_out linearly (a gated MLP's up, or the fused gate_up)
    qkv_stacked: bool = False  # the fused qkv's rows are q's, k's, then v's, sized by the head counts
    mlp_parts: int = 1  # the MLP inputs' rows stack this many parts of one row per channel (gate_up: 2, up last)
    pre_norm: bool | str = True  # or the boolean config attribute that says it (OPT: do_layer_norm_before)
    embed_norm: str | None = None  # relative to the base model: what block 0 reads, post-norm
    final_norm: str | None = None  # relative to the base model: after the last block, pre-norm
    heads: tuple[str, ...] = ()  # relative to the root; the first present is the head
    reads: tuple[tuple[str, str], ...] = ()  # (layer outside the blocks, the norm it reads), relative to the root
    layer_count: str = "num_hidden_layers"  # config attributes
    mlp_width: str = "intermediate_size"
    prune_heads: bool = False  # whole heads can be sliced out (separate q, k, v, o and what follows)
    head_config: tuple[str, str, str] | None = None  # config attributes: query heads, kv heads, head_dim
    head_attrs: tuple[str, str] | None = None  # block attributes: head count, all heads' width
    kv_attr: str | None = None  # block attribute: the kv head count, where the forward splits the fused qkv by it
    shared_heads: bool = False  # the forward reads the query head count from the shared config: heads go alike in every block

    def block_names(self) -> tuple[str, ...]:
        names = (self.q, self.k, self.v, self.qkv, self.o, *self.mlp_in, self.mlp_out, self.attn_norm, self.mlp_norm)
        return tuple(n for n in names if n)


_LLAMA = dict(
    layers="layers", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj", mlp_up="mlp.up_proj",
    attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", head_dim="self_attn.head_dim",
    embeddings="embed_tokens", final_norm="norm", heads=("lm_head", "score"), reads=(("lm_head", FINAL), ("score", FINAL)),
    prune_heads=True, head_config=("num_attention_heads", "num_key_value_heads", "head_dim"),
)

FAMILIES: tuple[Family, ...] = (
    Family("gemma2", "Gemma 2 and 3", **{**_LLAMA, "mlp_norm": "pre_feedforward_layernorm"}),
    Family("llama", "Llama-family (Llama, Mistral, Qwen2, Qwen3)", **_LLAMA),
    Family(
        "phi3", "Phi-3", **{**_LLAMA, "q": None, "k": None, "v": None, "qkv": "self_attn.qkv_proj", "qkv_stacked": True,
                            "mlp_in": ("mlp.gate_up_proj",), "mlp_up": "mlp.gate_up_proj", "mlp_parts": 2,
                            "kv_attr": "self_attn.num_key_value_heads", "shared_heads": True},
    ),
    Family(
        "bert", "BERT-family (BERT, RoBERTa, XLM-R)", layers="encoder.layer",
        q="attention.self.query", k="attention.self.key", v="attention.self.value", o="attention.output.dense",
        mlp_in=("intermediate.dense",), mlp_out="output.dense",
        attn_norm="attention.output.LayerNorm", mlp_norm="output.LayerNorm", pre_norm=False,
        head_dim="attention.self.attention_head_size", embeddings="embeddings.word_embeddings", embed_norm="embeddings.LayerNorm",
        heads=("cls.predictions.decoder", "lm_head.decoder", "classifier.out_proj", "classifier"),
        reads=(("cls.predictions.transform.dense", FINAL), ("cls.predictions.decoder", "cls.predictions.transform.LayerNorm"),
               ("lm_head.dense", FINAL), ("lm_head.decoder", "lm_head.layer_norm")),
        prune_heads=True, head_attrs=("attention.self.num_attention_heads", "attention.self.all_head_size"),
    ),
    Family(
        "gpt2", "GPT-2", layers="h", qkv="attn.c_attn", o="attn.c_proj", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj",
        attn_norm="ln_1", mlp_norm="ln_2", head_dim="attn.head_dim", embeddings="wte", final_norm="ln_f",
        heads=("lm_head", "score"), reads=(("lm_head", FINAL), ("score", FINAL)), layer_count="n_layer", mlp_width="n_inner",
    ),
    Family(
        "opt", "OPT", layers="decoder.layers",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj", mlp_in=("fc1",), mlp_out="fc2",
        attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm", pre_norm="do_layer_norm_before",
        head_dim="self_attn.head_dim", embeddings="decoder.embed_tokens", final_norm="decoder.final_layer_norm",
        heads=("lm_head", "score"), reads=(("lm_head", FINAL), ("score", FINAL)), mlp_width="ffn_dim",
    ),
    Family(
        "gpt-neox", "GPT-NeoX", layers="layers", qkv="attention.query_key_value", o="attention.dense",
        mlp_in=("mlp.dense_h_to_4h",), mlp_out="mlp.dense_4h_to_h", attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
        head_dim="attention.head_size", embeddings="embed_in", final_norm="final_layer_norm",
        heads=("lm_head", "embed_out", "score"), reads=(("lm_head", FINAL), ("embed_out", FINAL), ("score", FINAL)),
    ),
)


@dataclass(frozen=True)
class Block:
    """One block's parts as qualified module names; None where the family has none."""

    name: str
    q: str | None
    k: str | None
    v: str | None
    qkv: str | None
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    mlp_up: str | None
    attn_norm: str | None  # the norm whose output q, k, v (or qkv) read
    mlp_norm: str | None  # the norm whose output the MLP inputs read
    head_dim: int
    qkv_stacked: bool = False
    mlp_parts: int = 1

    def attn_in(self) -> tuple[str, ...]:
        return (self.qkv,) if self.qkv else (self.q, self.k, self.v)

    def group_rows(self, g: int, per_group: int) -> tuple[slice, slice]:
        """Rows of q, and of k/v, that belong to kv group g (q's rows are also o's columns)."""
        hd = self.head_dim
        return slice(g * per_group * hd, (g + 1) * per_group * hd), slice(g * hd, (g + 1) * hd)


def _rows(model: nn.Module, name: str) -> int:
    return linear_weight(model.get_submodule(name)).shape[0]  # (out, in)


def _attribute(model: nn.Module, path: str):
    owner, _, attr = path.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


@dataclass(eq=False)
class Adapter:
    """A recognised model: its family, blocks and model-level parts (qualified names)."""

    family: Family
    model: nn.Module
    layers: str  # the ModuleList's path
    blocks: list[Block]
    final_norm: str | None  # the norm after the last block (post-norm: the last block's MLP norm)
    head: str | None
    embeddings: str
    reads: dict[str, str]  # layer outside the blocks -> the norm whose output it reads

    @property
    def layer_count(self) -> str:
        return self.family.layer_count

    @property
    def mlp_width(self) -> str:
        return self.family.mlp_width

    def block_of(self, name: str) -> str | None:
        """The block that holds module `name`, or None when it is outside every block."""
        prefix = self.layers + "."
        index = name[len(prefix):].split(".")[0] if name.startswith(prefix) else ""
        return f"{self.layers}.{index}" if index.isdigit() and int(index) < len(self.blocks) else None

    def norm_feeding(self, name: str) -> str | None:
        """The norm whose output layer `name` reads: attention and MLP inputs, and the head."""
        if name in self.reads:
            return self.reads[name]
        for b in self.blocks:
            if name in b.attn_in():
                return b.attn_norm
            if name in b.mlp_in:
                return b.mlp_norm
        return None

    def qkv_rows(self, b: Block) -> dict[str, tuple[str, torch.Tensor]] | None:
        """{"q", "k", "v": (layer, its output rows)}: each in its own layer, or its share of a
        stacked fused qkv (from the current shapes: o reads all query heads, k and v are alike);
        None where the heads of a fused qkv are not known here."""
        if b.q:
            return {p: (n, torch.arange(_rows(self.model, n))) for p, n in (("q", b.q), ("k", b.k), ("v", b.v))}
        if not b.qkv_stacked:
            return None
        q = linear_weight(self.model.get_submodule(b.o)).shape[1]  # (out, in): o's inputs are the query heads
        kv = (_rows(self.model, b.qkv) - q) // 2
        return {"q": (b.qkv, torch.arange(q)), "k": (b.qkv, torch.arange(q, q + kv)), "v": (b.qkv, torch.arange(q + kv, q + 2 * kv))}

    def kv_groups(self, b: Block) -> tuple[int, int]:
        """(kv groups, query heads per group) of a block whose heads are known (`qkv_rows`), from its current shapes."""
        rows = self.qkv_rows(b)
        n_kv = len(rows["k"][1]) // b.head_dim
        return n_kv, len(rows["q"][1]) // b.head_dim // n_kv

    def mlp_rows(self, b: Block, name: str, channels: torch.Tensor) -> torch.Tensor:
        """The output rows of MLP input `name` that carry MLP channels `channels`, (parts * len(channels),):
        the channels themselves, or their row in each stacked part (a fused gate_up: gate's, then up's)."""
        width = _rows(self.model, name) // b.mlp_parts
        return torch.cat([p * width + channels for p in range(b.mlp_parts)])

    def row_source(self, name: str) -> tuple[str, torch.Tensor] | None:
        """(producer, index): layer `name`'s input channel c is output row index[c] of
        `producer`, through a channel-wise operation (v -> attention -> o, up -> gate * up -> down);
        None for any other layer. index is (in_features of name,); the producer's other rows
        (a fused layer's q, k or gate) do not reach `name` this way."""
        for b in self.blocks:
            if name == b.o and (parts := self.qkv_rows(b)):
                n_kv, per = self.kv_groups(b)
                producer, v_rows = parts["v"]
                return producer, torch.cat([v_rows[b.group_rows(g, per)[1]].repeat(per) for g in range(n_kv)])  # (H * D,)
            if name == b.mlp_out and b.mlp_up:
                rows = _rows(self.model, b.mlp_up)
                return b.mlp_up, torch.arange(rows - rows // b.mlp_parts, rows)  # up is the last part
        return None

    def resize_heads_(self, b: Block, query_heads: int, kv_heads: int) -> None:
        """After heads were sliced out of block b: rewrite the attention's own head counts and
        width where its forward reads them (BERT's; Phi-3's kv count), in place. Counts the
        forward reads from the config are the config's to change (`Family.head_config`)."""
        if self.family.head_attrs:
            count, width = (f"{b.name}.{a}".rpartition(".") for a in self.family.head_attrs)
            setattr(self.model.get_submodule(count[0]), count[2], query_heads)
            setattr(self.model.get_submodule(width[0]), width[2], query_heads * b.head_dim)
        if self.family.kv_attr:
            owner, _, attr = f"{b.name}.{self.family.kv_attr}".rpartition(".")
            setattr(self.model.get_submodule(owner), attr, kv_heads)

    def keep_blocks_(self, keep: Sequence[int]) -> None:
        """Keep only blocks `keep` (in place), renumber their KV-cache slots and update the
        config's layer count and per-layer lists. This adapter is stale afterwards: ask again."""
        old = self.model.get_submodule(self.layers)
        kept = nn.ModuleList(old[i] for i in keep)
        for new_idx, block in enumerate(kept):
            for module in block.modules():  # KV-cache slots are indexed by layer_idx
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_idx
        set_module(self.model, self.layers, kept)
        cfg = self.model.config
        setattr(cfg, self.layer_count, len(keep))
        for key in ("layer_types", "sliding_window_pattern_list"):
            value = getattr(cfg, key, None)
            if isinstance(value, list) and len(value) == len(old):
                setattr(cfg, key, [value[i] for i in keep])


def _is_pre_norm(family: Family, config) -> bool:
    return family.pre_norm if isinstance(family.pre_norm, bool) else bool(getattr(config, family.pre_norm, True))


def _build(family: Family, model: nn.Module, path: str, modules: dict) -> Adapter:
    base = path[: len(path) - len(family.layers)]  # "model.", "bert.", "" ...

    def present(name: str | None) -> str | None:
        return name if name in modules else None

    pre = _is_pre_norm(family, getattr(model, "config", None))
    blocks = []
    for i in range(len(modules[path])):
        b = f"{path}.{i}"

        def inside(rel: str | None) -> str | None:
            return f"{b}.{rel}" if rel else None

        if pre:
            attn_norm, mlp_norm = inside(family.attn_norm), inside(family.mlp_norm)
        else:  # post-norm: each sublayer reads the norm after the previous residual add
            before = f"{path}.{i - 1}.{family.mlp_norm}" if i else present(family.embed_norm and base + family.embed_norm)
            attn_norm, mlp_norm = before, inside(family.attn_norm)
        blocks.append(Block(b, inside(family.q), inside(family.k), inside(family.v), inside(family.qkv), inside(family.o),
                            tuple(inside(n) for n in family.mlp_in), inside(family.mlp_out), inside(family.mlp_up),
                            attn_norm, mlp_norm, int(_attribute(model, inside(family.head_dim))), family.qkv_stacked, family.mlp_parts))
    final_norm = present(family.final_norm and base + family.final_norm) if pre else blocks[-1].name + "." + family.mlp_norm
    head = next((h for h in family.heads if h in modules), None)
    reads = {layer: final_norm if norm == FINAL else present(norm) for layer, norm in family.reads if layer in modules}
    return Adapter(family, model, path, blocks, final_norm, head, base + family.embeddings, {k: v for k, v in reads.items() if v})


def find(model: nn.Module) -> Adapter | None:
    """The model's adapter, or None when no family's layout matches."""
    modules = dict(model.named_modules())
    for path, mod in modules.items():
        if not isinstance(mod, nn.ModuleList) or not len(mod):
            continue
        for family in FAMILIES:
            if path != family.layers and not path.endswith("." + family.layers):
                continue
            if all(f"{path}.{i}.{n}" in modules for i in range(len(mod)) for n in family.block_names()):
                return _build(family, model, path, modules)
    return None


def adapter(model: nn.Module, purpose: str, way_out: str) -> Adapter:
    """The model's adapter; an unknown layout is a one-line error naming the families and `way_out`."""
    found = find(model)
    if found is None:
        titles = [f.title for f in FAMILIES]
        raise SlimkitError(
            f"{purpose} does not support {type(model).__name__}: it knows the blocks of {', '.join(titles[:-1])} and {titles[-1]}; {way_out}"
        )
    return found
