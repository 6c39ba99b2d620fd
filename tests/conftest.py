"""Shared fixtures: tiny random models of every supported architecture, built from their configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

#: The architectures with hand-tuned tiny configs that the detailed tests use (every other MoE type is
#: checked by tests/test_conformance.py).
ARCHITECTURES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "phimoe", "deepseek_v2", "deepseek_v3",
                 "granitemoe", "gpt_oss")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TEXTS = [
    "The integral of x squared is x cubed over three.",
    "Courts interpret statutes.",
    "def f(x): return x + 1",
    "Neurons fire.",
    "In 1905 Einstein published four papers, one on special relativity.",
    "Q",
    "What is 17 * 23? Options: A. 391 B. 401",
]


@pytest.fixture(scope="session", autouse=True)
def _threads():
    """The pipeline's thread policy (moe_utils.common.threads) for the tests' own tiny models: at most 2
    threads, 1 when another process keeps a core of 2 busy (spinning threads beside it: issue 21)."""
    from moe_utils.common.threads import choose_threads

    torch.set_num_threads(choose_threads(active_params=0)[0])


@pytest.fixture(scope="session")
def random_models():
    """``{model_type: (model, tokenizer)}``, built once per test session."""
    from moe_utils.models.loading import load_model

    return {arch: load_model(f"random:{arch}") for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def olmoe(random_models):
    return random_models["olmoe"]


@pytest.fixture(scope="module")
def olmoe_stats(olmoe):
    """Calibration statistics of the tiny OLMoE on TEXTS, keeping 64 block inputs per layer."""
    from moe_utils.compression.calibration import calibrate

    model, tok = olmoe
    return calibrate(model, tok, TEXTS, batch_size=3, max_length=64, keep_hidden=64, progress=False)
