"""Structured pruning that physically removes units: attention heads, MLP
channels and whole layers. Weight tensors are sliced, `in_features` /
`out_features` and the config are updated, and the pruned model runs with
smaller matrices, so it is faster on any runtime (unlike zeroed weights).

Units
  heads   attention heads, in whole key/value groups: under grouped-query
          attention (Llama, SmolLM2: 9 query heads share 3 kv heads) a group
          is one kv head plus the query heads that read it; removing the group
          removes its rows of q/k/v and its columns of o, so every layer keeps
          the same query-per-kv ratio. BERT's heads are groups of one. GPT-2's
          fused c_attn is not supported for heads.
  mlp     intermediate channels: a row of each input projection (gate/up, or
          BERT's intermediate.dense, GPT-2's c_fc) and a column of the output
          projection (down_proj, output.dense, c_proj).
  layers  whole decoder/encoder blocks (the residual stream passes through).

What to remove is decided by an importance criterion (`importance.py`)
summed over each unit's weights, on calibration batches. For layers, the
activation criterion uses block influence (1 - cosine of a block's input and
output hidden states; Men et al. 2024): blocks that barely change the stream go first.

`sparsity` is the fraction of the model's parameters removed (embeddings
included), split across the chosen units in proportion to their size;
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
(`obs_keep`) removes, one at a time, the channel the others can best take over;
`importance` then only ranks heads and layers. MiniLM with 30% of MLP channels
cut, one-shot embedding cosine: 0.822 sliced by importance, 0.966 refitted,
0.981 chosen by OBS and refitted; SmolLM2 with 25% of parameters cut,
perplexity 34.6 sliced -> 20.3 refitted (fp32 14.4). Recovery training
(`recover_minutes`) can follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Context, register
from slimkit.core.selection import check_patterns, is_conv1d, linear_weight, matches
from slimkit.io.model import LoadedModel, copy_model
from slimkit.pruning import common, importance
from slimkit.pruning.recovery import RecoveryConfig, recover

UNITS = ("heads", "mlp", "layers")
DEFAULT_SPARSITY = 0.25
REFIT_DAMPING = 0.01  # ridge, as a fraction of the mean input energy (GPTQ damps its Hessian alike)


# --------------------------------------------------------------------------- architecture


@dataclass
class Block:
    """One transformer block's prunable parts (qualified module names)."""

    name: str
    q: str | None
    k: str | None
    v: str | None
    o: str | None
    mlp_in: list[str]
    mlp_out: str
    head_dim: int = 0
    family: str = ""

    def attn(self) -> list[str]:
        return [n for n in (self.q, self.k, self.v, self.o) if n]


@dataclass
class Arch:
    family: str
    layers_path: str  # the nn.ModuleList of blocks
    blocks: list[Block]
    config_fields: dict = field(default_factory=dict)  # unit -> config attribute(s)


def find_arch(model: nn.Module) -> Arch:
    """Recognise Llama-family, BERT and GPT-2 blocks from module names."""
    modules = dict(model.named_modules())
    for path, mod in modules.items():
        if not isinstance(mod, nn.ModuleList) or not len(mod):
            continue
        first = f"{path}.0"
        if f"{first}.self_attn.q_proj" in modules and f"{first}.mlp.down_proj" in modules:
            blocks = []
            for i in range(len(mod)):
                b = f"{path}.{i}"
                ins = [f"{b}.mlp.{p}" for p in ("gate_proj", "up_proj") if f"{b}.mlp.{p}" in modules]
                attn = modules[f"{b}.self_attn"]
                blocks.append(Block(b, f"{b}.self_attn.q_proj", f"{b}.self_attn.k_proj", f"{b}.self_attn.v_proj",
                                    f"{b}.self_attn.o_proj", ins, f"{b}.mlp.down_proj", attn.head_dim, "llama"))
            return Arch("llama", path, blocks, {"layers": "num_hidden_layers", "mlp": "intermediate_size"})
        if f"{first}.attention.self.query" in modules and f"{first}.intermediate.dense" in modules:
            blocks = []
            for i in range(len(mod)):
                b = f"{path}.{i}"
                att = f"{b}.attention"
                blocks.append(Block(b, f"{att}.self.query", f"{att}.self.key", f"{att}.self.value", f"{att}.output.dense",
                                    [f"{b}.intermediate.dense"], f"{b}.output.dense",
                                    modules[f"{att}.self"].attention_head_size, "bert"))
            return Arch("bert", path, blocks, {"layers": "num_hidden_layers", "mlp": "intermediate_size"})
        if f"{first}.attn.c_attn" in modules and f"{first}.mlp.c_fc" in modules:
            blocks = [Block(f"{path}.{i}", None, None, None, None, [f"{path}.{i}.mlp.c_fc"], f"{path}.{i}.mlp.c_proj", 0, "gpt2")
                      for i in range(len(mod))]
            return Arch("gpt2", path, blocks, {"layers": "n_layer", "mlp": "n_inner"})
    raise SlimkitError(
        f"structured pruning does not support {type(model).__name__}: it knows Llama-family (q/k/v/o_proj, "
        "gate/up/down_proj), BERT and GPT-2 blocks; use method magnitude, wanda or 2:4 instead"
    )


def _w(model, name) -> torch.Tensor:
    return linear_weight(model.get_submodule(name))  # (out, in)


def head_groups(model, b: Block) -> tuple[int, int]:
    """(kv groups, query heads per group) of a block."""
    n_kv = _w(model, b.k).shape[0] // b.head_dim
    return n_kv, _w(model, b.q).shape[0] // b.head_dim // n_kv


def group_rows(b: Block, g: int, per_group: int) -> tuple[slice, slice]:
    """Rows of q and of k/v that belong to kv group g (q rows are also o's columns)."""
    hd = b.head_dim
    return slice(g * per_group * hd, (g + 1) * per_group * hd), slice(g * hd, (g + 1) * hd)


# --------------------------------------------------------------------------- physical removal (pure on modules)


def keep_outputs(module: nn.Module, idx: torch.Tensor) -> None:
    """Keep only output units `idx` of a Linear/Conv1D (in place)."""
    with torch.no_grad():
        if is_conv1d(module):
            module.weight = nn.Parameter(module.weight[:, idx].clone())  # (in, out')
            module.nf = len(idx)
        else:
            module.weight = nn.Parameter(module.weight[idx].clone())  # (out', in)
            module.out_features = len(idx)
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias[idx].clone())


def keep_inputs(module: nn.Module, idx: torch.Tensor) -> None:
    """Keep only input features `idx` of a Linear/Conv1D (in place)."""
    with torch.no_grad():
        if is_conv1d(module):
            module.weight = nn.Parameter(module.weight[idx].clone())  # (in', out)
            module.nx = len(idx)
        else:
            module.weight = nn.Parameter(module.weight[:, idx].clone())  # (out, in')
            module.in_features = len(idx)


def _augmented(module: nn.Module, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(weight with the bias as a last column, (out, in [+ 1]); the Gram over the same
    features; in_features), in float64: the bias is the weight of the constant feature."""
    w = linear_weight(module).detach().double()  # (out, in)
    n_in = w.shape[1]
    if module.bias is None:
        return w, gram[:n_in, :n_in], n_in
    return torch.cat([w, module.bias.detach().double()[:, None]], 1), gram, n_in


def refit_inputs(module: nn.Module, idx: torch.Tensor, gram: torch.Tensor, damping: float = REFIT_DAMPING) -> None:
    """Keep input features `idx` of a Linear/Conv1D and refit its weight (and bias)
    so its outputs on the calibration inputs change as little as possible.

    Ridge least squares on the input Gram matrix `gram` ((in + 1)^2, last row
    and column the constant feature, from `common.input_grams`): with W the
    original weight, S the kept features and G the Gram,
        W' = W G[:, S] (G[S, S] + lambda I)^-1,   lambda = damping * mean(diag G[S, S]),
    where a bias joins the solve as the weight of the constant feature, so it
    absorbs the removed features' mean contribution. When the removed features
    carried nothing on the calibration data (all zero), this is a plain slice.
    """
    n_in = linear_weight(module).shape[1]
    removed = torch.ones(n_in, dtype=torch.bool)
    removed[idx] = False
    if gram[:n_in, :n_in].diagonal()[removed].sum() == 0:
        keep_inputs(module, idx)
        return
    with torch.no_grad():
        w_aug, g, _ = _augmented(module, gram)
        has_bias = module.bias is not None
        cols = torch.cat([idx, torch.tensor([n_in])]) if has_bias else idx
        a = g[cols][:, cols].clone()
        lam = damping * a.diagonal()[: len(idx)].mean().clamp(min=1e-12)
        a.diagonal()[: len(idx)] += lam
        sol = torch.linalg.solve(a, (w_aug @ g[:, cols]).T).T  # (out, kept [+ 1])
        keep_inputs(module, idx)
        new_w = sol[:, : len(idx)].to(module.weight.dtype)
        module.weight.copy_(new_w.T if is_conv1d(module) else new_w)
        if has_bias:
            module.bias.copy_(sol[:, -1].to(module.bias.dtype))


def obs_keep(module: nn.Module, gram: torch.Tensor, n_remove: int, damping: float = REFIT_DAMPING) -> torch.Tensor:
    """Input features of a Linear/Conv1D to keep when `n_remove` must go.

    Optimal Brain Surgeon over whole input features (as ZipLM and SlimGPT prune
    structured units): one at a time, remove the feature whose loss the refit of
    the others compensates best, error_j = ||w_j||^2 / [H^-1]_jj with H the
    damped input Gram matrix, then update the weights and H^-1 as if refitted.
    The error is measured where it matters, at the module's output, so a channel
    whose work its neighbours can take over goes before one that is merely small.
    """
    w, g, n_in = _augmented(module, gram)
    h = g.clone()
    h.diagonal()[:n_in] += damping * h.diagonal()[:n_in].mean().clamp(min=1e-12)
    h_inv = torch.linalg.inv(h)
    alive = torch.ones(n_in, dtype=torch.bool)
    for _ in range(n_remove):
        error = w[:, :n_in].pow(2).sum(0) / h_inv.diagonal()[:n_in]
        error[~alive] = float("inf")
        j = int(error.argmin())  # ties: the lowest index
        w -= torch.outer(w[:, j], h_inv[j]) / h_inv[j, j]
        h_inv -= torch.outer(h_inv[:, j], h_inv[j]) / h_inv[j, j]
        alive[j] = False
    return torch.nonzero(alive).flatten()


def _cut_inputs(module: nn.Module, idx: torch.Tensor, gram: torch.Tensor | None) -> None:
    if gram is None:
        keep_inputs(module, idx)
    else:
        refit_inputs(module, idx, gram)


def remove_mlp_channels(model, b: Block, keep: torch.Tensor, gram: torch.Tensor | None = None) -> None:
    """Keep MLP channels `keep`; with the output projection's input `gram`, refit it."""
    for n in b.mlp_in:
        keep_outputs(model.get_submodule(n), keep)
    _cut_inputs(model.get_submodule(b.mlp_out), keep, gram)


def remove_head_groups(model, b: Block, keep_groups: list[int], gram: torch.Tensor | None = None) -> None:
    """Keep kv groups `keep_groups` with their query heads; o keeps the matching columns."""
    n_kv, per = head_groups(model, b)
    q_rows = torch.cat([torch.arange(n_kv * per * b.head_dim)[group_rows(b, g, per)[0]] for g in keep_groups])
    kv_rows = torch.cat([torch.arange(n_kv * b.head_dim)[group_rows(b, g, per)[1]] for g in keep_groups])
    keep_outputs(model.get_submodule(b.q), q_rows)
    keep_outputs(model.get_submodule(b.k), kv_rows)
    keep_outputs(model.get_submodule(b.v), kv_rows)
    _cut_inputs(model.get_submodule(b.o), q_rows, gram)
    if b.family == "bert":  # bookkeeping attributes (the forward reshapes with -1)
        attn = model.get_submodule(b.q.rsplit(".", 1)[0])
        attn.num_attention_heads = len(keep_groups)
        attn.all_head_size = len(keep_groups) * b.head_dim


def remove_layers(model, arch: Arch, drop: set[int]) -> None:
    """Drop whole blocks and renumber the survivors' layer_idx (the KV cache's index)."""
    layers = model.get_submodule(arch.layers_path)
    kept = [blk for i, blk in enumerate(layers) if i not in drop]
    parent, _, attr = arch.layers_path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.ModuleList(kept))
    for new, blk in enumerate(kept):
        for m in blk.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new
    cfg = model.config
    setattr(cfg, arch.config_fields["layers"], len(kept))
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in drop]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class StructuredConfig:
    sparsity: float | None = None  # fraction of all parameters removed (default 0.25 when no amount below is given)
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
        if self.recovery not in ("finetune", "distill"):
            raise SlimkitError(f"unknown recovery '{self.recovery}': use 'finetune' or 'distill'")


# --------------------------------------------------------------------------- planning


def plan_amounts(model, arch: Arch, blocks: list[Block], config: StructuredConfig, total_params: int) -> dict:
    """Per-layer amounts {heads, mlp, layers} to remove, from explicit amounts or `sparsity`."""
    if any(v is not None for v in (config.head_groups, config.mlp_channels, config.layers)):
        amounts = {"heads": config.head_groups or 0, "mlp": config.mlp_channels or 0, "layers": config.layers or 0}
    else:
        target = (DEFAULT_SPARSITY if config.sparsity is None else config.sparsity) * total_params
        amounts = _from_sparsity(model, arch, blocks, config.units, target)
    _check_amounts(model, arch, blocks, amounts)
    return amounts


def _numel(model, names) -> int:
    return sum(p.numel() for n in names for p in model.get_submodule(n).parameters(recurse=False))


def _from_sparsity(model, arch, blocks, units, target) -> dict:
    b0, L = blocks[0], len(blocks)
    out = {"heads": 0, "mlp": 0, "layers": 0}
    if "layers" in units:
        per_block = sum(p.numel() for p in model.get_submodule(b0.name).parameters())
        out["layers"] = round(target / per_block)
        return out
    if "heads" in units and arch.family == "gpt2":
        raise SlimkitError("GPT-2's fused c_attn heads cannot be pruned here: use units=('mlp',) or ('layers',)")
    channels = _w(model, b0.mlp_out).shape[1]
    cost_c = _numel(model, b0.mlp_in + [b0.mlp_out]) / channels  # params per MLP channel
    mlp_params = _numel(model, b0.mlp_in + [b0.mlp_out])
    if "heads" in units:
        n_kv, _ = head_groups(model, b0)
        attn_params = _numel(model, b0.attn())
        cost_g = attn_params / n_kv
        share = attn_params / (attn_params + mlp_params) if "mlp" in units else 1.0
        out["heads"] = round(target * share / (cost_g * L))
        target -= out["heads"] * cost_g * L
    if "mlp" in units:
        out["mlp"] = max(0, round(target / (cost_c * L)))
    return out


def _check_amounts(model, arch, blocks, amounts) -> None:
    n_layers = len(model.get_submodule(arch.layers_path))
    if amounts["layers"] >= n_layers:
        raise SlimkitError(f"cannot remove {amounts['layers']} of {n_layers} layers: lower --sparsity or prune heads/mlp")
    if amounts["layers"] > len(blocks):
        raise SlimkitError(f"only {len(blocks)} layers match targets; cannot remove {amounts['layers']}")
    if amounts["heads"] and arch.family == "gpt2":
        raise SlimkitError("GPT-2's fused c_attn heads cannot be pruned here: use units=('mlp',) or ('layers',)")
    for b in blocks:
        if amounts["heads"]:
            n_kv, per = head_groups(model, b)
            if amounts["heads"] >= n_kv:
                kind = f"kv head groups ({n_kv * per} query heads)" if per > 1 else "heads"
                raise SlimkitError(
                    f"cannot remove {amounts['heads']} of the {n_kv} {kind} of layer {b.name}: a layer needs at least "
                    "one; lower --sparsity or add mlp/layers to units"
                )
        channels = _w(model, b.mlp_out).shape[1]
        if amounts["mlp"] >= channels:
            raise SlimkitError(f"cannot remove {amounts['mlp']} of the {channels} MLP channels of {b.name}: lower --sparsity")


# --------------------------------------------------------------------------- scoring


def unit_scores(model, b: Block, scores: dict) -> dict[str, torch.Tensor]:
    """Summed element scores per head group (n_kv,) and per MLP channel (channels,)."""
    out = {}
    if b.mlp_out in scores:
        s = scores[b.mlp_out].sum(0)  # (channels,): columns of the output projection
        for n in b.mlp_in:
            s = s + scores[n].sum(1)  # rows of each input projection
        out["mlp"] = s
    if b.q and b.q in scores:
        n_kv, per = head_groups(model, b)
        g_scores = []
        for g in range(n_kv):
            qs, ks = group_rows(b, g, per)
            g_scores.append(scores[b.q][qs].sum() + scores[b.k][ks].sum() + scores[b.v][ks].sum() + scores[b.o][:, qs].sum())
        out["heads"] = torch.stack(g_scores)  # (n_kv,)
    return out


def block_influence(lm: LoadedModel, arch: Arch, batches) -> torch.Tensor:
    """1 - mean cosine(input, output) of each block's hidden states: (n_layers,)."""
    layers = lm.model.get_submodule(arch.layers_path)
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
    arch = find_arch(net)
    blocks = [b for b in arch.blocks if matches(b.name, config.targets) and not matches(b.name, config.ignore)]
    if not blocks:
        raise SlimkitError(
            f"no layers to prune: none of {arch.layers_path}.* matches targets {list(config.targets)} without matching "
            f"ignore {list(config.ignore)}; check the patterns"
        )
    before = lm.num_parameters()
    amounts = plan_amounts(net, arch, blocks, config, before)
    crit = importance.get(config.importance)
    get_batches = common.calibration(lm, config, ctx)

    if amounts["layers"]:
        if crit.name == "activation":
            layer_scores = block_influence(lm, arch, get_batches())
        else:
            names = {n: net.get_submodule(n) for b in arch.blocks for n in b.attn() + b.mlp_in + [b.mlp_out]}
            el = importance.module_scores(crit, lm, names, get_batches)
            layer_scores = torch.stack([
                sum(el[n].sum() for n in b.attn() + b.mlp_in + [b.mlp_out]) / _numel(net, b.attn() + b.mlp_in + [b.mlp_out])
                for b in arch.blocks
            ])
        index = {b.name: i for i, b in enumerate(arch.blocks)}
        candidates = sorted((float(layer_scores[index[b.name]]), index[b.name]) for b in blocks)
        remove_layers(net, arch, {i for _, i in candidates[: amounts["layers"]]})
        arch = find_arch(net)  # renumbered blocks
        blocks = [b for b in arch.blocks if matches(b.name, config.targets) and not matches(b.name, config.ignore)]
    if amounts["heads"] or amounts["mlp"]:
        surgeon = config.refit and config.uniform  # MLP channels chosen by OBS, not by importance
        names = {}
        for b in blocks:
            for n in (b.attn() if amounts["heads"] else []) + ((b.mlp_in + [b.mlp_out]) if amounts["mlp"] and not surgeon else []):
                names[n] = net.get_submodule(n)
        el = importance.module_scores(crit, lm, names, get_batches) if names else {}
        units = [unit_scores(net, b, el) for b in blocks]
        grams = {}
        if config.refit:  # inputs of the projections that lose features, before anything is cut
            consumers = [b.mlp_out for b in blocks if amounts["mlp"]] + [b.o for b in blocks if amounts["heads"]]
            grams = common.input_grams(lm, {n: net.get_submodule(n) for n in consumers}, get_batches())
        if amounts["mlp"] and surgeon:
            for b in blocks:
                gram = grams[b.mlp_out]
                remove_mlp_channels(net, b, obs_keep(net.get_submodule(b.mlp_out), gram, amounts["mlp"]), gram)
        elif amounts["mlp"]:
            drops = _choose_removals([u["mlp"] for u in units], amounts["mlp"], config.uniform)
            for b, drop in zip(blocks, drops):
                n = _w(net, b.mlp_out).shape[1]
                remove_mlp_channels(net, b, torch.tensor([i for i in range(n) if i not in set(drop)]), grams.get(b.mlp_out))
        if amounts["heads"]:
            drops = _choose_removals([u["heads"] for u in units], amounts["heads"], config.uniform)
            for b, drop in zip(blocks, drops):
                n_kv, _ = head_groups(net, b)
                remove_head_groups(net, b, [g for g in range(n_kv) if g not in set(drop)], grams.get(b.o))
        grams = None
    sync_config(net, find_arch(net))
    if config.recover_minutes > 0:
        recover(lm, model, RecoveryConfig(minutes=config.recover_minutes, mode=config.recovery), ctx)
    after = lm.num_parameters()
    shapes = layer_shapes(net, find_arch(net))
    facts = {"parameters_before": before, "parameters_after": after, "removed_fraction": round(1 - after / before, 6)}
    lm.manifest["prune_report"] = {"method": "structured", **facts, "amounts": amounts, "layers": shapes,
                                   "speed": "smaller matrices: measure with slimkit bench"}
    return lm.record("prune", "structured", config, **facts)


def layer_shapes(net, arch: Arch) -> list[dict]:
    out = []
    for b in arch.blocks:
        row = {"layer": b.name, "mlp_channels": _w(net, b.mlp_out).shape[1]}
        if b.q:
            n_kv, per = head_groups(net, b)
            row.update(query_heads=n_kv * per, kv_heads=n_kv)
        out.append(row)
    return out


def sync_config(net, arch: Arch) -> None:
    """Write the sizes into the config where every layer agrees (the uniform case),
    so that the config alone describes the model; otherwise the artifact records shapes."""
    cfg = net.config
    shapes = layer_shapes(net, arch)
    mlp = {s["mlp_channels"] for s in shapes}
    if len(mlp) == 1:
        setattr(cfg, arch.config_fields["mlp"], mlp.pop())
    if arch.family == "llama":
        heads = {(s["query_heads"], s["kv_heads"]) for s in shapes}
        if len(heads) == 1:
            q, kv = heads.pop()
            cfg.head_dim = arch.blocks[0].head_dim
            cfg.num_attention_heads, cfg.num_key_value_heads = q, kv
