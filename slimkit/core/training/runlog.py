"""A run's metrics: JSON lines (metrics.jsonl) in the log directory, and TensorBoard
scalars when TensorBoard is installed. Only the main process writes; every process
keeps the evaluations, which the result reports as its history."""

from __future__ import annotations

import json
from pathlib import Path


class RunLog:
    """Metrics as JSON lines (metrics.jsonl), and to TensorBoard when it is installed."""

    def __init__(self, log_dir: str | None, main: bool):
        self.file = self.tb = None
        self.evals: list[dict] = []  # kept for TrainResult.history
        if not (log_dir and main):
            return
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(log_dir) / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir)
        except ImportError:
            self.tb = None

    def write(self, record: dict) -> None:
        if record["event"] == "eval":
            self.evals.append({k: v for k, v in record.items() if k != "event"})
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"{record['event']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
