"""The registry of compression methods: every pruning and merging method as one declarative entry.

A method is a :class:`Method` defined in its own module under :mod:`moe_utils.compression.methods`
(one module per method or family; the registry imports every module there and collects their
``METHODS``). The entry says what the method needs (``dictionary``: CAEP's (D, R) from stage 2;
``stats``: a calibration pass, :class:`moe_utils.compression.calibration.ExpertStats`; ``hidden``: that pass
keeps MoE-block inputs; ``model``: the model itself), whether it keeps exactly each layer's quota
(:meth:`moe_utils.compression.caep.PruningBudget.quota`) and whether it removes one expert at a time (which a
group-limited router cannot route). Everything else is derived here: which methods exist and in
which order tables show them (:func:`names`), the check of a method list (:func:`check_methods`),
what a calibration pass must collect (:func:`needs_stats`, :func:`keep_hidden`), which methods a
budget cannot serve (:func:`unsupported`), the checks of the built masks (:func:`check_built`), and
the masks themselves (:func:`build`). Adding a method: book/reproducing.md.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from moe_utils.compression.caep import PruningBudget, check_ratio
from moe_utils.compression import methods as _methods_package
from moe_utils.compression.value import Compression, check_groups

#: What a method may need: CAEP's dictionary, a calibration pass, the pass's kept block inputs, the model.
NEEDS = ("dictionary", "stats", "hidden", "model")
#: MoE-block inputs per layer a calibration pass keeps for the methods that need ``hidden`` (stage 4's
#: ``output_tokens`` parameter defaults to it; stage 5 uses it).
HIDDEN_TOKENS = 512


@dataclass
class Inputs:
    """Everything a method's ``build`` may use; a method reads only what its ``needs`` name."""

    budget: PruningBudget
    stats: Any = None
    dictionary: tuple[Any, Any] | None = None
    model: Any = None
    seeds: Sequence[int] = (0, 1, 2)
    threshold_ratio: float = 0.9
    cache_dir: Any = None
    progress: bool = True
    ratios: Sequence[float] = ()

    def quota_note(self, ratio: float) -> str:
        """What the budget changed at ``ratio`` for a method that keeps each layer's quota: the guard
        (each layer keeps at least top-k experts) and the counts a group-limited router allows."""
        budget = self.budget
        quota, guarded = budget.quota(ratio), budget.quota(ratio, rounded=False)
        wanted = budget.quota(ratio, guard=False, rounded=False)
        notes = []
        if not np.array_equal(guarded, wanted):
            notes.append(f"guard: each layer keeps at least {budget.min_per_layer} experts "
                         f"(instead of {wanted.min()})")
        if not np.array_equal(quota, guarded):
            notes.append(f"group-limited routing: layers keep {sorted(set(quota.tolist()))} experts "
                         f"(instead of {sorted(set(guarded.tolist()))}), a count the router allows")
        return "; ".join(notes)


@dataclass(frozen=True)
class Method:
    """One compression method, declared once.

    Attributes:
        name: the name profiles and tables use.
        family: ``"prune"`` (experts removed) or ``"merge"`` (experts merged into the kept ones).
        build: ``(inputs, ratios) -> [Compression]``, for every ratio in order (then seeds).
        needs: a subset of :data:`NEEDS`.
        exact: True when every layer keeps exactly its quota (CAEP, global, does not).
        one_at_a_time: True when the method removes experts one by one, so that every count between
            a layer's size and its quota must be routable.
        seeded: True when the method draws one compression per seed.
        order: where tables put it (ascending).
        summary: one line for the book.
    """

    name: str
    family: str
    build: Callable[[Inputs, Sequence[float]], list[Compression]] = field(repr=False)
    needs: frozenset[str] = frozenset()
    exact: bool = True
    one_at_a_time: bool = False
    seeded: bool = False
    order: int = 100
    summary: str = ""

    def __post_init__(self):
        if self.family not in ("prune", "merge"):
            raise ValueError(f"method {self.name!r}: family must be 'prune' or 'merge', got {self.family!r}")
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown needs {sorted(unknown)}; known: {NEEDS}")


@cache
def registry() -> dict[str, Method]:
    """Every method of every module under :mod:`moe_utils.compression.methods`, in table order."""
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(_methods_package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{_methods_package.__name__}.{info.name}")
        for method in getattr(module, "METHODS", ()):
            if method.name in found:
                raise ValueError(f"method {method.name!r} is declared twice (again in {module.__name__})")
            found[method.name] = method
    return dict(sorted(found.items(), key=lambda item: item[1].order))


def names(family: str | None = None) -> tuple[str, ...]:
    """The registered methods' names in table order (of one family, when given)."""
    return tuple(n for n, m in registry().items() if family is None or m.family == family)


def get(name: str) -> Method:
    check_methods([name])
    return registry()[name]


def check_methods(methods: Sequence[str] | None) -> None:
    """ValueError naming the methods of ``methods`` that are not registered (None: every method)."""
    unknown = [m for m in methods or () if m not in registry()]
    if unknown:
        raise ValueError(f"unknown pruning method(s) {unknown}; known (pruning and merging): {', '.join(registry())}")


def needs_stats(methods: Sequence[str]) -> bool:
    """Whether any of ``methods`` needs a calibration pass."""
    return any({"stats", "hidden"} & get(m).needs for m in methods)


def keep_hidden(methods: Sequence[str], tokens: int) -> int:
    """How many MoE-block inputs per layer the calibration pass must keep: ``tokens`` if a method needs them."""
    return tokens if any("hidden" in get(m).needs for m in methods) else 0


def calibrated(family: str | None = None) -> tuple[str, ...]:
    """The methods fitted on calibration data (random masks and CAEP are not), e.g. the candidates for
    stage 5's domain-specific baseline."""
    return tuple(n for n in names(family) if "stats" in get(n).needs)


def unsupported(methods: Sequence[str], budget: PruningBudget) -> dict[str, str]:
    """``{method: why}`` for the methods of ``methods`` that cannot compress a model whose layers allow
    only the keep counts of ``budget`` (:meth:`moe_utils.compression.caep.PruningBudget.for_model`): a method that
    removes one expert at a time needs every count between a layer's size and its quota, which a
    group-limited router with ``n_group`` > 1 forbids (its counts must stay divisible by ``n_group``)."""
    gaps = [layer for layer, rule in enumerate(budget.allowed or []) if rule is not None
            and sorted(rule) != list(range(min(rule), max(rule) + 1))]
    if not gaps:
        return {}
    return {m: f"removes one expert at a time, which the group-limited routers of MoE layers {gaps} do not "
               "allow (their kept counts must stay divisible by the number of groups)"
            for m in methods if get(m).one_at_a_time}


def missing_inputs(methods: Sequence[str], inputs: Inputs) -> list[str]:
    """One line per method whose needs ``inputs`` does not provide."""
    have = {"dictionary": inputs.dictionary is not None, "stats": inputs.stats is not None,
            "hidden": inputs.stats is not None and bool(getattr(inputs.stats, "hidden", None))
            and all(len(h) for h in inputs.stats.hidden), "model": inputs.model is not None}
    words = {"dictionary": "dictionary=(D, R)", "stats": "stats", "hidden": "stats with kept hidden states",
             "model": "model"}
    out = []
    for m in methods:
        lacking = [n for n in NEEDS if n in get(m).needs and not have[n]]
        lacking = [words[n] for n in lacking if not (n == "stats" and "hidden" in lacking)]
        if lacking:
            out.append(f"{m} needs {' and '.join(lacking)}")
    return out


def build(methods: Sequence[str], ratios: Sequence[float], inputs: Inputs) -> list[Compression]:
    """Every method's compressions at every ratio, in the order of ``methods``, then ``ratios``, then
    seeds; refused up front (ValueError) for unknown methods, missing inputs, unsupported methods
    and ratios outside (0, 1)."""
    check_methods(methods)
    problems = missing_inputs(methods, inputs)
    problems += [f"{m} {why}" for m, why in unsupported(methods, inputs.budget).items()]
    if problems:
        raise ValueError("; ".join(problems))
    for ratio in ratios:
        check_ratio("prune ratio", ratio)
    inputs.ratios = list(ratios)
    out: list[Compression] = []
    for name in methods:
        out.extend(get(name).build(inputs, ratios))
    return out


def check_built(compressions: Sequence[Compression], budget: PruningBudget) -> None:
    """AssertionError unless every compression keeps at least the guard in every layer, every method
    declared ``exact`` keeps exactly each layer's quota, and every merge's groups partition the layers."""
    for c in compressions:
        kept = budget.kept_per_layer(c.keep)
        if (kept < budget.min_per_layer).any():
            raise AssertionError(f"{c.label} at {c.ratio}: a layer keeps fewer than {budget.min_per_layer} experts")
        if c.method in registry() and get(c.method).exact:
            quota = budget.quota(c.ratio)
            if kept.tolist() != quota.tolist():
                raise AssertionError(f"{c.label} at {c.ratio} keeps {kept.tolist()}, not the quota {quota.tolist()}")
        try:
            check_groups(c, list(budget.layer_sizes))
        except ValueError as err:
            raise AssertionError(str(err)) from err
