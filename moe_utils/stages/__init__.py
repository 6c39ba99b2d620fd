"""Where each stage keeps its artifacts, and what every page says about the model it ran on.

Each stage notebook writes under ``<artifacts_dir>/<stage>/`` (the pipeline records and verifies
that folder, :mod:`moe_utils.pipeline.runner`); later stages read the earlier ones' artifacts through
:class:`StagePaths`, so that no notebook spells a path. :func:`model_caveat` is the warning a page
shows when its numbers come from the embedded model or a randomly initialised one, never from the
paper's models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moe_utils.common.markup import code_span
from moe_utils.common.project import resolve
from moe_utils.models.loading import EMBEDDED, RANDOM_PREFIX

#: The stage notebooks, in order (``notebooks/<stage>.py``).
STAGES = ("00_model_card", "01_capture", "02_hsdl", "03_annotation", "04_pruning", "05_mmlu_pro_results",
          "06_routing_prediction", "07_explorer")


@dataclass(frozen=True)
class StagePaths:
    """The artifact folders of one run (``root`` is its ``artifacts_dir``)."""

    root: Path

    def stage(self, name: str) -> Path:
        """The folder of stage ``name`` (one of :data:`STAGES`)."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)}")
        return self.root / name

    @property
    def valid_store(self) -> Path:
        """Stage 0's routing store of WikiText-2 validation paragraphs."""
        return self.stage("00_model_card") / "valid_store"

    @property
    def store(self) -> Path:
        """Stage 1's routing store (:mod:`moe_utils.capture.store`)."""
        return self.stage("01_capture") / "store"

    @property
    def hsdl(self) -> Path:
        """Stage 2's fitted HSDL model (:meth:`moe_utils.patterns.hsdl.HSDL.save`)."""
        return self.stage("02_hsdl")

    @property
    def pruning(self) -> Path:
        """Stage 4's artifact (:func:`moe_utils.compression.pruning.save_pruning`)."""
        return self.stage("04_pruning")

    @property
    def pruning_cache(self) -> Path:
        """Stage 4's calibration, output-search and evaluation caches."""
        return self.pruning / "cache"

    @property
    def results(self) -> Path:
        """Stage 5's artifact and caches."""
        return self.stage("05_mmlu_pro_results")

    @property
    def prediction(self) -> Path:
        """Stage 6's artifact (its results and held-out routing store)."""
        return self.stage("06_routing_prediction")


def stage_paths(artifacts_dir: str | os.PathLike) -> StagePaths:
    """The run's folders; a relative ``artifacts_dir`` is taken from the project root (:func:`moe_utils.common.project.resolve`)."""
    return StagePaths(resolve(artifacts_dir))


RANDOM_CAVEAT = ("**This run used a randomly initialised model ({name}): its routing is noise, not learned "
                 "collaboration, and its scores mean nothing. Nothing on this page is a finding.**")
EMBEDDED_CAVEAT = ("The embedded model is a 7M-parameter MoE trained here on WikiText-2 (see its model card): its "
                   "routing is real and learned, but of a tiny model. The numbers illustrate the method; they are "
                   "not the paper's results on its much larger models.")


def model_caveat(model_name: str, detail: str = "") -> str | None:
    """The warning (Markdown) for a page whose numbers come from ``model_name``: the random-model
    warning, the embedded model's caveat followed by ``detail`` (what it means for this stage), or
    None for any other model."""
    if model_name.startswith(RANDOM_PREFIX):
        return RANDOM_CAVEAT.format(name=code_span(model_name))
    if model_name == EMBEDDED:
        return f"{EMBEDDED_CAVEAT} {detail}".strip()
    return None


def glue_values(**values) -> None:
    """Glue every value under its name for the book's text (myst_nb ``glue``, not displayed)."""
    from myst_nb import glue

    for name, value in values.items():
        glue(name, value, display=False)
