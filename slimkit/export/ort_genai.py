"""onnxruntime-genai export of decoder LLMs (in progress on this branch)."""

from __future__ import annotations

from slimkit.errors import SlimkitError


def build(lm, out, config) -> dict:
    raise SlimkitError("--format ort-genai is not available in this slimkit version yet: use --format onnxruntime")


def load_genai(path, manifest):
    raise SlimkitError(f"{path} is an onnxruntime-genai export, which this slimkit version cannot serve yet: upgrade slimkit")
