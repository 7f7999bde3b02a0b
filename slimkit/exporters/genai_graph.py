"""The onnxruntime-genai graph rewrite: fp32 MatMuls and the embedding Gather become
MatMulNBits and GatherBlockQuantized nodes that hold slimkit's codes (see genai_weights.py
for the mapping from slimkit's grids and why it is exact).

A MatMul's weight (K, N) is matched, column block by column block, against the float
twin's dequantized layers, so the builder's fusions (q/k/v, gate/up) are found whatever
it names them; each written node is decoded again and compared with the codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slimkit.core.errors import SlimkitError
from slimkit.exporters.genai_weights import BLOCKS, Plan, Table, block_size, default_zero, nbits_dequantize, nbits_tensors

UNQUANTIZED = "export the model before quantization with --quantize int4 (the builder's own int4)"


@dataclass
class Carried:
    """What `carry_codes` did to the graph."""

    nodes: dict[str, list[str]]  # MatMulNBits node -> the layers it holds, in column order
    bits: dict[str, int]  # node -> bits
    max_weight_diff: float  # between each written node's weight and its layers' codes, dequantized
    tables: dict[str, str] = field(default_factory=dict)  # quantized embedding -> its GatherBlockQuantized node


def carry_codes(path: Path, plan: Plan, accuracy_level: int = 4) -> Carried:
    """Replace every MatMul whose weight is made of quantized layers by a MatMulNBits holding their codes.

    `plan.codes` must cover every quantized layer (re-quantize or refuse the others first). The
    graph and its external data file are rewritten in place."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))  # with its external data, in memory
    inits = {t.name: t for t in model.graph.initializer}
    index = _first_rows(plan)
    carried = Carried({}, {}, 0.0)
    found: set[str] = set()
    nodes = list(model.graph.node)
    for i, node in enumerate(nodes):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        wt = numpy_helper.to_array(inits[node.input[1]])  # (K, N)
        members = _match(wt, plan, index, node.name, found)
        if not members:
            continue
        codes = [plan.codes[m] for m in members]
        if len({c.bits for c in codes}) != 1:
            raise SlimkitError(f"the builder fused {', '.join(members)} into one MatMul, but they have different bit widths: "
                               f"quantize them alike, or {UNQUANTIZED}")
        k = wt.shape[0]
        block = next((b for b in BLOCKS if all(c.group % b == 0 for c in codes) and k % b == 0), None)
        if block is None:
            raise SlimkitError(f"{members[0]}: groups of {codes[0].group} over {k} inputs fit no MatMulNBits block "
                               f"({', '.join(map(str, BLOCKS))}): quantize with group_size 32 or 64")
        parts = [nbits_tensors(c, block) for c in codes]
        b, s, z = (np.concatenate([p[j] for p in parts]) for j in range(3))  # along N
        bits, w_name = codes[0].bits, node.input[1]
        z = None if all(default_zero(c) for c in codes) else z  # symmetric: the kernel's own zero point, and its faster path
        names = [f"{w_name}_Q{bits}", f"{w_name}_scales"] + ([] if z is None else [f"{w_name}_zero_points"])
        replacement = helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output), name=f"{node.name}_Q{bits}",
                                       domain="com.microsoft", K=k, N=wt.shape[1], bits=bits, block_size=block,
                                       accuracy_level=accuracy_level)
        nodes[i] = replacement
        model.graph.initializer.remove(inits.pop(w_name))
        model.graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip((b, s, z), names))
        written = nbits_dequantize(b, s, z, bits, k)  # (N, K): what the kernel will compute with
        expected = torch.cat([c.dequantize() for c in codes])
        carried.max_weight_diff = max(carried.max_weight_diff, float((written - expected).abs().max()))
        carried.nodes[replacement.name], carried.bits[replacement.name] = members, bits
        found.update(members)
    inputs = {members[0]: (node.input[1:], node.attribute) for node in nodes if node.name in carried.nodes
              for members in [carried.nodes[node.name]] if len(members) == 1}
    rewritten = []
    for node in nodes:
        name = None
        if node.op_type == "Gather" and node.input[0] in inits:
            table = numpy_helper.to_array(inits[node.input[0]])  # (V, D)
            name = next((n for n, t in plan.tables.items() if t.codes is not None and t.weight.shape == table.shape
                         and np.array_equal(t.weight.numpy(), table)), None)
        if name is None:
            rewritten.append(node)
            continue
        lookup = _quantized_lookup(node, plan.tables[name], inputs, model.graph.initializer, inits)
        rewritten += lookup
        carried.tables[name] = next(n.name for n in lookup if n.op_type == "GatherBlockQuantized")
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    missing = sorted(set(plan.codes) - found)
    if missing:
        raise SlimkitError(f"onnxruntime-genai's builder wrote {missing[0]} in a form slimkit does not recognise (its weight "
                           f"is not among the graph's MatMuls): {UNQUANTIZED}")
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=1024)
    return carried


def _quantized_lookup(gather, table: Table, inputs: dict, initializers, inits: dict) -> list:
    """The nodes that replace an fp32 embedding Gather: a GatherBlockQuantized on the int8 rows
    (the tied head's own MatMulNBits tensors, reshaped, when it is carried), then * 1 / s for AWQ."""
    from onnx import helper, numpy_helper

    v, d = table.weight.shape
    bits = table.codes.bits
    width = d * bits // 8  # bytes per row: 4-bit values are packed two per byte, as in MatMulNBits
    base = gather.input[0]
    nodes = []
    shared = inputs.get(table.head)
    data = f"{base}_Q{bits}"
    if shared is not None:
        (b_name, *scale_and_zero), attrs = shared
        block = next(a.i for a in attrs if a.name == "block_size")
        initializers.append(numpy_helper.from_array(np.array([v, width], dtype=np.int64), f"{base}_shape"))
        nodes.append(helper.make_node("Reshape", [b_name, f"{base}_shape"], [data], name=f"{gather.name}_Reshape"))
    else:
        block = block_size(table.codes.group, d)
        if block is None:
            raise SlimkitError(f"the embedding's width {d} fits no GatherBlockQuantized block: quantize with embeddings=false")
        b, s, z = nbits_tensors(table.codes, block)
        scale_and_zero = [f"{base}_scales"] + ([] if default_zero(table.codes) else [f"{base}_zero_points"])
        initializers.extend(numpy_helper.from_array(a, n) for a, n in zip((b.reshape(v, width), s, z), [data, *scale_and_zero]))
    out = gather.output[0] if table.inv_column_scale is None else f"{gather.output[0]}_rows"
    nodes.append(helper.make_node("GatherBlockQuantized", [data, gather.input[1], *scale_and_zero], [out],
                                  name=f"{gather.name}BlockQuantized", domain="com.microsoft", bits=bits, block_size=block,
                                  gather_axis=0, quantize_axis=1))
    if table.inv_column_scale is not None:
        initializers.append(numpy_helper.from_array(table.inv_column_scale.float().numpy(), f"{base}_inv_column_scale"))
        nodes.append(helper.make_node("Mul", [out, f"{base}_inv_column_scale"], [gather.output[0]], name=f"{gather.name}_Mul"))
    initializers.remove(inits.pop(base))
    return nodes


def _first_rows(plan: Plan) -> dict[bytes, list[str]]:
    """Each exact layer's first output row, as bytes -> the layers that start with it."""
    index: dict[bytes, list[str]] = {}
    for name, w in plan.weights.items():
        if name in plan.codes:
            index.setdefault(w[0].numpy().tobytes(), []).append(name)
    return index


def _match(wt: np.ndarray, plan: Plan, index: dict[bytes, list[str]], node: str, found: set[str]) -> list[str]:
    """The layers whose weights, side by side, are this MatMul's weight wt (K, N); [] for a float MatMul."""
    members, col = [], 0
    while col < wt.shape[1]:
        hit = None
        candidates = index.get(np.ascontiguousarray(wt[:, col]).tobytes(), [])
        for name in sorted(candidates, key=lambda n: n in found or n in members):  # equal weights: each layer once
            w = plan.weights[name]  # (N_m, K)
            if w.shape[1] == wt.shape[0] and col + w.shape[0] <= wt.shape[1] and np.array_equal(wt[:, col : col + w.shape[0]], w.numpy().T):
                hit = name
                break
        if hit is None:
            break
        members.append(hit)
        col += plan.weights[hit].shape[0]
    if members and col != wt.shape[1]:
        raise SlimkitError(f"onnxruntime-genai's builder fused {', '.join(members)} with a float layer in {node}: "
                           f"quantize all of them (or none), or {UNQUANTIZED}")
    return members
