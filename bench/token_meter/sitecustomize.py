"""Counts the token positions each process feeds its models, for ``bench/scale_model.py`` only.

``bench/scale_model.py`` puts this folder first on ``PYTHONPATH`` of the pipeline it starts, so the
pipeline and every stage kernel import this file at start-up. It does nothing unless
``MOE_BENCH_TOKEN_DIR`` is set; then, once the process imports torch, a global forward pre-hook
counts the positions (padding included) of every call of a token embedding (an ``nn.Embedding``
of at least :data:`MIN_VOCABULARY` rows: one call per forward pass of a language model) and keeps
the running total in ``$MOE_BENCH_TOKEN_DIR/<pid>.tokens``. torch is not imported early: the hook
is registered when the process imports torch itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

MIN_VOCABULARY = 1000
_DIR = os.environ.get("MOE_BENCH_TOKEN_DIR")


def _install(torch) -> None:
    path = os.path.join(_DIR, f"{os.getpid()}.tokens")
    total = [0]

    def count(module, inputs):
        if isinstance(module, torch.nn.Embedding) and module.num_embeddings >= MIN_VOCABULARY and inputs:
            total[0] += int(inputs[0].numel())
            with open(path + ".tmp", "w") as handle:
                handle.write(str(total[0]))
            os.replace(path + ".tmp", path)

    torch.nn.modules.module.register_module_forward_pre_hook(count)


class _AfterTorch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``torch`` through the other finders and installs the hook once it has executed."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is not None and spec.loader is not None:
            self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _install(module)


if _DIR:
    sys.meta_path.insert(0, _AfterTorch())
