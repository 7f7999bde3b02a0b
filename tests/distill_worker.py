"""Run by test_distill.py, alone or under `accelerate launch --num_processes 2 --cpu`:
distil a tiny teacher for a few steps and write the student's weights (main process)."""

import json
import sys

from safetensors.torch import save_file

import slimkit

# fp32 (mixed_precision="no"): bf16 rounds differently when the batch is split across processes
WORKER_OPTIONS = dict(student_layers=1, steps=3, lr=1e-3, seq_len=32, batch_size=4, eval_batches=1, max_samples=8, hidden_weight=0.5,
                      mixed_precision="no")

if __name__ == "__main__":
    from accelerate import PartialState

    teacher, out = sys.argv[1], sys.argv[2]
    student = slimkit.distill(teacher, **WORKER_OPTIONS)
    if PartialState().is_main_process:
        save_file({k: v.contiguous() for k, v in student.model.state_dict().items() if k != "lm_head.weight"}, out)
        with open(out + ".json", "w") as fh:
            json.dump(student.manifest["training"], fh)
