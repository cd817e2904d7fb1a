"""Selection: which neurons a mask switches off. One registry of methods, each a settings model plus one ranking
function; a mask is a prefix of a method's ranking (its own size, a fixed size, or a budgeted search's choice).

    policy = MaskPolicy.isolation("acme")            # or MaskPolicy(tenant=..., forget=(...), keep=(...))
    inputs = inputs_from_files(policy, scores, model_dir, records, keep_text)   # or SelectionInputs(...)
    chosen = select(inputs, "fit")                                             # -> Selection
    chosen.to_mask(inputs).save(path)
"""

from __future__ import annotations

import time

from pydantic import BaseModel

from depn_serve.artifacts.mask import first_n

from depn_serve.core.console import Bar
from depn_serve.core.errors import DepnError
from depn_serve.selection import contrast, fit, kn, random, vote
from depn_serve.selection.base import Method, Selection, SelectionInputs, inputs_from_files

_MODEL = ("model", "tokenizer", "targets")

# The first method is the default everywhere (README, "Specificity").
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fit", "gates fitted to forget the target's secrets and keep other records and text (depn-serve's "
           "default)", fit.FitSettings, fit.rank, "depn-fit", (*_MODEL, "keep_texts")),
    Method("vote", "DEPN: integrated gradients, records vote, top-z by votes", vote.VoteSettings, vote.rank,
           "depn-vote", ("scores",)),
    Method("contrast", "integrated gradients normalized per record, target mean minus other tenants' mean, top-z",
           contrast.ContrastSettings, contrast.rank, "depn-contrast", ("scores",)),
    Method("kn", "knowledge-neurons-style: activation x gradient at the unscaled point, top-z", kn.KnSettings,
           kn.rank, "knowledge-neurons", _MODEL),
    Method("random", "neurons drawn uniformly over all layers", random.RandomSettings, random.rank, "random", ()),
)}
DEFAULT_METHOD = next(iter(METHODS))


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise DepnError(f"selection method: expected one of {list(METHODS)}, found {name!r}") from None


def select(inputs: SelectionInputs, name: str = DEFAULT_METHOD, settings: BaseModel | None = None,
           size: int | None = None, bar: Bar | None = None) -> Selection:
    """The mask method `name` picks from `inputs`: its own size, or the first `size` neurons of its ranking."""
    chosen = method(name)
    inputs.need(chosen.name, *chosen.needs)
    settings = settings if settings is not None else chosen.settings()
    if size is not None and size < 1:
        raise DepnError(f"mask size: expected a positive count, found {size}")
    started = time.perf_counter()
    ranking = chosen.rank(inputs, settings, bar)
    n = ranking.size if size is None else size
    return Selection(chosen, settings, ranking.order, first_n(ranking.order, n, inputs.shape.dims),
                     {**ranking.info, "top_z": n}, time.perf_counter() - started, chosen.provenance)


__all__ = ["METHODS", "DEFAULT_METHOD", "Method", "Selection", "SelectionInputs", "inputs_from_files", "method",
           "select"]
