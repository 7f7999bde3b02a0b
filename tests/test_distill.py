"""Distillation on tiny random models: students, the training loop, exact resume, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, invoke_cli, run_cli
from distill_worker import WORKER_OPTIONS  # noqa: E402

import slimkit
from slimkit.core.attention import FLOAT32_SDPA
from slimkit.core.errors import SlimkitError
from slimkit.core.training import fit_steps, refit_steps
from slimkit.distillation import DistillConfig, make_student, progressive, select_layers
from slimkit.distillation.method import set_dropout
from slimkit.distillation.student import num_layers

FAST = dict(seq_len=32, batch_size=2, eval_batches=2, max_samples=8)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- students


def test_select_layers():
    assert select_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert select_layers(6, 3) == [0, 2, 5]
    assert select_layers(6, every=2) == [0, 2, 4]
    assert select_layers(6, (1, 4)) == [1, 4]
    for args, fragment in [((6, 7), "in 1..6"), ((6, (0, 6)), "out of range"), ((6, (3, 1)), "increasing"), ((6, 0), "in 1..6")]:
        with pytest.raises(SlimkitError, match=fragment):
            select_layers(*args)


def test_similarity_drops_the_run_of_blocks_that_change_the_stream_least(tiny):
    """Blocks 1 and 2 of a 4-layer model are made near identities: a 2-layer student drops them."""
    import transformers as T

    from slimkit.distillation.student import most_similar_run

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2)
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for i in (1, 2):
            layer = model.model.layers[i]
            layer.self_attn.o_proj.weight.mul_(1e-3)
            layer.mlp.down_proj.weight.mul_(1e-3)
    batch = {"input_ids": torch.arange(3, 35).reshape(2, 16), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    assert most_similar_run(model, 2, [batch]) == [0, 3]
    assert most_similar_run(model, 3, [batch]) in ([0, 2, 3], [0, 1, 3])
    student = slimkit.distill(str(tiny("llama")), student_layers=1, steps=1, **FAST)
    assert student.manifest["recipe"][-1]["layer_choice"] == "similarity"
    assert num_layers(student.model) == 1
    with pytest.raises(SlimkitError, match="unknown layer choice"):
        DistillConfig(student_layers=2, steps=1, layer_choice="middle")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_student_copies_teacher_layers_and_reloads(arch, tiny, tmp_path):
    teacher = slimkit.load(str(tiny(arch)))
    before = _state(teacher.model)
    student = make_student(teacher, (1,))
    assert _same(before, _state(teacher.model)), "the teacher was modified"
    assert num_layers(student.model) == 1 and student.config.num_hidden_layers == 1
    assert num_layers(teacher.model) == 2
    s_block = dict(student.model.named_parameters())
    t_block = dict(teacher.model.named_parameters())
    for name, p in s_block.items():  # block 0 of the student is block 1 of the teacher
        teacher_name = name.replace(".0.", ".1.", 1) if any(f"{x}.0." in name for x in ("layers", "h", "layer")) else name
        assert torch.equal(p, t_block[teacher_name]), name
    student.model.save_pretrained(tmp_path / "s")
    from transformers import AutoConfig

    reloaded = type(student.model).from_pretrained(tmp_path / "s").eval()
    assert AutoConfig.from_pretrained(tmp_path / "s").num_hidden_layers == 1
    ids = torch.randint(5, 500, (1, 12))
    with torch.no_grad():
        a, b = student.model.eval()(input_ids=ids), reloaded(input_ids=ids)
    key = "logits" if arch != "bert" else "last_hidden_state"
    assert torch.equal(a[key], b[key])


def test_student_generates_with_kv_cache(tiny):
    """Kept blocks are renumbered, so the KV cache has one slot per student layer."""
    student = make_student(slimkit.load(str(tiny("llama"))), (1,))
    ids = torch.randint(5, 500, (1, 6))
    with torch.no_grad():
        out = student.model.eval().generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        full = student.model(input_ids=out[:, :-1]).logits[:, -1].argmax(-1)
    assert out.shape == (1, 10) and torch.equal(out[:, -1], full)


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(student_layers=1, steps=1, temperature=0), "temperature must be > 0"),
        (dict(student_layers=1, steps=1, alpha=-0.1), "alpha must be in [0, 1]"),
        (dict(student_layers=1), "give a training length"),
        (dict(steps=1), "choose the student one way"),
        (dict(student_layers=1, every=2, steps=1), "choose the student one way"),
        (dict(student_layers=1, steps=1, loss="mse"), "use kd"),
        (dict(student_layers=1, steps=1, loss="ce", hidden_weight=1.0), "loss=ce trains without the teacher"),
        (dict(student_layers=1, steps=1, patience=2), "needs periodic evaluation"),
        (dict(student_layers=1, steps=1, resume=True), "resume needs a checkpoint_dir"),
        (dict(student_layers=1, steps=1, schedule="step"), "unknown schedule"),
    ],
)
def test_config_validation(options, fragment):
    with pytest.raises(SlimkitError) as info:
        DistillConfig(**options)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_layer_map_out_of_range_and_unknown_option(tiny):
    with pytest.raises(SlimkitError, match="teacher layer 5 is out of range 0..1"):
        slimkit.distill(str(tiny("llama")), student_layers=1, steps=1, hidden_weight=1.0, layer_map=[[0, 5]], **FAST)
    with pytest.raises(SlimkitError, match=r"unknown option\(s\) temprature for distill method 'distill'"):
        slimkit.distill(str(tiny("llama")), student_layers=1, steps=1, temprature=2.0)


def test_mismatched_vocabularies_for_logit_kd(tiny, tmp_path):
    import transformers as T

    other = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    other.save_pretrained(tmp_path / "s")
    T.AutoTokenizer.from_pretrained(tiny("llama")).save_pretrained(tmp_path / "s")
    with pytest.raises(SlimkitError, match="one vocabulary.*600 tokens.*512"):
        slimkit.distill(str(tiny("llama")), student=str(tmp_path / "s"), steps=1, **FAST)


# --------------------------------------------------------------------------- training


def test_kd_reduces_the_loss_and_records_the_recipe(tiny, tmp_path):
    teacher = slimkit.load(str(tiny("llama")))
    before = _state(teacher.model)
    student = slimkit.distill(teacher, student_layers=1, steps=8, lr=3e-3, log_dir=str(tmp_path / "log"), **FAST)
    assert _same(before, _state(teacher.model))
    assert all(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    again = slimkit.distill(teacher, student_layers=1, loss="ce", steps=1, **FAST)  # the teacher is reusable
    assert again.manifest["training"]["steps"] == 1
    training = student.manifest["training"]
    assert training["steps"] == 8 and training["stopped_by"] == "steps"
    assert training["final_eval"] < training["initial_eval"]
    assert student.manifest["recipe"][-1]["method"] == "distill"
    records = [json.loads(l) for l in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 9))
    assert {"loss", "logit_kd", "lr"} <= set(records[1])


def test_hidden_and_attention_terms_train_and_restore_sdpa(tiny):
    teacher = slimkit.load(str(tiny("gpt2")))
    impl = teacher.model.config._attn_implementation
    student = slimkit.distill(teacher, student_layers=1, steps=2, hidden_weight=1.0, attention_weight=1.0, attention_loss="kl", **FAST)
    assert teacher.model.config._attn_implementation == impl
    assert student.model.config._attn_implementation == "sdpa"


def test_students_train_with_float32_attention_on_cpu(tiny, monkeypatch):
    """The loop trains the student with float32 SDPA; the teacher, and the artifact, keep their own."""
    from slimkit.core.training import outputs

    seen = set()
    real = outputs.model_outputs

    def spy(model, *args):
        seen.add((model.config.num_hidden_layers, model.config._attn_implementation))
        return real(model, *args)

    monkeypatch.setattr(outputs, "model_outputs", spy)
    student = slimkit.distill(slimkit.load(str(tiny("bert"))), student_layers=1, steps=2, **FAST)
    assert seen == {(1, FLOAT32_SDPA), (2, "sdpa")}  # the student while it trains; the teacher in evaluation
    assert student.model.config._attn_implementation == "sdpa"  # the artifact keeps the model's own


def test_frozen_modules_keep_the_teachers_weights(tiny):
    teacher = slimkit.load(str(tiny("bert")))
    student = slimkit.distill(teacher, student_layers=1, steps=3, lr=3e-3, freeze=["embeddings"], **FAST)
    init = make_student(teacher, student.manifest["training"]["teacher_layers"]).model.state_dict()
    s = student.model.state_dict()
    frozen = [k for k in s if ".embeddings." in f".{k}"]
    assert frozen and all(torch.equal(s[k], init[k]) for k in frozen)
    assert all(not torch.equal(s[k], init[k]) for k in s if "encoder.layer." in k and k.endswith(".weight"))
    with pytest.raises(SlimkitError, match=r"freeze: no module of the student matches \['nothing_here'\]"):
        slimkit.distill(teacher, student_layers=1, steps=1, freeze=["nothing_here"], **FAST)


def _dropouts(model) -> list[float]:
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    return rates + [v for m in model.modules() for n, v in vars(m).items() if "dropout" in n and type(v) is float]


@pytest.mark.parametrize("arch", ["bert", "llama"])  # nn.Dropout modules; Llama's float attention_dropout
def test_dropout_is_set_for_training_and_restored(tiny, arch):
    model = slimkit.load(str(tiny(arch))).model
    before = _dropouts(model)
    assert len(before) >= 2
    with set_dropout(model, 0.3):
        assert _dropouts(model) == [0.3] * len(before)
    assert _dropouts(model) == before
    with set_dropout(model, None):
        assert _dropouts(model) == before


def test_distill_without_dropout_keeps_the_models_rates(tiny):
    teacher = slimkit.load(str(tiny("bert")))
    student = slimkit.distill(teacher, student_layers=1, steps=2, dropout=0.0, **FAST)
    assert set(_dropouts(student.model)) == {teacher.model.config.hidden_dropout_prob}
    assert student.manifest["recipe"][-1]["dropout"] == 0.0
    with pytest.raises(SlimkitError, match=r"dropout must be in \[0, 1\), got 1.5"):
        slimkit.distill(teacher, student_layers=1, steps=1, dropout=1.5, **FAST)


def test_exact_resume_after_a_crash(tiny, tmp_path):
    """6 steps straight == 4 steps (checkpoint at 4), crash at 5, resume to 6. GPT-2 has dropout: RNG matters."""
    opts = dict(student_layers=1, steps=6, hidden_weight=0.5, grad_accum=2, checkpoint_every=2, lr=1e-3, **FAST)
    straight = slimkit.distill(str(tiny("gpt2")), checkpoint_dir=str(tmp_path / "a"), **opts)

    def crash(step):
        if step == 5:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        slimkit.distill(str(tiny("gpt2")), checkpoint_dir=str(tmp_path / "b"), on_step=crash, **opts)
    assert json.loads((tmp_path / "b" / "last" / "state.json").read_text())["step"] == 4
    resumed = slimkit.distill(str(tiny("gpt2")), checkpoint_dir=str(tmp_path / "b"), resume=True, **opts)
    assert resumed.manifest["training"]["resumed_from"] == 4
    assert _same(_state(straight.model), _state(resumed.model))
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "b" / "last" / "weights.safetensors")
    assert any("projections" not in k for k in saved)  # student weights (the widths match: no projection)


def test_projection_is_trained_and_checkpointed(tiny, tmp_path):
    import transformers as T

    narrow = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    narrow.save_pretrained(tmp_path / "narrow")
    T.AutoTokenizer.from_pretrained(tiny("llama")).save_pretrained(tmp_path / "narrow")
    slimkit.distill(str(tiny("llama")), student=str(tmp_path / "narrow"), steps=2, hidden_weight=1.0, lr=1e-2,
                    checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=1, **FAST)
    from safetensors.torch import load_file

    w1 = load_file(tmp_path / "ck" / "last" / "weights.safetensors")["loss.terms.1.projections.0.weight"]
    assert w1.shape == (64, 32)
    torch.manual_seed(0)  # the projection is initialised right after this seed, before any step
    fresh = torch.nn.Linear(32, 64, bias=False).weight
    assert not torch.equal(w1, fresh)


def test_ce_baseline_needs_no_teacher_and_early_stopping_restores_best(tiny):
    student = slimkit.distill(str(tiny("llama")), student_layers=1, loss="ce", steps=20, lr=0.5, eval_every=1, patience=2, **FAST)
    t = student.manifest["training"]
    assert t["stopped_by"] == "early-stopping" and t["steps"] < 20
    assert t["final_eval"] == pytest.approx(t["best_eval"])


def test_time_budget_plans_the_steps(tiny):
    student = slimkit.distill(str(tiny("bert")), student_layers=1, minutes=0.1, **FAST)
    t = student.manifest["training"]
    assert t["planned_steps"] >= 1 and t["steps"] <= t["planned_steps"]
    assert t["seconds"] < 6 + 10  # the budget plus start-up slack


def test_step_plan_counts_a_cached_teachers_first_pass_once():
    # no cache: every step costs the same
    assert fit_steps(100.0, step_s=2.0, teacher_s=0.0, uncached=0, accum=1) == 50
    # 10 uncached batches at 2 + 3 s, then 2 s a step: 10 + (100 - 50) / 2
    assert fit_steps(100.0, step_s=2.0, teacher_s=3.0, uncached=10, accum=1) == 35
    # the budget ends inside the first pass: 100 / 5
    assert fit_steps(100.0, step_s=2.0, teacher_s=3.0, uncached=40, accum=1) == 20
    # two micro-batches a step: 5 first-pass steps at 4 + 2 * 3 s, then 4 s a step
    assert fit_steps(100.0, step_s=4.0, teacher_s=3.0, uncached=10, accum=2) == 5 + 12
    assert fit_steps(0.5, step_s=2.0, teacher_s=0.0, uncached=0, accum=1) == 1  # at least one step


def test_a_time_budgeted_plan_is_refitted_to_the_pace_kept():
    # 100 steps in the last 50 s (0.5 s a step); 300 s left less a 10 s final evaluation, 2% margin
    assert refit_steps(200, elapsed=300.0, mark=(100, 250.0), budget=600.0, final_eval_s=10.0) == 200 + int(290 * 0.98 / 0.5)
    assert refit_steps(200, elapsed=599.0, mark=(100, 250.0), budget=600.0, final_eval_s=10.0) == 201  # out of time: one more step


@pytest.mark.parametrize("terms", [{}, {"hidden_weight": 1.0, "hidden_loss": "cosine"}])  # hidden states share memory with the last one
def test_teacher_cache_gives_identical_training(tiny, tmp_path, terms):
    opts = dict(student_layers=1, steps=6, max_samples=4, seq_len=32, batch_size=2, eval_batches=1, **terms)  # 2 batches: 3 epochs
    plain = slimkit.distill(str(tiny("bert")), **opts)
    cached = slimkit.distill(str(tiny("bert")), cache_teacher=str(tmp_path / "cache"), **opts)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    assert _same(_state(plain.model), _state(cached.model))
    with pytest.raises(SlimkitError, match="made for another teacher.*delete it"):
        slimkit.distill(str(tiny("bert", seed=1)), cache_teacher=str(tmp_path / "cache"), **{**opts, "max_samples": 8})


def test_progressive_chain(tiny):
    stage = dict(steps=1, **FAST)
    student = progressive(str(tiny("gpt2")), [DistillConfig(student_layers=2, **stage), DistillConfig(student_layers=1, **stage)])
    assert num_layers(student.model) == 1
    assert [s["student_layers"] for s in student.manifest["recipe"]] == [2, 1]


def test_two_processes_on_cpu_match_one(tiny, tmp_path):
    """Two CPU processes (torchrun; Accelerate picks up its environment and uses gloo) give the
    weights of one process with the same global batch: the gradients are averaged across processes."""
    worker = Path(__file__).with_name("distill_worker.py")
    one = slimkit.distill(str(tiny("llama")), **WORKER_OPTIONS)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    two = subprocess.run([*launch, str(worker), str(tiny("llama")), str(tmp_path / "two.safetensors")],
                         capture_output=True, text=True, timeout=180, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = one.model.state_dict(), load_file(tmp_path / "two.safetensors")
    assert b and set(b) <= set(a)
    assert json.loads((tmp_path / "two.safetensors.json").read_text())["processes"] == 2
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- CLI


def _cli(*args) -> dict:
    proc = invoke_cli(*args, "--json")  # the real CLI code, in this process (no interpreter start-up)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cli_distill_then_eval_and_bench(tiny, tmp_path):
    out = _cli("distill", str(tiny("llama")), "--student-layers", "1", "--steps", "2", "--seq-len", "32",
                   "--batch-size", "2", "--out", str(tmp_path / "s"))
    assert out["training"]["steps"] == 2 and out["config"]["student_layers"] == 1
    manifest = json.loads((tmp_path / "s" / "slimkit.json").read_text())
    assert manifest["recipe"][-1]["method"] == "distill" and manifest["recipe"][-1]["loss"] == "kd"
    ev = _cli("eval", str(tmp_path / "s"), "--reference", str(tiny("llama")), "--max-tokens", "200", "--window", "64", "--stride", "32")
    assert ev["perplexity"] > 1 and ev["kl_divergence"] > 0
    bench = _cli("bench", str(tmp_path / "s"), "--seq-len", "16", "--batch-sizes", "1", "--new-tokens", "4", "--threads", "1")
    assert bench["decode_tokens_per_s"] > 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.num_hidden_layers == 1


def test_cli_encoder_options_reach_the_training(tiny, tmp_path):
    out = _cli("distill", str(tiny("bert")), "--student-layers", "1", "--steps", "2", "--seq-len", "32", "--batch-size", "2",
               "--hidden-weight", "1", "--hidden-loss", "cosine", "--layer-map", "0:1", "--freeze", "embeddings",
               "--text-views", "2", "--cache-teacher", str(tmp_path / "cache"), "--dropout", "0", "--out", str(tmp_path / "s"))
    cfg = out["config"]
    assert cfg["layer_map"] == [[0, 1]] and cfg["freeze"] == ["embeddings"] and cfg["text_views"] == 2 and cfg["hidden_loss"] == "cosine"
    assert list((tmp_path / "cache").glob("*.safetensors"))  # the teacher's outputs were cached
    assert out["training"]["steps"] == 2


@pytest.mark.parametrize(
    "args, fragments, run",
    [
        (["--student-layers", "1", "--steps", "1", "--layer-map", "1-2"], ["--layer-map takes student:teacher pairs"], invoke_cli),
        (["--student-layers", "1", "--steps", "1", "--hidden-weight", "1", "--layer-map", "0:7"], ["out of range"], run_cli),  # after the load: in a fresh interpreter
        (["--student-layers", "5", "--steps", "1"], ["student layers must be in 1..2"], invoke_cli),
        (["--student-layers", "x", "--steps", "1"], ["--student-layers must be a layer count"], invoke_cli),
        (["--student-layers", "1", "--steps", "1", "--temperature", "0"], ["temperature must be > 0"], invoke_cli),
        (["--student-layers", "1", "--steps", "1", "--loss", "mse"], ["unknown distillation loss 'mse'"], invoke_cli),
        (["--student-layers", "1"], ["give a training length"], invoke_cli),
    ],
)
def test_cli_bad_input(args, fragments, run, tiny, tmp_path):
    assert_user_error(run("distill", str(tiny("llama")), *args, "--out", str(tmp_path / "o")), *fragments)


def test_cli_help_lists_distill():
    proc = invoke_cli("--help")
    assert proc.returncode == 0 and "distill" in proc.stdout


# --------------------------------------------------------------------------- embedded models


@pytest.mark.slow
def test_minilm_three_layer_student_keeps_cosine():
    teacher = slimkit.load("minilm-l6")
    student = slimkit.distill(teacher, student_layers=3, steps=2, lr=1e-4, batch_size=8, seq_len=64, eval_batches=1, max_samples=16)
    t = student.manifest["training"]
    assert num_layers(student.model) == 3
    assert 0 < t["final_eval"] < t["initial_eval"]  # 1 - cosine to the teacher falls


@pytest.mark.slow
def test_smollm2_half_depth_student_is_a_valid_model(tmp_path):
    teacher = slimkit.load("smollm2-135m")
    student = make_student(teacher, 15)
    assert student.config.num_hidden_layers == 15 and teacher.config.num_hidden_layers == 30
    assert student.num_parameters() < 0.65 * teacher.num_parameters()
    ids = teacher.tokenizer("The def statement defines a function", return_tensors="pt").input_ids
    with torch.no_grad():
        out = student.model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


def test_classifier_student_trains_on_the_teachers_class_distribution(tiny):
    student = slimkit.distill(str(tiny("bert-cls")), student_layers=1, steps=3, lr=1e-3, **FAST)
    t = student.manifest["training"]
    assert t["eval_metric"] == "eval_kd_loss" and t["steps"] == 3 and 0 <= t["final_eval"] < 0.01
    assert student.model.config.num_labels == 3 and student.kind == "classifier"
    with pytest.raises(SlimkitError, match="loss=ce needs labels"):
        slimkit.distill(str(tiny("bert-cls")), student_layers=1, steps=1, loss="ce", **FAST)


def test_encoder_training_batches_are_cut_by_length():
    """Passages of like length share a batch (little padding); evaluation batches keep the corpus order."""
    from slimkit.core import data as D
    from slimkit.distillation.method import by_length, make_batches

    teacher = slimkit.load("minilm-l6")
    texts = ["one two three four five six seven eight nine ten " * k for k in (5, 1, 3, 1, 8, 2)]
    ordered = by_length(teacher.tokenizer, texts, seq_len=64)
    assert sorted(ordered) == sorted(texts)
    lengths = [len(teacher.tokenizer(t, truncation=True, max_length=64)["input_ids"]) for t in ordered]
    assert lengths == sorted(lengths) and lengths[-1] == 64  # the longest are cut at seq_len before they are compared
    cfg = DistillConfig(student_layers=2, steps=1, batch_size=4, seq_len=128, max_samples=64)
    source = D.TextSource.parse(None, "calibration")
    train = make_batches(teacher, source, cfg, limit=None)
    padding = sum(float((1 - b["attention_mask"]).sum()) for b in train) / sum(b["attention_mask"].numel() for b in train)
    assert padding < 0.1, padding  # shuffled passages of 4 pad about a third of every batch
    widths = [b["input_ids"].shape[1] for b in train]
    assert widths == sorted(widths)
