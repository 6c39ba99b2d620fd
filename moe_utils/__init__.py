"""moe_utils: the library behind the study of expert collaboration in Mixture-of-Experts LLMs.

Modules, one concept each: ``models`` (loading and the MoE architecture registry), ``routing``
(capture), ``store`` (the routing store on disk), ``expert_matrix`` (the paper's X and
co-activation), ``data`` (MMLU-Pro), ``wikitext`` and ``tiny_moe`` (the embedded model),
``evaluation`` (lm-evaluation-harness), ``plotting`` and ``pipeline`` (papermill + Jupyter Book).
"""

from moe_utils.models import (
    MoEArchitecture, MoELayer, RouterOutput, load_model, moe_layers, register_architecture,
)

__all__ = ["MoEArchitecture", "MoELayer", "RouterOutput", "load_model", "moe_layers", "register_architecture"]
__version__ = "0.1.0"
