"""The profiles of ``params/``: valid parameters, a truthful ``about`` block, an architecture the registry reads.

No checkpoint is downloaded: each profile's declared architecture is rebuilt from its config fields,
at full size on the ``meta`` device (shapes without memory) to check the layer, expert and parameter
counts it declares, and at tiny size to run a real routing capture through it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from moe_utils.common.project import BENCH_RESULTS
from moe_utils.pipeline import profiles
from moe_utils.pipeline import runner as pipeline
from moe_utils.models.conformance import moe_model_types
from moe_utils.models.loading import REGISTRY, moe_layers
from moe_utils.pipeline.profiles import PipelineError, load_about, load_profile, validate, validate_about

from moe_utils.models.deepseek_moe import REMOTE_MODEL_TYPE, DeepseekMoeForCausalLM, port_config

#: DeepSeek-MoE's shape fields at tiny width (the routing fields come from the profile).
TINY_DEEPSEEK = dict(vocab_size=300, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1)

PROFILES = sorted(pipeline.PROFILES.glob("*.yaml"))
#: Config fields that hold the routed-expert count or the top-k, under each architecture's own name.
ROUTING_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok")


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _is_hub_model(path: Path) -> bool:
    model = load_profile(path).get("model", "embedded")
    return model != "embedded" and not model.startswith("random:")


REAL = [p for p in PROFILES if _is_hub_model(p)]
DECLARED = [p for p in PROFILES if "config" in (load_about(p) or {})]


@pytest.fixture(scope="module")
def stages():
    return profiles.discover_stages()


def test_the_issue_profiles_exist():
    wanted = {"microsoft/Phi-3.5-MoE-instruct", "deepseek-ai/deepseek-moe-16b-base", "allenai/OLMoE-1B-7B-0924",
              "Qwen/Qwen1.5-MoE-A2.7B", "ibm-granite/granite-3.1-1b-a400m-instruct"}
    assert wanted <= {load_profile(p)["model"] for p in REAL}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_validates_without_its_about_block(stages, path):
    params = load_profile(path)
    assert profiles.ABOUT not in params
    validate(params, stages)


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_profiles_set_only_what_differs_from_the_defaults(stages, path):
    """The default and smoke profiles spell out their settings for readers; the others change only what they need."""
    defaults: dict[str, list] = {}
    for stage in stages:
        for name, value in stage.defaults.items():
            defaults.setdefault(name, []).append(value)
    params = load_profile(path)
    for key, value in params.items():
        assert any(value != default for default in defaults[key]), f"{path.name}: {key} = {value!r} is the default"
    assert params["artifacts_dir"] == f"artifacts/{path.stem}"  # never overwrite another profile's artifacts


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_about_block_is_complete_and_names_a_supported_architecture(path):
    about = load_about(path)
    assert about is not None, f"{path.name} has no about block"
    assert set(profiles.ABOUT_REQUIRED) <= set(about)
    assert about["model_type"] in REGISTRY or about["model_type"] in moe_model_types()
    params = load_profile(path)
    model = params.get("model", "embedded")
    if model.startswith("random:"):
        assert about["model_type"] == model.removeprefix("random:")
    if model == "embedded":
        from moe_utils.models.tiny_moe import EMBEDDED_DIR

        shipped = json.loads((EMBEDDED_DIR / "config.json").read_text())
        assert about["model_type"] == shipped["model_type"]
        assert {k: shipped[k] for k in about["config"]} == about["config"]
    if _is_hub_model(path):
        assert {"parameters", "config"} <= set(about)
        from transformers import CONFIG_MAPPING

        # Remote code is asked for exactly when neither transformers nor this project (the DeepSeek-MoE
        # port) has a class for the architecture; without it, the gate returns no logits to record.
        native = about["model_type"] in CONFIG_MAPPING or about["model_type"] == REMOTE_MODEL_TYPE
        assert params.get("trust_remote_code", False) == (not native)
        if not native:
            assert "record_probs" in params and params["record_probs"] is False


@pytest.mark.parametrize("about, message", [
    ({"summary": "s", "model_type": "olmoe", "hardware": "h"}, "missing about.time"),
    ({"summary": "s", "model_type": "olmoe", "hardware": "h", "time": "an hour"}, "estimate or measured"),
    ({"summary": "s", "model_type": "olmoe", "hardware": "h", "time": "estimate", "gpu": "yes"}, "unknown field"),
    ({"summary": "s", "model_type": 3, "hardware": "h", "time": "estimate"}, "about.model_type must be str"),
    ({"summary": "s", "model_type": "olmoe", "hardware": "h", "time": "estimate",
      "parameters": {"total_b": 7}}, "total_b and active_b"),
    (["not", "a", "mapping"], "must be a mapping"),
])
def test_invalid_about_blocks_are_errors(about, message):
    with pytest.raises(PipelineError, match=message):
        validate_about(about)


def test_about_is_shown_on_the_status_page_and_never_reaches_a_notebook(tmp_path):
    notebooks = tmp_path / "nb"
    notebooks.mkdir()
    (notebooks / "01_only.py").write_text(
        "# ---\n# jupyter:\n#   kernelspec:\n#     display_name: Python 3\n#     language: python\n"
        '#     name: python3\n# ---\n\n# %% tags=["parameters"]\nx = 1\n\n# %%\nassert "about" not in dir()\n')
    profile = tmp_path / "p.yaml"
    about = {"summary": "A test model <b>.", "model_type": "olmoe", "hardware": "a CPU", "time": "estimate: 1 s",
             "parameters": {"total_b": 1.5, "active_b": 0.25}, "paper": "none"}
    profile.write_text(yaml.safe_dump({"x": 2, "about": about}))
    status = pipeline.run(profile, notebooks=notebooks, executed=tmp_path / "executed")
    assert status["about"] == about and status["stages"][0]["parameters"] == {"x": 2}
    page = (tmp_path / "executed" / "status.md").read_text()
    for text in ("## The profile", "A test model <b>.", "`olmoe`", "1.5B in all, 250M used per token",
                 "**Hardware:** a CPU", "**Time:** estimate: 1 s", "**The paper's setting:** none"):
        assert text in page
    profile.write_text(yaml.safe_dump({"x": 2, "about": {**about, "time": "fast"}}))
    with pytest.raises(PipelineError, match="estimate or measured"):
        pipeline.run(profile, notebooks=notebooks, executed=tmp_path / "executed")


# --- the declared architecture, rebuilt from its config fields ---

def _declared(path: Path) -> tuple[dict, dict]:
    about = load_about(path)
    return about, dict(about["config"])


@pytest.mark.parametrize("path", DECLARED, ids=lambda p: p.stem)
def test_declared_architecture_matches_its_layer_expert_and_parameter_counts(path):
    """Full size on the meta device: the registry finds every MoE layer, and the parameters are as declared."""
    about, config = _declared(path)
    n_experts = next(config[f] for f in ROUTING_FIELDS[:3] if f in config)
    if about["model_type"] == REMOTE_MODEL_TYPE:  # DeepSeek-MoE: its port, from the checkpoint's own fields
        with torch.device("meta"):
            model = DeepseekMoeForCausalLM(port_config(config))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(about["model_type"], **config))
    total = sum(p.numel() for p in model.parameters())
    idle = sum(sum(p.numel() for p in layer.experts.parameters()) * (1 - layer.top_k / layer.num_experts)
               for layer in moe_layers(model))
    active = total - idle
    if about["parameters"].get("active_counts_input_embedding") is False:  # as some model cards count
        active -= model.get_input_embeddings().weight.numel()
    layers = moe_layers(model)
    assert len(layers) == config["num_hidden_layers"] - config.get("first_k_dense_replace", 0)
    assert {(layer.num_experts, layer.top_k) for layer in layers} == {(n_experts, config["num_experts_per_tok"])}
    declared = about["parameters"]
    assert math.isclose(total / 1e9, declared["total_b"], rel_tol=0.03), (total, declared)
    assert math.isclose(active / 1e9, declared["active_b"], rel_tol=0.03), (active, declared)


@pytest.mark.parametrize("path", DECLARED, ids=lambda p: p.stem)
def test_tiny_model_of_the_declared_architecture_captures_routing(path, tmp_path):
    """The architecture's own config class at tiny width, with the declared expert count and top-k."""
    from moe_utils.capture.routing import capture_routing
    from moe_utils.models.tiny_configs import byte_tokenizer, tiny_config

    about, config = _declared(path)
    routing = {k: v for k, v in config.items() if k in ROUTING_FIELDS}
    torch.manual_seed(0)
    if about["model_type"] == REMOTE_MODEL_TYPE:  # the port at tiny width, from the checkpoint's field names
        model = DeepseekMoeForCausalLM(port_config({**TINY_DEEPSEEK, **routing}))
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(tiny_config(about["model_type"], **routing))
    model.eval()
    tokenizer = byte_tokenizer()
    store = capture_routing(model, tokenizer, ["Which experts?", "A law question."], out_dir=tmp_path / "store",
                            batch_size=2, progress=False)
    n_experts = next(config[f] for f in ROUTING_FIELDS[:3] if f in config)
    assert (store.n_experts, store.top_k) == (n_experts, config["num_experts_per_tok"])
    assert store.n_layers == len(moe_layers(model))


def test_measured_profile_times_quote_the_measured_rate_and_the_others_say_not_measured():
    """A profile's about.time gives the rate bench/profile_rates.py measured at its shape, or says it was not
    measured: no time is read off an assumed throughput."""
    rates = json.loads((BENCH_RESULTS / "profile_rates.json").read_text())
    measured = {row["profile"]: row for row in rates["profiles"] if "tokens_per_second" in row}
    assert measured, "bench/results/profile_rates.json measured no profile"
    for path in DECLARED:
        time = " ".join(load_about(path)["time"].split())
        if path.stem in measured:
            assert f"{measured[path.stem]['tokens_per_second']:.0f} tokens per second" in time, path.stem
            assert time.startswith("Measured")
        elif path.stem not in ("tiny", "smoke"):
            assert time.startswith("Not measured"), path.stem
