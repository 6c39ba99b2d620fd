"""The scale harness (bench/scale_model.py): the model it builds, its token meter, its process tree, its page."""

from __future__ import annotations

import json
from pathlib import Path
import os
import subprocess
import sys
import time

from bench import scale_model
from moe_utils.pipeline import scale_report
from moe_utils.models.loading import load_model, moe_layers

ABOUT = {"model_type": "olmoe", "parameters": {"total_b": 0.001, "active_b": 0.001},
         "config": {"vocab_size": 1100, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 2}}


def test_the_model_has_the_declared_shape_and_loads_through_the_registry(tmp_path):
    info = scale_model.build_model(ABOUT, tmp_path / "model")
    model, tokenizer = load_model(tmp_path / "model")
    assert info["n_parameters"] == sum(p.numel() for p in model.parameters())
    assert {k: getattr(model.config, k) for k in ABOUT["config"]} == ABOUT["config"]
    assert [(layer.num_experts, layer.top_k) for layer in moe_layers(model)] == [(8, 2), (8, 2)]
    assert tokenizer("hello")["input_ids"]
    stamp = (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns
    assert scale_model.build_model(ABOUT, tmp_path / "model") == info  # the same shape is reused, not rebuilt
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_token_meter_counts_the_positions_of_token_embeddings_only(tmp_path):
    code = ("import torch; big = torch.nn.Embedding(5000, 4); small = torch.nn.Embedding(10, 4); "
            "big(torch.zeros(2, 7, dtype=torch.long)); big(torch.zeros(1, 5, dtype=torch.long)); "
            "small(torch.zeros(3, 3, dtype=torch.long)); import os; print(os.getpid())")
    env = {**os.environ, "MOE_BENCH_TOKEN_DIR": str(tmp_path), "PYTHONPATH": str(scale_model.TOKEN_METER)}
    pid = int(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                             text=True).stdout.strip())
    assert scale_model.stage_tokens(tmp_path, {pid}) == 2 * 7 + 5
    unset = {k: v for k, v in env.items() if k != "MOE_BENCH_TOKEN_DIR"}
    subprocess.run([sys.executable, "-c", code], env=unset, check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{pid}.tokens"]  # without the variable: no count


def test_the_meter_finds_every_process_below_the_pipeline_and_their_memory():
    table = {1: (0, 10), 2: (1, 20), 3: (2, 30), 4: (2, 40), 5: (0, 50)}
    assert sorted(scale_model.descendants(1, table)) == [2, 3, 4]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        meter = scale_model.StageMeter(os.getpid(), interval=0.05)
        meter.stage = "00_x"
        time.sleep(0.5)
        meter.close()
    finally:
        child.kill()
        child.wait()
    assert child.pid in meter.pids["00_x"] and meter.peaks["00_x"] > 1e6  # a python process: megabytes


def test_the_status_page_shows_each_stage(tmp_path):
    path = tmp_path / "scale_model.json"
    path.write_text(json.dumps({
        "date": "2026-12-07T12:00:00", "machine": {"cpu_count": 2, "torch": "2.13.0"}, "profile": "granite",
        "model": {"model_type": "granitemoe", "config": {"num_hidden_layers": 24}, "n_parameters": 1_334_628_352},
        "tokenizer": "byte-level", "target": "every stage completes with peak memory under 8 GB",
        "complete": False, "meets_target": False, "peak_rss_gb": 6.5,
        "stages": [{"stage": "00_model_card", "seconds": 300.0, "threads": 1, "peak_rss_gb": 6.5,
                    "token_positions": 12000, "tokens_per_second": 40.0},
                   {"stage": "01_capture", "seconds": None, "failed": True, "threads": 1, "peak_rss_gb": 6.0,
                    "token_positions": 0, "tokens_per_second": None}],
        "notes": ["the machine was shared"]}))
    page = "\n".join(scale_report.scale_model_section(path))
    assert "params/granite.yaml" in page and "1.33B parameters" in page and "target missed" in page
    assert "| 00_model_card | 300.0 | 1 | 6.50 | 12,000 | 40.0 |" in page and "| 01_capture | failed |" in page
    assert page.endswith("\n- the machine was shared")
    assert scale_report.scale_model_section(tmp_path / "missing.json") == []


def test_the_pipeline_command_gives_each_override_its_own_set(tmp_path):
    from argparse import Namespace

    args = Namespace(profile=Path("params/granite.yaml"), artifacts_dir=tmp_path / "a", only=["05_mmlu_pro_results"],
                     set=["threads=1", 'domain_metric="bits_per_byte"'])
    command = scale_model.pipeline_command(args, tmp_path / "m")
    flags = command[3:]
    items = [flags[i + 1] for i, flag in enumerate(flags) if flag == "--set"]
    assert len(items) == len(scale_model.SMALL_LIMITS) + 2 + 2  # the limits, model and artifacts, the two given
    assert items[-2:] == ["threads=1", 'domain_metric="bits_per_byte"']  # last: they win
    assert f"model={json.dumps(str(tmp_path / 'm'))}" in items
    assert all(flags[i] in ("--set", "--only", "--profile", "--no-book") or flags[i - 1] in ("--set", "--profile",
                                                                                            "--only")
               for i in range(len(flags)))
    assert flags[-2:] == ["--only", "05_mmlu_pro_results"]
