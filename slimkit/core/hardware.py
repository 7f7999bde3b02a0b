"""What this machine can do, read once from the CPU's flags: native bf16, int8 products
that saturate, the device a `--device` names, and the environment recorded next to
every measurement."""

from __future__ import annotations

import functools
import os
import platform

import torch

from slimkit.core.errors import SlimkitError


@functools.cache
def cpuinfo() -> tuple[str, frozenset[str]]:
    """(CPU model name, instruction-set flags) from /proc/cpuinfo; empty where unreadable."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return cpu, frozenset(flags)


def bf16_native(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls run natively (CUDA with bf16, or a CPU with AVX-512 BF16 / AMX),
    so bf16 autocast speeds training up rather than emulating bf16 slowly."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpuinfo()[1] & {"avx512_bf16", "amx_bf16"})


DEVICES = ("cpu", "cuda", "auto")


def resolve_device(device: str | None) -> str | None:
    """The device a `--device` / `device=` names, checked: "cpu", "cuda" or "cuda:N" (there must
    be such a GPU), "auto" (CUDA where torch sees a GPU, else the CPU); None stays None (where
    the model already is)."""
    if device is None:
        return None
    name = str(device).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise SlimkitError(f"device '{device}' is not supported: use --device cpu, cuda (or cuda:N) or auto")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but it sees no GPU"
            raise SlimkitError(f"--device {name} needs a CUDA GPU and this torch {torch.__version__} is {build}: use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise SlimkitError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0: use --device cuda:0")
    return name


def training_device(device: str | None) -> str | None:
    """What the training loop takes for a `--device`, checked: "cpu" where the CPU was asked for,
    else None, Accelerate's choice: a GPU where there is one, each process its own under
    `accelerate launch` or torchrun ("auto" and None keep that choice: Accelerate's cpu=True
    would also force a single process)."""
    resolve_device(device)
    return "cpu" if device is not None and str(device).strip().lower() == "cpu" else None


def int8_pairs_saturate() -> bool:
    """Whether this CPU's int8 kernels add u8 x s8 products in int16 pairs (x86 without VNNI, AVX2's
    vpmaddubsw), which saturate with full-range int8 weights: 2 x 255 x 127 > 32767. 7-bit weights fit."""
    flags = cpuinfo()[1]
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def environment(threads: int) -> dict:
    import transformers

    cpu, flags = cpuinfo()
    env = {
        "cpu": cpu,
        "cpu_features": sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni"}),
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env

