"""The embedded model: its training code (determinism, balance loss), the shipped weights, WikiText helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moe_utils.models import tiny_moe
from moe_utils.models.loading import parameter_counts
from moe_utils.evaluation.wikitext import count_words, unigram_word_perplexity

CORPUS = "\n".join(
    f" = Section {i} = \n The river number {i} flows past the old mill , and the miller counts {i * 7} sacks . "
    for i in range(60)
)


@pytest.fixture
def corpus_dir(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text(CORPUS)
    return tmp_path


def test_balance_loss_is_one_when_balanced_and_larger_when_collapsed():
    n_experts, top_k = 8, 2
    balanced = torch.full((n_experts, n_experts), -5.0)
    for token in range(n_experts):  # token t prefers experts t and t+1: every expert gets 2 slots
        balanced[token, token] = balanced[token, (token + 1) % n_experts] = 5.0
    assert tiny_moe.balance_loss((balanced,), top_k).item() == pytest.approx(1.0, abs=1e-5)
    collapsed = torch.full((n_experts, n_experts), -5.0)
    collapsed[:, :2] = 5.0  # every token goes to experts 0 and 1
    assert tiny_moe.balance_loss((collapsed, balanced), top_k).item() > 2.0


def test_training_is_deterministic_and_learns(corpus_dir, tmp_path):
    cfg = tiny_moe.TrainConfig(vocab_size=300, hidden_size=32, expert_intermediate_size=16, num_layers=2,
                               num_heads=2, num_experts=4, top_k=2, seq_len=32, batch_size=4, steps=12,
                               warmup_steps=2, lr=3e-3, log_every=1)
    runs = [tiny_moe.train(cfg, data_dir=str(corpus_dir), out=tmp_path / f"run{i}", command="test") for i in (0, 1)]
    curves = [[p["lm_loss"] for p in r["loss_curve"]] for r in runs]
    assert curves[0] == curves[1]
    assert np.mean(curves[0][-3:]) < np.mean(curves[0][:3])
    from safetensors.torch import load_file

    weights = [load_file(tmp_path / f"run{i}" / "model.safetensors") for i in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    record = json.loads((tmp_path / "run0" / "training.json").read_text())
    assert record["parameters"]["total"] > record["parameters"]["active_per_token"]


def test_shipped_model_loads_plainly_and_matches_its_record():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_moe.EMBEDDED_DIR)  # no remote code, safetensors
    tokenizer = AutoTokenizer.from_pretrained(tiny_moe.EMBEDDED_DIR)
    record = json.loads((tiny_moe.EMBEDDED_DIR / "training.json").read_text())
    config = model.config
    assert config.model_type == "olmoe" and config.num_hidden_layers >= 6 and config.num_experts >= 16
    assert config.num_experts_per_tok >= 2
    assert parameter_counts(model) == record["parameters"]
    assert (tiny_moe.EMBEDDED_DIR / "model.safetensors").stat().st_size <= 30 * 2**20
    assert record["wikitext2_test"]["ratio_to_unigram"] <= 0.6
    ids = tokenizer("The river flows", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tokenizer)


def test_word_counts_and_unigram_baseline():
    assert count_words(" a b \n\n c \n") == 5  # 3 words + 2 end-of-line markers
    train, test = "a a b\n", "a b\n"
    # add-one: (count + 1) / (4 train words + 3 types + 1 unseen slot); test words a, b, <eol>
    expected = math.exp(-(math.log(3 / 8) + math.log(2 / 8) + math.log(2 / 8)) / 3)
    assert unigram_word_perplexity(train, test) == pytest.approx(expected)
