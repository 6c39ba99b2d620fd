"""The one list of the environment variables that locate the study's data.

Each data set is read from a notebook parameter, else from its variable here, else from the
Hugging Face Hub. The Makefile exports every variable of :data:`DATA_ENV` when the project's
offline copies sit next to the checkout (tests/test_layout.py checks that it names exactly these),
the fingerprint keys every reuse on what each one names (:func:`moe_utils.common.fingerprint.data_digest`),
and each loader takes its variable from here.
"""

#: MMLU-Pro, a folder of ``<split>-*.parquet`` (:mod:`moe_utils.evaluation.data`)
MMLU_PRO_ENV = "MOE_MMLU_PRO_DIR"
#: WikiText-2 raw, a folder of ``<split>-*.parquet`` (:mod:`moe_utils.evaluation.wikitext`)
WIKITEXT_ENV = "MOE_WIKITEXT_DIR"
#: MMLU, a folder of ``<split>/<subject>_<split>.csv``, for calibration (:mod:`moe_utils.compression.calibration`)
MMLU_ENV = "MOE_MMLU_DIR"
#: BLiMP, a folder of ``<paradigm>.jsonl`` (:mod:`moe_utils.evaluation.blimp`)
BLIMP_ENV = "MOE_BLIMP_DIR"

#: every data location variable, in the order the fingerprint lists them
DATA_ENV = (MMLU_PRO_ENV, WIKITEXT_ENV, MMLU_ENV, BLIMP_ENV)
