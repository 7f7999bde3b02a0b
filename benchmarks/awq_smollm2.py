"""AWQ vs RTN on SmolLM2-135M, 2,048 evaluation tokens, reference fp32 (same as `slimkit eval DIR --reference smollm2-135m --max-tokens 2048`)."""
import sys, time
sys.path.insert(0, ".")
import torch, slimkit
from slimkit.evaluate import evaluate, EvalConfig
from slimkit.artifacts import save
from slimkit.benchmark import dir_size_mb
torch.set_num_threads(2)
ref = slimkit.load("smollm2-135m")
cfg = EvalConfig(max_tokens=2048)
runs = {
    "awq8": ("awq", dict(bits=8, group_size=None, symmetric=True, n_samples=8)),
    "awq4-g64": ("awq", dict(bits=4, group_size=64, n_samples=8)),
    "awq4-g128": ("awq", dict(bits=4, group_size=128, n_samples=8)),
    "int4-wo-g128": ("int4-wo", dict(group_size=128)),
    "int4-wo-g64": ("int4-wo", dict(group_size=64)),
}
for key in sys.argv[1:]:
    method, opts = runs[key]
    t = time.time()
    q = slimkit.quantize(ref, method, **opts)
    tq = time.time() - t
    out = save(q, f"/tmp/awq/out-{key}")
    size = dir_size_mb(out, "*")
    r = evaluate(str(out), ref, config=cfg)
    print(f"{key:14s} ppl {r.perplexity:.4f} ref {r.reference_perplexity:.4f} delta {100*(r.perplexity/r.reference_perplexity-1):+.3f}% KL {r.kl_divergence:.5f} top1 {r.top1_agreement:.3f} size {size:.1f} MiB quantize {tq:.0f}s", flush=True)
    del q
