"""Several pruned models scored in one pass through lm-evaluation-harness (issue 24, "speed to pay for it").

A pruning study scores one small model under dozens of keep-masks (the paper's section 4: CAEP,
its baselines and many random masks at every ratio) on the same documents. Run one at a time,
each mask pays for its own forward passes over every document. :class:`MultiMaskLM` is
lm-evaluation-harness's own ``HFLM`` holding a *set* of keep-masks: when the harness asks it for
the log-likelihoods of the mask it is evaluating (:meth:`MultiMaskLM.select`), it scores every
request under every mask of the set in the same forward passes (each batch of token sequences
replicated once per mask, mask-major, each block of rows routed as that mask routes it by
:func:`moe_utils.models.expert_surgery.row_masked_experts`) and keeps the other masks' answers, which the
harness's runs for those masks then read. Everything else is the harness's for every mask: its
task definitions, the requests it builds (contexts, continuations, rolling windows), its
``process_results`` and aggregation.

How a request is scored is the harness's rule for causal models: the input is the context and
continuation, cut to the model's last ``max_length + 1`` tokens without the final one, right-padded;
the answer is the sum of the continuation tokens' log-probabilities and whether each was the most
likely token. Requests with the same input (one-token continuations of one context, as the
answer letters of a multiple-choice question) share one row, as the harness shares them. Rows are
grouped by length, as many per pass as ``max_tokens`` (rows x padded length, all masks together)
allows (when even one input per mask would exceed it, the masks share passes in smaller groups): a budget in tokens, not rows, because a row count sized for short texts is far too large
for long ones (stage 5's zero-shot MMLU-Pro prompts, cut to 512 tokens, took 1.5 times the CPU
time at the harness's batch size 64 as at 8; this scorer takes about what 8 does). Only the batch composition differs from scoring the masks one at a time, so the answers
agree to float rounding (tests/test_multi_mask.py checks them against one-at-a-time scoring with
the experts physically masked).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from lm_eval.models.huggingface import HFLM

from moe_utils.models.expert_surgery import row_masked_experts
from moe_utils.models.loading import moe_layers
from moe_utils.evaluation.wikitext import logit_batch_size

#: Default token budget of one forward pass: rows x padded length over all masks. The logits of a
#: 4,096-token vocabulary then take 32 MiB: on the embedded model, BLiMP's requests under 4 to 16
#: masks took about 25% less CPU time per mask than with 8,192 (128 MiB of logits, read twice
#: after being written) and than with 512 or fewer (more passes, each routing every mask).
MAX_TOKENS = 2048


class MultiMaskLM(HFLM):
    """The harness's ``HFLM`` over ``model``, answering for the keep-mask :attr:`active` of ``keeps``
    and scoring every mask of ``keeps`` in each forward pass.

    Args:
        model, tokenizer: the causal LM object and its tokenizer (as ``HFLM(pretrained=model)``).
        keeps: the keep-masks (flat boolean, X's layer-major order; a mask that keeps every expert
            is the model as it is).
        batch_size, max_length: as ``HFLM`` takes them (``max_length`` None: the model's own).
        max_tokens: rows x padded length of one forward pass, all masks together (fewer where their logits
            would exceed :data:`moe_utils.evaluation.wikitext.LOGIT_ENTRIES`).
    """

    def __init__(self, model, tokenizer, keeps: Sequence[np.ndarray], *, batch_size: int = 8,
                 max_length: int | None = None, max_tokens: int = MAX_TOKENS):
        if not len(keeps):
            raise ValueError("MultiMaskLM needs at least one keep-mask")
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        self.keeps = [np.asarray(k, dtype=bool) for k in keeps]
        self.layers = moe_layers(model)
        # and at most LOGIT_ENTRIES logits per pass: a real vocabulary makes 8,192 positions 1.6 GB (granite)
        self.max_tokens = logit_batch_size(model, int(max_tokens), 1)
        self.active = 0
        self.passes = 0  # forward passes run, for benchmarks
        self._answers: list[dict] = [{} for _ in self.keeps]
        self._encoded: dict[tuple, list[int]] = {}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """The harness's tokenization of ``string``, remembered: every mask's run asks for the same texts."""
        key = (string, add_special_tokens, left_truncate_len, tuple(sorted(kwargs.items())))
        if key not in self._encoded:
            self._encoded[key] = super().tok_encode(string, add_special_tokens=add_special_tokens,
                                                    left_truncate_len=left_truncate_len, **kwargs)
        return list(self._encoded[key])

    def select(self, index: int) -> None:
        """Answer for ``keeps[index]`` from now on; the previous mask's kept answers are dropped."""
        if not 0 <= index < len(self.keeps):
            raise IndexError(f"mask {index} of {len(self.keeps)}")
        if index != self.active:
            self._answers[self.active].clear()
        self.active = index

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """``(log-likelihood, greedy)`` of each ``(strings, context tokens, continuation tokens)``
        request under the active mask; requests not answered yet are scored under every mask."""
        keys = [(tuple(context), tuple(continuation)) for _, context, continuation in requests]
        answers = self._answers[self.active]
        missing = [key for key in dict.fromkeys(keys) if key not in answers]
        if missing:
            self._score(missing)
        out = [answers[key] for key in keys]
        for (strings, _, _), answer in zip(requests, out):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return out

    def _score(self, keys: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        by_input: dict[tuple[int, ...], list] = {}
        for context, continuation in keys:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"a request with {len(context)} context and {len(continuation)} continuation "
                                 f"tokens cannot be scored (max_length {self.max_length})")
            by_input.setdefault((context + continuation)[-(self.max_length + 1):][:-1], []).append(
                (context, continuation))
        order = sorted(by_input, key=len, reverse=True)
        # masks that share a pass: all of them, unless one input per mask of the longest input
        # would already exceed the budget (long windows of a large vocabulary)
        per_pass = max(1, min(len(self.keeps), self.max_tokens // len(order[0])))
        for first in range(0, len(self.keeps), per_pass):
            self._score_masks(list(range(first, min(first + per_pass, len(self.keeps)))), order, by_input)

    def _score_masks(self, masks: list[int], order: list[tuple[int, ...]], by_input: dict) -> None:
        """Answers of the masks ``masks`` for every input of ``order`` (longest first), passes filled
        up to the token budget."""
        n_masks = len(masks)
        with row_masked_experts(self.model, [self.keeps[m] for m in masks], self.layers):
            start = 0
            while start < len(order):
                width = len(order[start])
                chunk = order[start: start + max(1, self.max_tokens // (n_masks * width))]
                start += len(chunk)
                batch = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, tokens in enumerate(chunk):
                    batch[row, :len(tokens)] = torch.tensor(tokens)
                logits = self._model_call(batch.repeat(n_masks, 1).to(self.device))
                self.passes += 1
                # log p(token) = logit - logsumexp(logits): the full log-softmax is never materialised
                shape = (n_masks, len(chunk), width)
                normaliser = torch.logsumexp(logits.to(self.softmax_dtype or logits.dtype), dim=-1).view(shape)
                self._keep(masks, logits.view(*shape, -1), normaliser, logits.argmax(-1).view(shape), chunk, by_input)

    def _keep(self, masks: list[int], logits: torch.Tensor, normaliser: torch.Tensor, greedy: torch.Tensor, chunk,
              by_input) -> None:
        """Store the answers of ``masks`` for the requests of ``chunk`` (``logits``: masks x rows x
        positions x vocabulary; ``normaliser`` their logsumexp and ``greedy`` their argmax, masks x
        rows x positions)."""
        for row, tokens in enumerate(chunk):
            for key in by_input[tokens]:
                n = len(key[1])
                span = slice(len(tokens) - n, len(tokens))
                target = torch.tensor(key[1], device=logits.device)
                chosen = logits[:, row, span].gather(-1, target.expand(logits.shape[0], n).unsqueeze(-1)).squeeze(-1)
                lls = (chosen.to(normaliser.dtype) - normaliser[:, row, span]).sum(-1)
                hits = (greedy[:, row, span] == target).all(-1)
                for position, mask in enumerate(masks):
                    self._answers[mask][key] = (float(lls[position]), bool(hits[position]))
