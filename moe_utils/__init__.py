"""moe_utils: the library behind the study of expert collaboration in Mixture-of-Experts LLMs.

Modules, one concept each, in the order of the study:

- loading: ``models`` (load_model and the registry of layouts discovery cannot know),
  ``discovery`` (the MoE blocks of any transformers 5 model, from its modules), ``conformance``
  (every MoE causal LM of transformers, checked), ``deepseek_moe`` (the paper's DeepSeek-MoE-16B
  without its remote code), ``tiny_configs`` (any config shrunk to a tiny
  model), ``tiny_moe`` (the embedded model);
- data: ``data`` (MMLU-Pro), ``wikitext``, ``data_checks`` (the data folders, checked before a run);
- every stage: ``artifacts`` (atomic writes, digests, checksummed artifact folders, the verified
  keyed cache), ``fingerprint`` (the one key of every reuse: weights, package files, data,
  parameters), ``markup`` (model and data text made safe for the book's Markdown), ``stages`` (where each stage's artifacts live, the model caveat, glue),
  ``metrics`` (which way each metric points);
- stage 1: ``routing`` (capture), ``store`` (the routing store on disk), ``expert_matrix`` (the
  paper's X and co-activation);
- stage 2: ``hsdl`` (the estimator, paper section 3), ``patterns`` (atoms, hierarchy, coverage),
  ``hsdl_report`` (the stage's tables and numbers);
- stage 3: ``annotation`` (attribution, enrichment, labels), ``token_text`` (token classes and the
  coloured-token rendering), ``annotation_report`` (the stage's tables and numbers);
- stage 4: ``caep`` (paper section 4, Algorithm 1, and the pruning budget), ``calibration``
  (baseline scores from one calibration pass), ``compression`` (the registry of pruning and merging
  methods, one module per method under ``compression/methods``; the ``Compression`` value and its
  digest; merging: HC-SMoE, M-SMoE; ``compression.evaluate``, the one evaluator of stages 4 and 5),
  ``pruning`` (every method's masks and artifacts), ``multi_mask`` (several pruned models scored in
  one forward pass), ``expert_surgery`` (masking and physically removing experts), ``evaluation``
  (lm-evaluation-harness);
- stage 5: ``domains`` (domain-specific pruning), ``stats`` (intervals and permutation tests),
  ``domain_results`` (the stage assembled: masks, evaluation grid, findings, artifact);
- the book: ``plotting``, ``pipeline`` (papermill + Jupyter Book).
"""

from moe_utils.models import (
    MoEArchitecture, MoELayer, RouterOutput, load_model, moe_layers, register_architecture,
)

__all__ = ["MoEArchitecture", "MoELayer", "RouterOutput", "load_model", "moe_layers", "register_architecture"]
__version__ = "0.1.0"
