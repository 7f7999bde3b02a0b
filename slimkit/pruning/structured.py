"""Structured pruning that physically removes units: attention heads, MLP
channels and whole layers. Weight tensors are sliced, `in_features` /
`out_features` and the config are updated, and the pruned model runs with
smaller matrices, so it is faster on any runtime (unlike zeroed weights).

Units
  heads   attention heads, in whole key/value groups: under grouped-query
          attention (Llama, SmolLM2: 9 query heads share 3 kv heads) a group
          is one kv head plus the query heads that read it; removing the group
          removes its rows of q/k/v and its columns of o, so every layer keeps
          the same query-per-kv ratio. BERT's heads are groups of one. Phi-3's
          stacked qkv_proj loses the same rows of its q, k and v parts; its
          attention reads the query head count from the config, so its heads
          go alike in every layer (uniform, all layers targeted). Other fused
          q/k/v (GPT-2's c_attn, GPT-NeoX) and OPT are not supported for heads.
  mlp     intermediate channels: a row of each input projection (gate/up, or
          BERT's intermediate.dense, GPT-2's c_fc; both halves of Phi-3's
          gate_up_proj) and a column of the output projection (down_proj,
          output.dense, c_proj).
  layers  whole decoder/encoder blocks (the residual stream passes through).

Which modules make up each unit, and the config fields that size them, come
from the architecture adapter (`core.adapter`: Llama-family, Gemma 2 and 3,
Phi-3, BERT-family, GPT-2, OPT, GPT-NeoX); the slicing and the refit are in `removal.py`.

What to remove is decided by an importance criterion (`importance.py`)
summed over each unit's weights, on calibration batches. For layers, the
activation criterion uses block influence (1 - cosine of a block's input and
output hidden states; Men et al. 2024): blocks that barely change the stream go first.

`sparsity` is the fraction of the model's parameters removed (embeddings
included; `of="blocks"` counts the transformer blocks' parameters alone, for
models whose embeddings are most of their size), split across the chosen units
in proportion to their size. A sparsity the units cannot reach (every layer
keeps a head group and a channel) is refused with the largest one they can.
The default prunes MLP channels only: on SmolLM2, removing 25% of parameters
one-shot as one of three kv groups per layer plus MLP channels gave perplexity
828 (fp32: 17.8, 1,024 evaluation tokens), as MLP channels alone 41; a GQA
group is a coarse, costly unit in a small model. `uniform=True` prunes every layer alike, so the smaller model is described
by its config alone and loads with plain `from_pretrained`; `uniform=False`
ranks units across layers (at least one head group and one channel stay per
layer) and the artifact records the per-layer shapes.

Refit (`refit=True`, the default): the projection that loses inputs (the MLP's
output projection, `o_proj` when heads go) is refitted by ridge least squares
on the calibration activations, so the kept channels stand in for the removed
ones. With uniform shapes, MLP channels are then also chosen for the refit:
Optimal Brain Surgeon on the output projection's input Gram matrix
(`removal.obs_keep`) removes, one at a time, the channel the others can best take over;
`importance` then only ranks heads and layers. MiniLM with 30% of MLP channels
cut, one-shot embedding cosine: 0.822 sliced by importance, 0.966 refitted,
0.981 chosen by OBS and refitted; SmolLM2 with 25% of parameters cut,
perplexity 34.6 sliced -> 20.3 refitted (fp32 14.4). Recovery training
(`recover_minutes`) can follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.core.adapter import Adapter, Block, adapter
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Context, register
from slimkit.core.selection import check_patterns, linear_weight, matches
from slimkit.io.model import LoadedModel, copy_model
from slimkit.pruning import common, importance
from slimkit.pruning.recovery import RecoveryConfig, recover
from slimkit.pruning.removal import obs_keep, remove_head_groups, remove_mlp_channels

UNITS = ("heads", "mlp", "layers")
OF = ("model", "blocks")  # what `sparsity` is a fraction of
DEFAULT_SPARSITY = 0.25
UNSUPPORTED = "use method magnitude, wanda or 2:4 instead"


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class StructuredConfig:
    sparsity: float | None = None  # fraction of parameters removed (default 0.25 when no amount below is given)
    of: str = "model"  # sparsity counts all the model's parameters, or (blocks) its transformer blocks' alone
    units: tuple[str, ...] = ("mlp",)  # any of heads, mlp; or layers alone
    head_groups: int | None = None  # kv groups to remove per layer (explicit amount)
    mlp_channels: int | None = None  # MLP channels to remove per layer (explicit amount)
    layers: int | None = None  # whole blocks to remove (explicit amount)
    importance: str = "activation"
    uniform: bool = True  # same shapes in every layer (plain from_pretrained loads it)
    targets: tuple[str, ...] = ("*",)  # patterns over block names, e.g. model.layers.1*
    ignore: tuple[str, ...] = ()
    calibration_samples: int = 128
    seq_len: int = 256
    batch_size: int = 4
    refit: bool = True  # least-squares refit of the projections that lose inputs (down_proj, o_proj); uniform MLP cuts chosen by OBS
    recover_minutes: float = 0.0
    recovery: str = "finetune"  # or "distill" (logit KD from the unpruned model)

    def __post_init__(self):
        explicit = [v for v in (self.head_groups, self.mlp_channels, self.layers) if v is not None]
        if self.sparsity is not None:
            common.check_sparsity(self.sparsity)
            if explicit:
                raise SlimkitError("give either sparsity or explicit amounts (head_groups, mlp_channels, layers), not both")
        for name in ("head_groups", "mlp_channels", "layers"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise SlimkitError(f"{name} must be a whole number >= 0, got {v!r}")
        if isinstance(self.units, str) or not self.units or any(u not in UNITS for u in self.units):
            raise SlimkitError(f"units must be a list drawn from {', '.join(UNITS)}, got {self.units!r}")
        if "layers" in self.units and len(self.units) > 1:
            raise SlimkitError("prune layers alone, or heads and/or mlp: units=('layers',) or ('heads', 'mlp')")
        importance.get(self.importance)
        check_patterns(self.targets, self.ignore)
        common.check_calibration(self.calibration_samples, self.seq_len, self.batch_size)
        common.check_minutes(self.recover_minutes)
        if self.of not in OF:
            raise SlimkitError(f"of={self.of!r}: sparsity counts the parameters of the 'model' (embeddings included) or of its 'blocks'")
        if self.recovery not in ("finetune", "distill"):
            raise SlimkitError(f"unknown recovery '{self.recovery}': use 'finetune' or 'distill'")


# --------------------------------------------------------------------------- planning


def _arch(net) -> Adapter:
    return adapter(net, "structured pruning", UNSUPPORTED)


def _w(model, name) -> torch.Tensor:
    return linear_weight(model.get_submodule(name))  # (out, in)


def _attn(b: Block) -> list[str]:
    """The attention projections: q, k, v (or the fused qkv) and o."""
    return [*b.attn_in(), b.o]


def _mlp(b: Block) -> list[str]:
    return [*b.mlp_in, b.mlp_out]


def _check_heads(arch: Adapter) -> None:
    if not arch.family.prune_heads:
        fused = f"fused {arch.blocks[0].qkv.rpartition('.')[2]} " if arch.blocks[0].qkv else "attention "
        raise SlimkitError(f"{arch.family.title}'s {fused}heads cannot be pruned here: use units=('mlp',) or ('layers',)")


def _check_shared_heads(arch: Adapter, blocks: list[Block], config: StructuredConfig) -> None:
    """Heads of a family whose attention reads the head count from the one config go alike in every layer."""
    if arch.family.shared_heads and (not config.uniform or len(blocks) != len(arch.blocks)):
        raise SlimkitError(f"{arch.family.title}'s attention reads its head count from the config, so heads are pruned "
                           "alike in every layer: use uniform=True (--uniform) and targets that match every layer, or units=('mlp',)")


def plan_amounts(model, arch: Adapter, blocks: list[Block], config: StructuredConfig, total_params: int) -> dict:
    """Per-layer amounts {heads, mlp, layers} to remove, from explicit amounts or `sparsity`."""
    if any(v is not None for v in (config.head_groups, config.mlp_channels, config.layers)):
        amounts = {"heads": config.head_groups or 0, "mlp": config.mlp_channels or 0, "layers": config.layers or 0}
        problem = _problem(model, arch, blocks, amounts)
        if problem:
            raise SlimkitError(f"{problem}: remove fewer")
        return amounts
    total = sparsity_base(arch, config.of, total_params)
    sparsity = DEFAULT_SPARSITY if config.sparsity is None else config.sparsity
    amounts = _from_sparsity(model, arch, blocks, config.units, sparsity * total)
    problem = _problem(model, arch, blocks, amounts)
    if problem:
        of = ("of its blocks' parameters" if config.of == "blocks" else
              "of all its parameters, embeddings included; --of blocks (of='blocks') counts the blocks' alone")
        raise SlimkitError(f"--sparsity {sparsity}: {problem}; the largest --sparsity this model allows with units "
                           f"{', '.join(config.units)} is {_largest(model, arch, blocks, config.units, sparsity, total):.2f} ({of})")
    return amounts


def _largest(model, arch, blocks, units, sparsity: float, total: int) -> float:
    """The largest sparsity below `sparsity`, to the hundredth, whose amounts fit (they grow with it: the first going down)."""
    for hundredths in range(round(sparsity * 100), 0, -1):
        if not _problem(model, arch, blocks, _from_sparsity(model, arch, blocks, units, hundredths / 100 * total)):
            return hundredths / 100
    return 0.0


def sparsity_base(arch: Adapter, of: str, total_params: int) -> int:
    """The parameters `sparsity` is a fraction of: the whole model's, or its transformer blocks'."""
    return total_params if of == "model" else sum(p.numel() for p in arch.model.get_submodule(arch.layers).parameters())


def _numel(model, names) -> int:
    return sum(p.numel() for n in names for p in model.get_submodule(n).parameters(recurse=False))


def _from_sparsity(model, arch, blocks, units, target) -> dict:
    b0, L = blocks[0], len(blocks)
    out = {"heads": 0, "mlp": 0, "layers": 0}
    if "layers" in units:
        per_block = sum(p.numel() for p in model.get_submodule(b0.name).parameters())
        out["layers"] = round(target / per_block)
        return out
    if "heads" in units:
        _check_heads(arch)
    channels = _w(model, b0.mlp_out).shape[1]
    cost_c = _numel(model, _mlp(b0)) / channels  # params per MLP channel
    mlp_params = _numel(model, _mlp(b0))
    if "heads" in units:
        n_kv, _ = arch.kv_groups(b0)
        attn_params = _numel(model, _attn(b0))
        cost_g = attn_params / n_kv
        share = attn_params / (attn_params + mlp_params) if "mlp" in units else 1.0
        out["heads"] = round(target * share / (cost_g * L))
        target -= out["heads"] * cost_g * L
    if "mlp" in units:
        out["mlp"] = max(0, round(target / (cost_c * L)))
    return out


def _problem(model, arch, blocks, amounts) -> str | None:
    """Why the amounts cannot be removed (every layer keeps a head group and a channel), or None."""
    n_layers = len(arch.blocks)
    if amounts["layers"] >= n_layers:
        return f"cannot remove {amounts['layers']} of {n_layers} layers"
    if amounts["layers"] > len(blocks):
        return f"only {len(blocks)} layers match targets; cannot remove {amounts['layers']}"
    if amounts["heads"]:
        _check_heads(arch)
    for b in blocks:
        if amounts["heads"]:
            n_kv, per = arch.kv_groups(b)
            if amounts["heads"] >= n_kv:
                kind = f"kv head groups ({n_kv * per} query heads)" if per > 1 else "heads"
                return f"cannot remove {amounts['heads']} of the {n_kv} {kind} of layer {b.name}, which needs at least one"
        channels = _w(model, b.mlp_out).shape[1]
        if amounts["mlp"] >= channels:
            return f"cannot remove {amounts['mlp']} of the {channels} MLP channels of {b.name}, which needs at least one"
    return None


# --------------------------------------------------------------------------- scoring


def unit_scores(arch: Adapter, b: Block, scores: dict) -> dict[str, torch.Tensor]:
    """Summed element scores per head group (n_kv,) and per MLP channel (channels,)."""
    out = {}
    if b.mlp_out in scores:
        s = scores[b.mlp_out].sum(0)  # (channels,): columns of the output projection
        channels = torch.arange(len(s))
        for n in b.mlp_in:  # rows of each input projection, in each of its stacked parts
            s = s + scores[n].sum(1)[arch.mlp_rows(b, n, channels)].reshape(-1, len(s)).sum(0)
        out["mlp"] = s
    parts = arch.qkv_rows(b)
    if parts and parts["q"][0] in scores:
        n_kv, per = arch.kv_groups(b)
        (q, q_rows), (k, k_rows), (v, v_rows) = parts["q"], parts["k"], parts["v"]
        g_scores = []
        for g in range(n_kv):
            qs, ks = b.group_rows(g, per)
            g_scores.append(scores[q][q_rows[qs]].sum() + scores[k][k_rows[ks]].sum() + scores[v][v_rows[ks]].sum() + scores[b.o][:, qs].sum())
        out["heads"] = torch.stack(g_scores)  # (n_kv,)
    return out


def block_influence(lm: LoadedModel, arch: Adapter, batches) -> torch.Tensor:
    """1 - mean cosine(input, output) of each block's hidden states: (n_layers,)."""
    layers = lm.model.get_submodule(arch.layers)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers))

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
            sums[i] += (1 - cos).sum().double()
            counts[i] += cos.numel()

        return fn

    handles = [blk.register_forward_hook(hook(i), with_kwargs=True) for i, blk in enumerate(layers)]
    try:
        with torch.inference_mode():
            for batch in batches:
                common.forward(lm, batch)
    finally:
        for h in handles:
            h.remove()
    return (sums / counts.clamp(min=1)).float()


def _choose_removals(per_block: list[torch.Tensor], amount: int, uniform: bool) -> list[list[int]]:
    """Indices to remove in each block: the `amount` lowest per block, or (non-uniform)
    the amount * blocks lowest across blocks, keeping at least one unit per block."""
    if uniform:
        return [s.argsort()[:amount].tolist() for s in per_block]
    flat = sorted((float(s[i]), b, i) for b, s in enumerate(per_block) for i in range(len(s)))
    budget = amount * len(per_block)
    removed: list[list[int]] = [[] for _ in per_block]
    for _, b, i in flat:
        if budget == 0:
            break
        if len(removed[b]) < len(per_block[b]) - 1:
            removed[b].append(i)
            budget -= 1
    return removed


# --------------------------------------------------------------------------- apply


@register("structured", "prune", StructuredConfig, "physically remove heads (GQA-aware), MLP channels or layers; really faster")
def apply(model: LoadedModel, config: StructuredConfig, ctx: Context = Context()) -> LoadedModel:
    lm = copy_model(model, "structured")
    net = lm.model
    arch = _arch(net)
    blocks = [b for b in arch.blocks if matches(b.name, config.targets) and not matches(b.name, config.ignore)]
    if not blocks:
        raise SlimkitError(
            f"no layers to prune: none of {arch.layers}.* matches targets {list(config.targets)} without matching "
            f"ignore {list(config.ignore)}; check the patterns"
        )
    before = lm.num_parameters()
    blocks_before = sparsity_base(arch, "blocks", before)
    amounts = plan_amounts(net, arch, blocks, config, before)
    if amounts["heads"]:
        _check_shared_heads(arch, blocks, config)
    crit = importance.get(config.importance)
    get_batches = common.calibration(lm, config, ctx)

    if amounts["layers"]:
        if crit.name == "activation":
            layer_scores = block_influence(lm, arch, get_batches())
        else:
            names = {n: net.get_submodule(n) for b in arch.blocks for n in _attn(b) + _mlp(b)}
            el = importance.module_scores(crit, lm, names, get_batches)
            layer_scores = torch.stack([sum(el[n].sum() for n in _attn(b) + _mlp(b)) / _numel(net, _attn(b) + _mlp(b)) for b in arch.blocks])
        index = {b.name: i for i, b in enumerate(arch.blocks)}
        candidates = sorted((float(layer_scores[index[b.name]]), index[b.name]) for b in blocks)
        drop = {i for _, i in candidates[: amounts["layers"]]}
        arch.keep_blocks_([i for i in range(len(arch.blocks)) if i not in drop])
        arch = _arch(net)  # renumbered blocks
        blocks = [b for b in arch.blocks if matches(b.name, config.targets) and not matches(b.name, config.ignore)]
    if amounts["heads"] or amounts["mlp"]:
        surgeon = config.refit and config.uniform  # MLP channels chosen by OBS, not by importance
        names = {}
        for b in blocks:
            for n in (_attn(b) if amounts["heads"] else []) + (_mlp(b) if amounts["mlp"] and not surgeon else []):
                names[n] = net.get_submodule(n)
        el = importance.module_scores(crit, lm, names, get_batches) if names else {}
        units = [unit_scores(arch, b, el) for b in blocks]
        grams = {}
        if config.refit:  # inputs of the projections that lose features, before anything is cut
            consumers = [b.mlp_out for b in blocks if amounts["mlp"]] + [b.o for b in blocks if amounts["heads"]]
            grams = common.input_grams(lm, {n: net.get_submodule(n) for n in consumers}, get_batches())
        if amounts["mlp"] and surgeon:
            for b in blocks:
                gram = grams[b.mlp_out]
                remove_mlp_channels(arch, b, obs_keep(net.get_submodule(b.mlp_out), gram, amounts["mlp"]), gram)
        elif amounts["mlp"]:
            drops = _choose_removals([u["mlp"] for u in units], amounts["mlp"], config.uniform)
            for b, drop in zip(blocks, drops):
                n = _w(net, b.mlp_out).shape[1]
                remove_mlp_channels(arch, b, torch.tensor([i for i in range(n) if i not in set(drop)]), grams.get(b.mlp_out))
        if amounts["heads"]:
            drops = _choose_removals([u["heads"] for u in units], amounts["heads"], config.uniform)
            for b, drop in zip(blocks, drops):
                n_kv, _ = arch.kv_groups(b)
                remove_head_groups(arch, b, [g for g in range(n_kv) if g not in set(drop)], grams.get(b.o))
        grams = None
    sync_config(arch)
    if config.recover_minutes > 0:
        recover(lm, model, RecoveryConfig(minutes=config.recover_minutes, mode=config.recovery), ctx)
    after = lm.num_parameters()
    shapes = layer_shapes(arch)
    facts = {"parameters_before": before, "parameters_after": after, "removed_fraction": round(1 - after / before, 6)}
    removed_of_blocks = round(1 - sparsity_base(arch, "blocks", after) / blocks_before, 6)
    lm.manifest["prune_report"] = {"method": "structured", **facts, "removed_fraction_of_blocks": removed_of_blocks, "amounts": amounts, "layers": shapes,
                                   "speed": "smaller matrices: measure with slimkit bench"}
    return lm.record("prune", "structured", config, **facts)


def layer_shapes(arch: Adapter) -> list[dict]:
    out = []
    for b in arch.blocks:
        row = {"layer": b.name, "mlp_channels": _w(arch.model, b.mlp_out).shape[1]}
        if arch.qkv_rows(b) is not None:
            n_kv, per = arch.kv_groups(b)
            row.update(query_heads=n_kv * per, kv_heads=n_kv)
        out.append(row)
    return out


def sync_config(arch: Adapter) -> None:
    """Write the sizes into the config where every layer agrees (the uniform case),
    so that the config alone describes the model; otherwise the artifact records shapes."""
    cfg = arch.model.config
    shapes = layer_shapes(arch)
    mlp = {s["mlp_channels"] for s in shapes}
    if len(mlp) == 1:
        setattr(cfg, arch.mlp_width, mlp.pop())
    if arch.family.head_config:  # where the config alone sizes the heads (not BERT's: it derives their width)
        heads = {(s["query_heads"], s["kv_heads"]) for s in shapes}
        if len(heads) == 1:
            q_field, kv_field, dim_field = arch.family.head_config
            q, kv = heads.pop()
            setattr(cfg, dim_field, arch.blocks[0].head_dim)
            setattr(cfg, q_field, q)
            setattr(cfg, kv_field, kv)
