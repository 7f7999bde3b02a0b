"""MiniLM latency of MLP-cut shapes against fp32, interleaved (batch 1 x 128 tokens, 2 threads, eager).

Shapes only: each layer keeps the first K intermediate channels, as structured pruning
leaves K of them; speed does not depend on which. Usage:

    .venv/bin/python benchmarks/prune_shapes_latency.py
"""
import copy
import statistics
import time

import torch

import slimkit

torch.set_num_threads(2)
lm = slimkit.load("minilm-l6")
def cut(keep):
    m = copy.deepcopy(lm.model)
    for layer in m.encoder.layer:
        i, o = layer.intermediate.dense, layer.output.dense
        ni = torch.nn.Linear(i.in_features, keep); ni.weight.data = i.weight.data[:keep].clone(); ni.bias.data = i.bias.data[:keep].clone()
        no = torch.nn.Linear(keep, o.out_features); no.weight.data = o.weight.data[:, :keep].clone(); no.bias.data = o.bias.data.clone()
        layer.intermediate.dense, layer.output.dense = ni, no
    return m.eval()
models = {"fp32": lm.model.eval(), **{str(k): cut(k) for k in (1075, 1056, 1024)}}
ids = torch.randint(1000, 20000, (1, 128)); mask = torch.ones_like(ids)
res = {k: [] for k in models}
with torch.inference_mode():
    for r in range(7):
        for k, m in models.items():
            for _ in range(5): m(input_ids=ids, attention_mask=mask)
            ts = []
            for _ in range(40):
                t = time.perf_counter(); m(input_ids=ids, attention_mask=mask); ts.append(time.perf_counter() - t)
            res[k].append(statistics.median(ts) * 1e3)
base = statistics.median(res["fp32"])
for k, v in res.items(): print(k, f"{statistics.median(v):.2f} ms", f"{base / statistics.median(v):.3f}x")
