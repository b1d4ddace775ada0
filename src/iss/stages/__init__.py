"""The stages of a run, one module per stage, in the order data flows through them.

:mod:`~iss.stages.context` (the run's shared state: its config, run folder, device and the checks every stage
may make) -> :mod:`~iss.stages.inputs` (task data, tokenizer) -> :mod:`~iss.stages.retrieval` (BM25 pool) ->
:mod:`~iss.stages.warmup` (the fitted MLM head, the warm-up) -> :mod:`~iss.stages.influence` ->
:mod:`~iss.stages.select` -> :mod:`~iss.stages.train` (pretrain, fine-tune, evaluate) ->
:mod:`~iss.stages.mechanism`. Each stage module owns its body and fingerprint parts (a function of a
:class:`~iss.stages.context.StageContext` that returns the stage's :class:`~iss.runs.StageResult`) and the price
of its work (a function of a :class:`~iss.stages.price.Workload` that returns a
:class:`~iss.stages.price.Price`); stage names are the run folder's layout, kept in :mod:`iss.plan`. A module
imports only the modules before it. :class:`iss.Pipeline` adds the variants (method, budget, layer) and
``run_all``; :mod:`iss.estimate` sums the prices.
"""

from iss.stages import context, inputs, retrieval, warmup, influence, select, train, mechanism  # noqa: I001 (data-flow order)

__all__ = ["context", "influence", "inputs", "mechanism", "retrieval", "select", "train", "warmup"]
