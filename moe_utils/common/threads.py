"""One thread policy for every stage: how many torch/OpenMP threads a stage's process runs.

torch's intra-op threads spin while they wait for each other. On a machine whose cores are busy
with other work (a laptop, a shared server, CI with 2 cores), torch's default of one thread per
core makes every thread wait on a preempted one: on 2 cores beside one CPU-bound process, the
embedded model's card stage went from 85 s to more than 15 minutes. So the pipeline chooses:

1. the ``threads`` parameter, if the profile or ``--set threads=N`` gives one;
2. else ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) if the user set it;
3. else from the cores free now and the work's size: the cores this process may use (its CPU
   affinity, :func:`available_cores`) minus those other processes keep busy (the runnable
   processes, :func:`busy_cores`), at least 1; and for a small model (under :data:`SMALL_MODEL`
   parameters active per token) at most :data:`SMALL_MODEL_THREADS` (2). So on an idle 2-core machine
   every stage gets 2 threads, and beside one CPU-bound process 1.

   Measured on 2 idle cores: the embedded model's card stage (00) took 148 to 174 s with 1 thread
   and ran 1.4 to 1.75 times faster with 2. The cost of 2 is on a machine that becomes busy after
   the stage has chosen: torch's threads spin while they wait for a preempted one, and a stage can
   run several times slower (``bench/results/contention.json``). A small model's stage is short, so
   the choice made at its start usually holds for all of it. More than 2 threads for a small model
   was not measured; the cap keeps its short stages from spreading over a many-core machine that
   other work shares.

The choice reaches each stage's notebook through ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` in
its kernel's environment (:func:`environment`), which torch reads when it starts.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Below this many parameters active per token, at most SMALL_MODEL_THREADS threads: more cannot gain on
#: matrices this small.
SMALL_MODEL = 100e6
SMALL_MODEL_THREADS = 2


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _running(stat: Path) -> int:
    for line in stat.read_text().splitlines():
        if line.startswith("procs_running"):
            return int(line.split()[1])
    raise ValueError(f"{stat} has no procs_running line")


def busy_cores(samples: int = 5, interval: float = 0.1, stat: Path = Path("/proc/stat")) -> float:
    """Cores other processes keep busy now: the runnable processes other than this one, averaged
    over ``samples`` readings of ``/proc/stat`` ``interval`` seconds apart. Where there is no
    ``/proc/stat``, the load of the last minute (which also counts a stage that just finished)."""
    try:
        counts = []
        for i in range(samples):
            if i:
                time.sleep(interval)
            counts.append(_running(stat) - 1)
        return max(0.0, sum(counts) / len(counts))
    except (OSError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def user_threads(environ: Mapping[str, str] = os.environ) -> int | None:
    """The thread count the user set in ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` (the first set), or None.

    ValueError if the variable is set but is not a positive integer.
    """
    for name in ENV_VARS:
        value = environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name}={value!r} is not a positive integer: set it to a thread count (e.g. 1) "
                                 "or unset it to let the pipeline choose")
            return int(value)
    return None


def choose_threads(requested: int | None = None, *, active_params: float | None = None,
                   environ: Mapping[str, str] = os.environ, cores: int | None = None,
                   load: float | None = None) -> tuple[int, str]:
    """``(threads, why)`` following the module's policy; ``cores`` and ``load`` default to this machine's."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads must be a positive integer, got {requested!r}")
        return requested, "set by the threads parameter"
    if (from_env := user_threads(environ)) is not None:
        return from_env, "set by OMP_NUM_THREADS / MKL_NUM_THREADS"
    cores = available_cores() if cores is None else cores
    load = busy_cores() if load is None else load
    free = max(1, min(cores, int(cores - load + 0.5)))
    why = f"{free} of {cores} cores free ({load:.1f} busy)"
    if active_params is not None and active_params < SMALL_MODEL and free > SMALL_MODEL_THREADS:
        return SMALL_MODEL_THREADS, f"{why}; a small model ({active_params / 1e6:.1f}M parameters active per " \
                                    f"token) uses at most {SMALL_MODEL_THREADS}"
    return free, why


@contextmanager
def environment(threads: int, environ: dict | None = None):
    """Set :data:`ENV_VARS` to ``threads`` in ``environ`` (default ``os.environ``) for the block,
    so that processes started inside it (a stage's kernel) run that many threads; restored after."""
    environ = os.environ if environ is None else environ
    before = {name: environ.get(name) for name in ENV_VARS}
    environ.update({name: str(threads) for name in ENV_VARS})
    try:
        yield threads
    finally:
        for name, value in before.items():
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value
