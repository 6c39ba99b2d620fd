"""One conformance suite over every MoE causal LM that the installed transformers ships.

The model types are enumerated from transformers itself (:func:`moe_model_types`), never listed by
hand; each is built tiny from its own config class and checked against independent truths (see
:mod:`moe_utils.models.conformance`). A type that cannot be built tiny, or whose routing cannot be read,
is a visible xfail with its reason; a check that fails on a supported type is a failure. The
committed table that the book shows (``bench/results/conformance.json``) must agree
with this run, type by type.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from moe_utils.models.conformance import CHECKS, MERGING_CHECKS, check_model, check_model_type, moe_model_types, summary
from moe_utils.models.discovery import DiscoveryError
from moe_utils.models.loading import REGISTRY, load_model, moe_layers

TABLE = Path(__file__).resolve().parents[1] / "bench" / "results" / "conformance.json"

def _committed_rows() -> dict[str, dict]:
    return {row["model_type"]: row for row in json.loads(TABLE.read_text())["rows"]} if TABLE.is_file() else {}


def test_the_types_come_from_transformers():
    types = moe_model_types()
    assert {"olmoe", "mixtral", "deepseek_v3", "qwen3_moe", "gpt_oss", "minimax_m2"} <= set(types)
    assert "llama" not in types and "gpt2" not in types  # dense models define no *Experts class
    assert len(types) >= 50


@pytest.mark.parametrize("model_type", moe_model_types())
def test_conformance(model_type, tmp_path):
    row = check_model_type(model_type, tmp_path)
    committed = _committed_rows().get(model_type)
    assert committed is not None, f"{model_type} is missing from {TABLE}: run python -m moe_utils.models.conformance"
    compared = ("status", *CHECKS, *MERGING_CHECKS)
    assert {k: committed.get(k) for k in compared} == {k: row.get(k) for k in compared}, \
        f"{TABLE} is stale for {model_type}: run python -m moe_utils.models.conformance"
    if row["status"] == "not buildable":
        pytest.xfail(f"cannot be built tiny from its default config: {row['reason']}")
    if row["status"] == "unsupported":
        assert model_type in row["reason"] or model_type.removesuffix("_text") in row["reason"]
        pytest.xfail(f"refused with a clear error: {row['reason']}")
    assert {check: row[check] for check in CHECKS if row[check] != "pass"} == {}
    assert row["found_by"] == ("registry" if model_type in REGISTRY else "discovery")


def test_unsupported_types_get_the_reason_from_load_model():
    with pytest.raises(DiscoveryError, match=r"'jetmoe'.*no top-k expert indices"):
        load_model("random:jetmoe")


def test_the_table_lists_every_type_and_95_percent_of_the_buildable_ones_pass():
    table = json.loads(TABLE.read_text())  # each row is re-checked against this run by test_conformance
    rows = table["rows"]
    assert {row["model_type"] for row in rows} == set(moe_model_types())
    for row in rows:
        assert row["status"] == "supported" or row["reason"]
    assert table["summary"] == summary(rows)
    assert table["summary"]["share_passing"] >= 0.95


# --- a model type that transformers added "tomorrow": a layout of its own, never registered -------------
class BrandNewTopKRouter(nn.Module):
    """Sigmoid scores, a per-expert correction bias for the choice, renormalised weights."""

    def __init__(self, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_experts, hidden) / hidden ** 0.5)
        self.choice_bias = nn.Parameter(torch.linspace(-0.1, 0.1, n_experts), requires_grad=False)
        self.top_k, self.num_experts = top_k, n_experts

    def forward(self, hidden_states):
        logits = hidden_states.reshape(-1, self.weight.shape[1]) @ self.weight.T
        scores = logits.sigmoid()
        index = (scores + self.choice_bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, index)
        return logits, weights / weights.sum(-1, keepdim=True), index


class BrandNewExperts(nn.Module):
    """Fused experts called the transformers 5 way: ``experts(hidden, top_k_index, top_k_weights)``."""

    def __init__(self, hidden: int, n_experts: int, inner: int):
        super().__init__()
        self.up = nn.Parameter(torch.randn(n_experts, inner, hidden) / hidden ** 0.5)
        self.down = nn.Parameter(torch.randn(n_experts, hidden, inner) / inner ** 0.5)

    def forward(self, hidden, index, weights):
        out = torch.zeros_like(hidden)
        for slot in range(index.shape[1]):
            up = torch.einsum("nih,nh->ni", self.up[index[:, slot]], hidden).relu()
            out += weights[:, slot, None] * torch.einsum("nhi,ni->nh", self.down[index[:, slot]], up)
        return out


class BrandNewSparseBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.selector = BrandNewTopKRouter(hidden, n_experts=6, top_k=2)
        self.experts = BrandNewExperts(hidden, n_experts=6, inner=16)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, index = self.selector(flat)
        return self.experts(flat, index, weights).reshape(shape)


def test_a_model_type_nobody_registered_works_unchanged(tmp_path):
    model, tokenizer = load_model("random:olmoe")
    for layer in model.model.layers:
        layer.mlp = BrandNewSparseBlock(model.config.hidden_size)
    model.config.model_type = "brand_new_moe"
    assert "brand_new_moe" not in REGISTRY
    layers = moe_layers(model)
    assert [(layer.num_experts, layer.top_k, layer.architecture.found_by) for layer in layers] == \
        [(6, 2, "discovery")] * 3
    assert layers[0].architecture.router_attr == "selector" and layers[0].architecture.scoring == "sigmoid"
    row = check_model(model, tokenizer, tmp_path, reload=False)
    assert {check: row[check] for check in CHECKS} == {**{c: "pass" for c in CHECKS}, "save_reload": "not run"}
    assert row["merging"] == "pass"
