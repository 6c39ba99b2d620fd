"""Exact co-selection counts of expert pairs and triplets at bounded cost (the counting behind Fig 6).

The paper's "top k% coverage" (section 3, Fig 6) ranks every expert set of size r that is selected
together in at least one column of X by how often it is, and asks whether an atom's set is among
the top k%. Enumerating the r-subsets of each token's selected experts costs C(m, r) per token
(m = layers x top-k: 1.2 million triplets per token at granite's 24 x 8), so this module never
enumerates them. It needs only

* the distribution of counts over all observed r-sets (a histogram: how many sets were seen
  exactly c times), from which the count at any rank and the number of observed sets follow, and
* the exact count of the sets it is asked about (an atom's pair or triplet, or those of the
  thousands of random atoms of a chance level).

The histograms come from Gram matrices of the binary token x expert matrix B (columns of X as rows):
order 1 is the column sums of B, order 2 the upper triangle of B^T B, and order 3, for each
anchor expert a, the upper triangle of B_a^T B_a, where B_a keeps the tokens that select a and the
experts after a, so that each triplet a < b < c is counted once. Memory stays at O(E^2) plus one
block of tokens; time is that of dense matrix products (about N m E^2 / 3 multiply-adds for
triplets, N tokens, E experts), run by BLAS in blocks of tokens. A set's count is read from B^T B
once that is built (pairs), or else is the popcount of the AND of its experts' columns kept as
bitsets (N / 64 words per set): counting n sets costs n N / 64 word operations, whatever their
experts.

Counts are exact over the columns counted. At most ``max_columns`` columns are counted (a
uniformly random subset for very large X, recorded in ``n_columns`` against ``n_columns_total``):
the counts are then those of the subset, a stated estimate of the full ranking.
"""

from __future__ import annotations

from functools import cached_property, lru_cache

import numpy as np
import scipy.sparse as sp

MAX_ORDER = 3
_BLOCK_ENTRIES = 32_000_000  # entries of one dense block of tokens (128 MB in float32)


class Cooccurrence:
    """Co-selection counts of expert sets of size 1 to 3 over the columns of ``selected`` (X, N_e x N_s).

    Any non-zero entry counts as selected. At most ``max_columns`` columns are counted (a random
    subset drawn with ``random_state``; ``None`` = all).
    """

    def __init__(self, selected: sp.spmatrix | np.ndarray, *, max_columns: int | None = 50_000, random_state=0):
        if selected.ndim != 2:
            raise ValueError(f"selected must be a 2-D matrix (experts x columns), got shape {selected.shape}")
        if max_columns is not None and max_columns < 1:
            raise ValueError(f"max_columns must be >= 1 or None, got {max_columns}")
        n_rows, n_total = selected.shape
        tokens = sp.csr_matrix(sp.csc_matrix(selected).T)  # columns of X as rows: (N_s, N_e)
        tokens.eliminate_zeros()
        if max_columns is not None and n_total > max_columns:
            keep = np.sort(np.random.default_rng(random_state).choice(n_total, max_columns, replace=False))
            tokens = tokens[keep]
        tokens.data = np.ones_like(tokens.data, dtype=np.float32)
        tokens.sort_indices()
        self.n_rows, self.n_columns, self.n_columns_total = n_rows, tokens.shape[0], n_total
        # float32 products of 0/1 entries are exact integers while counts stay below 2^24
        self._dtype = np.float32 if self.n_columns < 2 ** 24 else np.float64
        self._tokens = tokens.astype(self._dtype, copy=False)
        self._histogram = lru_cache(maxsize=None)(self._compute_histogram)

    # ------------------------------------------------------------------ counting primitives
    @cached_property
    def _by_expert(self) -> sp.csr_matrix:
        """(N_e, N_s): the tokens of each expert (built when first needed: pair counts do without it)."""
        return sp.csr_matrix(self._tokens.T)

    def _gram(self, token_rows: np.ndarray | None, columns: np.ndarray) -> np.ndarray:
        """B[token_rows][:, columns]^T B[token_rows][:, columns] (all tokens if None), in blocks of tokens."""
        rows = self._tokens if token_rows is None else self._tokens[token_rows]
        rows = rows[:, columns]
        step = max(1, _BLOCK_ENTRIES // max(1, len(columns)))
        gram = None
        for start in range(0, rows.shape[0], step):
            block = rows[start:start + step].toarray()
            gram = block.T @ block if gram is None else gram + block.T @ block
        return np.zeros((len(columns), len(columns)), dtype=self._dtype) if gram is None else gram

    @cached_property
    def _pair_gram(self) -> np.ndarray:
        """(N_e, N_e) B^T B over every counted column (exact integers): built once, shared by the
        pair histogram, :meth:`pair_counts` and the look-up of pairs."""
        return self._gram(None, np.arange(self.n_rows))

    @cached_property
    def _bits(self) -> np.ndarray:
        """(N_e, ceil(N_s / 64)) uint64: the columns selecting each expert as a bitset (bit c % 64
        of word c // 64 for column c)."""
        e = self._by_expert
        if not e.has_sorted_indices:
            e.sort_indices()
        n_words = max(1, -(-self.n_columns // 64))
        expert = np.repeat(np.arange(self.n_rows, dtype=np.int64), np.diff(e.indptr))
        keys = expert * n_words + e.indices // 64
        values = np.left_shift(np.uint64(1), (e.indices % 64).astype(np.uint64))
        bits = np.zeros(self.n_rows * n_words, dtype=np.uint64)
        if len(keys):  # keys ascend (rows in order, sorted columns): OR the bits of each word at once
            starts = np.flatnonzero(np.r_[True, np.diff(keys) != 0])
            bits[keys[starts]] = np.bitwise_or.reduceat(values, starts)
        return bits.reshape(self.n_rows, n_words)

    def _bit_counts(self, sets: np.ndarray) -> np.ndarray:
        """Columns selecting every expert of each row of ``sets``: popcounts of the AND of their
        bitsets, in blocks of sets (about ``_BLOCK_ENTRIES`` bytes of words at a time)."""
        bits = self._bits
        out = np.empty(len(sets), dtype=np.int64)
        step = max(1, _BLOCK_ENTRIES // (8 * bits.shape[1]))
        for start in range(0, len(sets), step):
            block = sets[start:start + step]
            both = bits[block[:, 0]]
            for column in range(1, block.shape[1]):
                np.bitwise_and(both, bits[block[:, column]], out=both)
            out[start:start + len(block)] = np.bitwise_count(both).sum(axis=1, dtype=np.int64)
        return out

    def _anchor_tokens(self, anchor: int) -> np.ndarray:
        e = self._by_expert
        return e.indices[e.indptr[anchor]:e.indptr[anchor + 1]]

    @staticmethod
    def _upper_histogram(gram: np.ndarray, size: int) -> np.ndarray:
        """Histogram (length ``size``) of the strictly upper-triangular entries of a symmetric count matrix."""
        # the entries are exact integers: truncation converts them without rounding
        full = np.bincount(gram.ravel().astype(np.intp), minlength=size)
        diagonal = np.bincount(np.diagonal(gram).astype(np.intp), minlength=size)
        return (full - diagonal) // 2

    def _compute_histogram(self, order: int) -> np.ndarray:
        size = self.n_columns + 1
        if order == 1:
            return np.bincount(np.diff(self._by_expert.indptr), minlength=size)
        if order == 2:
            return self._upper_histogram(self._pair_gram, size)
        total = np.zeros(size, dtype=np.int64)
        for anchor in range(self.n_rows - 2):
            tokens = self._anchor_tokens(anchor)
            if len(tokens):
                total += self._upper_histogram(self._gram(tokens, np.arange(anchor + 1, self.n_rows)), size)
        return total

    # ------------------------------------------------------------------ public statistics
    @staticmethod
    def _check_order(order: int) -> None:
        if not 1 <= order <= MAX_ORDER:
            raise ValueError(f"order must be 1, 2 or 3 (singles, pairs, triplets), got {order}")

    def histogram(self, order: int) -> np.ndarray:
        """``h[c]`` = number of distinct ``order``-sets of experts selected together in exactly c columns."""
        self._check_order(order)
        out = self._histogram(order).copy()
        out[0] = 0  # sets never selected together are not observed
        return out

    def n_observed(self, order: int) -> int:
        """How many distinct ``order``-sets are selected together at least once."""
        return int(self.histogram(order).sum())

    def count_at_rank(self, order: int, rank: int) -> int:
        """The ``rank``-th largest count (1-based) among the observed ``order``-sets (ties repeat)."""
        hist = self.histogram(order)
        if not 1 <= rank <= hist.sum():
            raise ValueError(f"rank must be in 1..{hist.sum()} (the observed {order}-sets), got {rank}")
        at_least = np.cumsum(hist[::-1])[::-1]  # at_least[c] = number of observed sets with count >= c
        return int(np.nonzero(at_least >= rank)[0][-1])

    def pair_counts(self) -> np.ndarray:
        """(N_e, N_e) int64: columns selecting both experts (the diagonal: each expert's own count),
        every pair at once from the blocked Gram products."""
        return np.rint(self._pair_gram).astype(np.int64)

    def count(self, sets) -> np.ndarray:
        """Exact number of columns selecting every expert of each set (rows of ``sets``, (n, r), r <= 3)."""
        sets = np.asarray(sets, dtype=np.int64)
        if sets.ndim != 2:
            raise ValueError(f"sets must be a 2-D array (n sets x r experts), got shape {sets.shape}")
        sets = np.sort(sets, axis=1)
        n, order = sets.shape
        out = np.zeros(n, dtype=np.int64)
        if n == 0:
            return out
        self._check_order(order)
        if sets.min() < 0 or sets.max() >= self.n_rows:
            raise ValueError(f"expert rows must be in 0..{self.n_rows - 1}")
        if np.any(np.diff(sets, axis=1) == 0):
            raise ValueError("a set must not repeat an expert")
        if order == 1:
            return np.diff(self._by_expert.indptr)[sets[:, 0]].astype(np.int64)
        if order == 2 and "_pair_gram" in self.__dict__:  # B^T B is built (the pair histogram): look-ups
            return np.rint(self._pair_gram[sets[:, 0], sets[:, 1]]).astype(np.int64)
        return self._bit_counts(sets)
