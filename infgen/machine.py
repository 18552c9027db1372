"""The machine a time was measured on, as every timing benchmark and the offline VAEs' fit record state it.

Why it matters: this project's model work (VAE fits, training, evaluation) ran 3-5× longer on 2 cores with
AVX2 only than on 2 Zen 4 cores with AVX-512 and bf16 kernels, where the README's times were measured (README,
Quick start). A VM's CPU model name may not tell them apart ("AMD EPYC"); its SIMD level does.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's `model name` on Linux, else `platform.processor()` (or the
    architecture where that is empty)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def onednn_bf16() -> bool:
    """Whether oneDNN runs bfloat16 on this CPU (AVX-512 and up, or Arm bf16); elsewhere bf16 is emulated and
    slower than float32 (torch.ops.mkldnn._is_mkldnn_bf16_supported)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def describe_machine() -> dict:
    """{"cpu": model name, "cpus": logical cores, "cpu_capability": the widest SIMD level torch's CPU kernels use
    here ("AVX512", "AVX2", "DEFAULT", ...; torch.backends.cpu.get_cpu_capability()), "onednn_bf16":
    `onednn_bf16()` (where infgen.training.autocast_bf16 autocasts on a CPU), "torch_threads": torch's intra-op
    threads now, "torch", "python", "platform"}."""
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_bf16": onednn_bf16(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
