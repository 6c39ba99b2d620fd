"""The embedded default model: a small OLMoE-style MoE trained on WikiText-2 and shipped with the package.

The study must run on any CPU in minutes on a model whose routing was *learned* (a random router
has no collaboration patterns to find). This module trains one: a native transformers
``OlmoeForCausalLM`` (softmax top-k routing, no shared experts) with a byte-level BPE tokenizer
trained here with the ``tokenizers`` library, and a per-layer load-balancing auxiliary loss so
that no expert dies (:func:`balance_loss`). The result loads with plain ``AutoModelForCausalLM.from_pretrained``
and goes through exactly the same capture, pruning and evaluation code as a Hub checkpoint.

Command line (seeded and reproducible; see the model card page of the book)::

    python -m moe_utils.models.tiny_moe train --data-dir ../shared/data/wikitext-2 --out moe_utils/models/embedded/tiny-moe
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_utils.evaluation.wikitext import load_wikitext, unigram_word_perplexity, word_perplexity
from moe_utils.models.loading import EMBEDDED_DIR, parameter_counts

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


@dataclass
class TrainConfig:
    """Everything that determines the embedded model. Defaults are the shipped model's."""

    vocab_size: int = 4096  # byte-level BPE trained on WikiText-2 train
    hidden_size: int = 192
    expert_intermediate_size: int = 96  # per expert (fine-grained experts, as in OLMoE)
    num_layers: int = 6  # every layer is an MoE layer: N_e = 6 x 16 = 96
    num_heads: int = 6
    num_experts: int = 16
    top_k: int = 2
    balance_coef: float = 0.03  # weight of the per-layer load-balancing loss (see balance_loss)
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 1600
    lr: float = 3e-3
    warmup_steps: int = 150
    weight_decay: float = 0.1
    seed: int = 0
    log_every: int = 25


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE on ``text``, wrapped as a transformers fast tokenizer (EOS doubles as BOS/PAD)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None, model_max_length=1024
    )


def build_model(cfg: TrainConfig, tokenizer):
    """A randomly initialised ``OlmoeForCausalLM`` of the embedded model's shape."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.expert_intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=False,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return OlmoeForCausalLM(config)


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, computed per MoE layer and averaged over layers.

    For each layer, ``E * sum_i f_i * P_i`` with ``f_i`` the share of routed slots sent to expert
    ``i`` and ``P_i`` its mean routing probability; 1 when routing is uniform. transformers' own
    OLMoE loss pools the tokens of all layers before balancing, so expert ``i`` of one layer can
    die as long as expert ``i`` of another layer makes up for it; balancing each layer prevents that.
    """
    losses = []
    for logits in router_logits:  # (tokens, E) per layer
        probs = torch.softmax(logits.float(), dim=-1)
        n_experts = probs.shape[-1]
        chosen = torch.topk(probs, top_k, dim=-1).indices
        slot_share = torch.zeros(n_experts, device=probs.device).scatter_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device)) / chosen.numel()
        losses.append(n_experts * (slot_share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig, *, data_dir: str | None, out: Path, command: str) -> dict:
    """Train the embedded model and save it (safetensors), its tokenizer and ``training.json``."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()
    train_text = load_wikitext("train", data_dir)
    tokenizer = train_tokenizer(train_text, cfg.vocab_size)
    ids = np.asarray(tokenizer(train_text)["input_ids"], dtype=np.int64)
    log.info("train corpus: %d tokens", len(ids))
    model = build_model(cfg, tokenizer)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    n_windows = (len(ids) - 1) // cfg.seq_len
    curve = []
    bar = tqdm(range(cfg.steps), desc="training tiny MoE")
    for step in bar:
        rows = rng.integers(0, n_windows, cfg.batch_size) * cfg.seq_len
        batch = torch.from_numpy(np.stack([ids[r : r + cfg.seq_len] for r in rows]))
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        outputs = model(input_ids=batch, output_router_logits=True)
        lm_loss = torch.nn.functional.cross_entropy(
            outputs.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        aux_loss = balance_loss(outputs.router_logits, cfg.top_k)
        (lm_loss + cfg.balance_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            curve.append({"step": step, "lm_loss": lm_loss.item(), "aux_loss": aux_loss.item()})
            bar.set_postfix(lm_loss=f"{lm_loss.item():.3f}", balance=f"{aux_loss.item():.3f}")
    train_seconds = time.perf_counter() - start
    model.eval()
    test_text = load_wikitext("test", data_dir)
    quality = word_perplexity(model, tokenizer, test_text, context=cfg.seq_len)
    quality["unigram_word_perplexity"] = unigram_word_perplexity(train_text, test_text)
    quality["ratio_to_unigram"] = quality["word_perplexity"] / quality["unigram_word_perplexity"]
    record = {
        "config": asdict(cfg),
        "command": command,
        "train_seconds": round(train_seconds, 1),
        "train_tokens": int(len(ids)),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "parameters": parameter_counts(model),
        "wikitext2_test": quality,
        "loss_curve": curve,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=1))
    log.info("saved to %s: word perplexity %.1f (unigram %.1f)", out, quality["word_perplexity"],
             quality["unigram_word_perplexity"])
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_utils.models.tiny_moe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train the embedded model")
    p_train.add_argument("--data-dir", default=None, help="local WikiText-2 directory (default: the Hub)")
    p_train.add_argument("--out", type=Path, default=EMBEDDED_DIR)
    for field, default in asdict(TrainConfig()).items():
        p_train.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
    command = "python -m moe_utils.models.tiny_moe " + shlex.join(sys.argv[1:] if argv is None else argv)
    record = train(cfg, data_dir=args.data_dir, out=args.out, command=command)
    print(json.dumps({k: record[k] for k in ("train_seconds", "parameters", "wikitext2_test")}, indent=1))


if __name__ == "__main__":
    main()
