"""Killing a save, an export or an optimize run never leaves an artifact that loads half-written.

Each trial runs in a process forked from a fork server that has imported
everything already (tests/interruption_worker.py), and is killed with SIGKILL:
no cleanup runs."""

import random
import signal
import time

import pytest

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.io.artifacts import MANIFEST

SAVE_TRIALS = 12  # kills at random times, on top of one just before each change a save makes to the disk


@pytest.fixture(scope="module")
def fork_server():
    import multiprocessing

    import interruption_worker

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(interruption_worker.PRELOAD + ["interruption_worker"])
    warm = ctx.Process(target=interruption_worker.nothing)  # starts the server: its imports are not a trial's time
    warm.start()
    warm.join()
    return ctx


@pytest.mark.slow
def test_a_save_killed_before_any_of_its_disk_changes_leaves_nothing_half_written(fork_server, tiny, tmp_path):
    """Every stage, deterministically: one kill just before each file-system change the save makes (its
    temporary directory, each file, the manifest, the rename into place, the cleanup)."""
    import interruption_worker

    model = tiny("gpt2")
    reference = slimkit.load(model)

    def save(out, kill_at):
        receive, send = fork_server.Pipe(duplex=False)
        child = fork_server.Process(target=interruption_worker.save_killed_at, args=(str(model), str(out), kill_at, send))
        child.start()
        send.close()  # the child holds the only sending end: a child that dies makes recv() fail, not hang
        changes = receive.recv() if kill_at is None else None
        child.join()
        return child.exitcode, changes

    exitcode, changes = save(tmp_path / "whole" / "out", None)
    assert exitcode == 0 and f"open {MANIFEST}" in changes and any(c.startswith(("os.rename", "os.replace")) for c in changes), changes
    for k, change in enumerate(changes):
        trial = tmp_path / f"before-{k}"
        trial.mkdir()
        exitcode, _ = save(trial / "out", k)
        assert exitcode == -signal.SIGKILL, (k, change)  # died just before this change
        _left_complete_or_refused(trial, reference)


@pytest.mark.slow
def test_killed_saves_never_leave_a_loadable_half_artifact(fork_server, tiny, tmp_path):
    """At random times, so kills land inside a write too (the weights and the tokenizer are written in one call each)."""
    import interruption_worker

    rng = random.Random(1234)
    model = tiny("gpt2")
    reference = slimkit.load(model)
    for trial in range(SAVE_TRIALS):
        out = tmp_path / f"trial-{trial}"
        out.mkdir()
        ready = fork_server.Event()
        child = fork_server.Process(target=interruption_worker.save_forever, args=(str(model), str(out), ready))
        child.start()
        assert ready.wait(120)
        time.sleep(rng.uniform(0.0, 0.4))
        child.kill()
        child.join()
        _left_complete_or_refused(out, reference)


def _left_complete_or_refused(parent, reference):
    for entry in parent.iterdir():
        if not entry.name.startswith("."):  # a visible artifact is always complete
            _assert_complete(slimkit.load(str(entry)), reference)
            continue
        try:  # a temporary directory is either refused, or complete (killed just before the rename)
            lm = slimkit.load(str(entry))
        except SlimkitError:
            continue
        _assert_complete(lm, reference)


def _assert_complete(lm, reference):
    import torch

    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, reference.model(input_ids=ids).logits)


# --------------------------------------------------------------------------- export and optimize
#
# Each trial runs the whole command and kills it after a random delay. The
# delays are stratified over 0 to 1.1 times the length of an uninterrupted run
# (trial i of n dies at a random point of the i-th n-th), so kills land in
# every phase, the short final writes included, and a run or two finishes.

EXPORT_TRIALS = 10
OPTIMIZE_TRIALS = 12


def _trials(ctx, target, model, tmp_path, trials: int, seed: int, check, same) -> list[str]:
    """Run `target(model, OUT)` once whole, then `trials` times killed, and check what each left.

    check(out, reference) -> reference: asserts a visible OUT is complete (reference is
    what the whole run's check returned, None for that run); same(lm, reference): asserts
    that a model loaded from a leftover temporary directory is one the run meant to write.
    """
    rng = random.Random(seed)
    whole = tmp_path / "whole"
    whole.mkdir()
    started = time.perf_counter()
    child = ctx.Process(target=target, args=(str(model), str(whole / "out")))
    child.start()
    child.join()
    length = time.perf_counter() - started
    assert child.exitcode == 0 and sorted(p.name for p in whole.iterdir()) == ["out"]
    reference = check(whole / "out", None)
    outcomes = []
    for trial in range(trials):
        d = tmp_path / f"trial-{trial}"
        d.mkdir()
        child = ctx.Process(target=target, args=(str(model), str(d / "out")))
        child.start()
        child.join(1.1 * length * (trial + rng.random()) / trials)
        child.kill()  # SIGKILL: no cleanup runs
        child.join()
        outcomes.append("finished" if child.exitcode == 0 else "killed")
        for entry in d.iterdir():
            if not entry.name.startswith("."):  # a visible directory is always complete
                assert entry.name == "out"
                check(entry, reference)
                continue
            for leftover in _dirs_with_files(entry):  # temporary directories: refused, or complete
                try:
                    lm = slimkit.load(str(leftover))
                except SlimkitError:
                    continue
                same(lm, reference)
    return outcomes


def _dirs_with_files(root):
    """root and every directory under it that holds files (a temporary directory, and work inside one)."""
    return [p for p in [root, *root.rglob("*")] if p.is_dir() and any(f.is_file() for f in p.iterdir())]


def _encoder_outputs(lm):
    import torch

    ids = torch.arange(5, 21).reshape(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        return lm.model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.slow
def test_killed_exports_never_leave_a_loadable_half_export(fork_server, tiny, tmp_path):
    import interruption_worker
    import torch

    model = tiny("bert")
    expected = _encoder_outputs(slimkit.load(str(model)))

    def same(lm, reference):
        assert lm.manifest["runtime"] == "onnxruntime"
        torch.testing.assert_close(_encoder_outputs(lm), expected, rtol=0, atol=1e-4)

    def check(out, reference):
        same(slimkit.load(str(out)), reference)  # loads: every hash verified, an ONNX Runtime session built

    outcomes = _trials(fork_server, interruption_worker.export_cli, model, tmp_path, EXPORT_TRIALS, 4321, check, same)
    assert "killed" in outcomes


@pytest.mark.slow
def test_killed_optimize_runs_never_leave_a_half_written_result(fork_server, tiny, tmp_path):
    import json

    import interruption_worker
    import torch

    model = tiny("llama")
    ids = torch.arange(3, 30)[None]

    def logits(lm):
        with torch.no_grad():
            return lm.model(input_ids=ids).logits

    original = logits(slimkit.load(str(model)))

    def same(lm, winner):  # work directories hold the original and the candidate
        assert torch.equal(logits(lm), original) or torch.equal(logits(lm), winner)

    def check(out, reference):
        assert sorted(p.name for p in out.iterdir()) == ["model", "report.html", "report.md", "results.json"]
        assert json.loads((out / "results.json").read_text())["winner"] == "test-bf16"
        assert "Use test-bf16" in (out / "report.md").read_text()
        lm = slimkit.load(str(out / "model"))
        assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
        assert reference is None or torch.equal(logits(lm), reference)
        return logits(lm)

    outcomes = _trials(fork_server, interruption_worker.optimize_run, model, tmp_path, OPTIMIZE_TRIALS, 8765, check, same)
    assert "killed" in outcomes
