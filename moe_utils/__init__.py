"""moe_utils: the library behind the study of expert collaboration in Mixture-of-Experts LLMs.

Subpackages by concern, in the order of the study (each one's docstring lists its modules):

- ``models``: loading (``models.loading``: load_model and the registry of layouts discovery cannot
  know), ``discovery`` (the MoE blocks of any transformers 5 model), ``expert_surgery`` (masking and
  physically removing experts), ``tiny_configs`` (any config shrunk to a tiny model), ``tiny_moe``
  (the embedded model), ``deepseek_moe`` (the paper's DeepSeek-MoE-16B without its remote code),
  ``conformance`` (every MoE causal LM of transformers, checked);
- ``capture`` (stage 1, paper section 1): ``routing`` (capture), ``store`` (the routing store on
  disk), ``token_text`` (token classes and the coloured-token rendering);
- ``patterns`` (stages 2 and 3): ``expert_matrix`` (the paper's X and co-activation),
  ``cooccurrence``, ``hsdl`` (the estimator, paper section 3), ``atoms`` (atoms, hierarchy,
  coverage), the controls ``token_null``, ``hsdl_controls``, ``stratified`` and their figures
  ``null_plots``, ``annotation`` (attribution, enrichment, labels), ``domain_intervals``;
- ``compression`` (stages 4 and 5): the registry of pruning and merging methods (one module per
  method under ``compression/methods``), the ``Compression`` value and its digest, merging (HC-SMoE,
  M-SMoE), ``evaluate`` (the one evaluator of stages 4 and 5, every document's score cached per
  compressed model), ``caep`` (paper section 4, Algorithm 1, and the budget), ``calibration`` (baseline scores),
  ``pruning`` (every method's masks and artifacts), ``ablation``, ``domains`` (domain-specific pruning);
- ``evaluation``: ``harness`` (lm-evaluation-harness), ``data`` (MMLU-Pro), ``wikitext``, ``blimp``,
  ``data_checks``, ``multi_mask`` (several pruned models scored in one forward pass), ``pruning_eval``
  (stage 4's measures and Table 1), ``paired``, ``metrics``;
- ``prediction`` (stage 6): ``routing_prediction``, ``hidden_prediction``, ``expert_cache``;
- ``stages``: where each stage's artifacts live and the model caveat (``stages/__init__``), and one
  glue module per notebook, named after it (``model_card``, ``hsdl``, ``annotation``, ``pruning``,
  ``mmlu_pro_results``, ``routing_prediction``, ``explorer``), returning tables, figures and Markdown;
- ``pipeline``: profiles, the run and its status page, the book (``python -m moe_utils.pipeline``);
- ``common``: ``artifacts``, ``fingerprint``, ``markup``, ``plotting``, ``stats``, ``threads``.

The old flat module names (``from moe_utils import hsdl``) still work: :mod:`moe_utils.moved`.
"""

import importlib

from moe_utils import moved
from moe_utils.models.loading import (
    MoEArchitecture, MoELayer, RouterOutput, load_model, moe_layers, register_architecture,
)

moved.install()

__all__ = ["MoEArchitecture", "MoELayer", "RouterOutput", "load_model", "moe_layers", "register_architecture"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``moe_utils.<old module name>`` after a bare ``import moe_utils`` (:data:`moved.MOVED`)."""
    if name in moved.MOVED:
        return importlib.import_module(f"moe_utils.{name}")
    raise AttributeError(f"module 'moe_utils' has no attribute {name!r}")
