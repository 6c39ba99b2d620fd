"""Stage 0's model card describes whichever model the profile names (moe_utils.stages.model_card)."""

from __future__ import annotations

import pytest

from moe_utils.stages import model_card
from moe_utils.models.loading import moe_layers, parameter_counts
from moe_utils.models.tiny_configs import random_model
from moe_utils.evaluation.wikitext import count_words


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_parameter_counts_against_the_config(model_type):
    """Routed-expert parameters from the config's shapes (gate, up, down of E experts per MoE layer);
    Qwen2-MoE's shared expert is outside the routed experts and always active."""
    model, _ = random_model(model_type)
    cfg = model.config
    n_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    expert_size = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    routed = cfg.num_hidden_layers * n_experts * 3 * cfg.hidden_size * expert_size
    counts = parameter_counts(model)
    assert counts["routed_experts"] == routed
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["active_per_token"] == counts["total"] - routed + routed * cfg.num_experts_per_tok // n_experts


def test_kind_of_names():
    assert model_card.kind_of("embedded") == "embedded"
    assert model_card.kind_of("random:olmoe") == "random"
    assert model_card.kind_of("allenai/OLMoE-1B-7B-0924") == "checkpoint"


def test_limited_text_keeps_the_first_lines_and_counts_words_like_the_split(tmp_path):
    (tmp_path / "test.txt").write_text(" \n = Title = \n\n a b c \n d e \n\n f \n")
    full = model_card.wikitext_text("test", tmp_path)
    assert model_card.wikitext_text("test", tmp_path, None) == full
    first_two = model_card.wikitext_text("test", tmp_path, 2)
    assert first_two.split("\n")[:2] == [" = Title = ", " a b c "]
    assert count_words(first_two) == 4 + 4  # "= Title =" (3 words) and "a b c", each with its end of line
    assert model_card.paragraphs(full) == ["a b c", "d e", "f"]
    assert model_card.text_extent(first_two) == "1 paragraphs, 8 words"


def test_architecture_table_reads_the_model_as_discovery_does():
    model, _ = random_model("qwen2_moe")
    counts = parameter_counts(model)
    table = model_card.architecture_table(model, counts)
    cfg = model.config
    assert table.loc["routed experts per MoE layer", "value"] == str(cfg.num_experts)
    assert table.loc["top-k", "value"] == str(cfg.num_experts_per_tok)
    assert table.loc["parameters, total", "value"] == f"{counts['total']:,}"
    assert "weights on disk" not in table.index


def test_summary_states_training_only_for_a_recorded_model():
    import numpy as np

    model, _ = random_model("olmoe")
    counts, layers = parameter_counts(model), moe_layers(model)
    usage = np.full((len(layers), layers[0].num_experts), 1 / layers[0].num_experts)
    plain = model_card.summary("random:olmoe", counts, layers, 1234.5, 2.0, usage, None)
    assert "Trained here" not in plain and "Licence" not in plain and "1,234" in plain and "2 times" in plain
    assert f"{1 / layers[0].num_experts:.2%} of its layer's slots" in plain
    trained = model_card.summary("embedded", counts, layers, 195.0, 0.21, usage, {"train_seconds": 600})
    assert "Trained here in 10 minutes" in trained and "Licence" in trained and "BLiMP" not in trained
    from types import SimpleNamespace

    with_blimp = model_card.summary("embedded", counts, layers, 195.0, 0.21, usage, None,
                                    blimp=(SimpleNamespace(estimate=0.589, low=0.579, high=0.598), 6700))
    assert "BLiMP accuracy 58.9% [57.9%, 59.8%] on 6,700 minimal pairs" in with_blimp.split("\n")[2]
