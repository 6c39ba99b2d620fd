"""What every benchmark records about the machine it ran on (shared by the scripts of ``bench/``).

A benchmark's numbers mean little without the machine, the thread settings and the load it ran
under: on a shared 2-core machine the load average at start and end tells a quiet run from a
noisy one. Call :func:`machine_info` before timing and :func:`finish_machine_info` after.
"""

from __future__ import annotations

import os
import platform

import numpy as np
import torch


def machine_info() -> dict:
    """Platform, CPUs, torch threads, library versions, GPU and load average at the start."""
    import transformers

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = list(os.getloadavg())
    return info


def finish_machine_info(info: dict) -> dict:
    """Add the load average at the end of the run to ``info`` (in place); returns it."""
    if hasattr(os, "getloadavg"):
        info["loadavg_at_end"] = list(os.getloadavg())
    return info
