"""Which part of int8 embeddings loses on SmolLM2: the lookup or the tied head?"""
import copy
import time

import torch
from torch import nn

import slimkit
from slimkit.measure.quality import EvalConfig, evaluate
from slimkit.quantization.embedding import Int8Embedding, TiedInt8Head

torch.set_num_threads(2)
ref = slimkit.load("smollm2-135m")
base = slimkit.quantize(ref, "int8-wo", embeddings=False)
cfg = EvalConfig(max_tokens=2048)

def variant(lookup: bool, head: bool):
    lm = copy.copy(base); lm.model = copy.deepcopy(base.model)
    m = lm.model
    emb = m.model.embed_tokens
    q = Int8Embedding.from_float(emb)
    if head:
        m.lm_head = TiedInt8Head(q, "model.embed_tokens")
    else:
        lin = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False)
        lin.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        m.lm_head = lin
    if lookup:
        m.model.embed_tokens = q
    m.config.tie_word_embeddings = False
    return lm

for name, lm in [("wo-linears only", base), ("lookup int8", variant(True, False)), ("head int8", variant(False, True)), ("both int8", variant(True, True))]:
    t = time.time()
    r = evaluate(lm, ref, config=cfg)
    print(f"{name:20s} ppl {r.perplexity:.4f} ref {r.reference_perplexity:.4f} delta {100*(r.perplexity/r.reference_perplexity-1):+.3f}% KL {r.kl_divergence:.5f} top1 {r.top1_agreement:.3f} ({time.time()-t:.0f}s)", flush=True)
