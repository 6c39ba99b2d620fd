"""Where the package's old flat modules moved, so that code written against them keeps working.

Until the package was laid out by concern (models, capture, patterns, compression, evaluation,
prediction, stages, pipeline, common), every module sat directly under ``moe_utils``. :data:`MOVED`
maps each old name to its new home; :class:`MovedModuleFinder` (installed on ``sys.meta_path`` by
``moe_utils/__init__.py``) makes ``import moe_utils.hsdl``, ``from moe_utils import hsdl`` and
``from moe_utils.hsdl import HSDL`` give the very module object ``moe_utils.patterns.hsdl``, so
monkeypatching either name patches both. Four old modules share their name with the package
that now holds them (``models``, ``patterns``, ``evaluation``, ``pipeline``): such a package
forwards the attributes it does not define to the modules in :data:`FORWARDED`
(:func:`forwarding`), so ``from moe_utils.models import load_model`` still works.

The package's own code, notebooks, tests and benchmarks use the new names; this module exists
for code outside the repository.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

#: old module name (under ``moe_utils``) -> its module now
MOVED = {
    "models": "moe_utils.models.loading",
    "discovery": "moe_utils.models.discovery",
    "expert_surgery": "moe_utils.models.expert_surgery",
    "tiny_configs": "moe_utils.models.tiny_configs",
    "tiny_moe": "moe_utils.models.tiny_moe",
    "deepseek_moe": "moe_utils.models.deepseek_moe",
    "conformance": "moe_utils.models.conformance",
    "routing": "moe_utils.capture.routing",
    "store": "moe_utils.capture.store",
    "token_text": "moe_utils.capture.token_text",
    "hsdl": "moe_utils.patterns.hsdl",
    "patterns": "moe_utils.patterns.atoms",
    "cooccurrence": "moe_utils.patterns.cooccurrence",
    "annotation": "moe_utils.patterns.annotation",
    "token_null": "moe_utils.patterns.token_null",
    "hsdl_controls": "moe_utils.patterns.hsdl_controls",
    "stratified": "moe_utils.patterns.stratified",
    "expert_matrix": "moe_utils.patterns.expert_matrix",
    "null_plots": "moe_utils.patterns.null_plots",
    "domain_intervals": "moe_utils.patterns.domain_intervals",
    "caep": "moe_utils.compression.caep",
    "calibration": "moe_utils.compression.calibration",
    "pruning": "moe_utils.compression.pruning",
    "ablation": "moe_utils.compression.ablation",
    "domains": "moe_utils.compression.domains",
    "evaluation": "moe_utils.evaluation.harness",
    "blimp": "moe_utils.evaluation.blimp",
    "wikitext": "moe_utils.evaluation.wikitext",
    "data": "moe_utils.evaluation.data",
    "data_checks": "moe_utils.evaluation.data_checks",
    "pruning_eval": "moe_utils.evaluation.pruning_eval",
    "metrics": "moe_utils.evaluation.metrics",
    "paired": "moe_utils.evaluation.paired",
    "routing_prediction": "moe_utils.prediction.routing_prediction",
    "hidden_prediction": "moe_utils.prediction.hidden_prediction",
    "expert_cache": "moe_utils.prediction.expert_cache",
    "model_card": "moe_utils.stages.model_card",
    "hsdl_report": "moe_utils.stages.hsdl",
    "annotation_report": "moe_utils.stages.annotation",
    "pruning_stage": "moe_utils.stages.pruning",
    "domain_results": "moe_utils.stages.mmlu_pro_results",
    "prediction_report": "moe_utils.stages.routing_prediction",
    "explorer": "moe_utils.stages.explorer",
    "pipeline": "moe_utils.pipeline.runner",
    "scale_report": "moe_utils.pipeline.scale_report",
    "artifacts": "moe_utils.common.artifacts",
    "fingerprint": "moe_utils.common.fingerprint",
    "markup": "moe_utils.common.markup",
    "plotting": "moe_utils.common.plotting",
    "threads": "moe_utils.common.threads",
    "stats": "moe_utils.common.stats",
}

#: a package that took an old module's name -> the modules its old attributes live in now
FORWARDED = {
    "moe_utils.models": ("moe_utils.models.loading",),
    "moe_utils.patterns": ("moe_utils.patterns.atoms",),
    "moe_utils.evaluation": ("moe_utils.evaluation.harness",),
    "moe_utils.pipeline": ("moe_utils.pipeline.runner",),
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The target module has run already (:meth:`create_module` imported it)."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds ``moe_utils.<old name>`` (a key of :data:`MOVED` that is no package now) as its new module."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != "moe_utils" or name not in MOVED or f"moe_utils.{name}" in FORWARDED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(MOVED[name]))


def install() -> None:
    """Put one :class:`MovedModuleFinder` at the end of ``sys.meta_path`` (after the real finders)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())


def forwarding(package: str):
    """A module ``__getattr__`` for ``package`` (a key of :data:`FORWARDED`): an attribute it does not
    define is looked up in the modules that hold its old namesake's code."""

    def __getattr__(name: str):
        if not name.startswith("__"):
            for target in FORWARDED[package]:
                module = importlib.import_module(target)
                if hasattr(module, name):
                    return getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
