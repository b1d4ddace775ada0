"""The model and what feeds it: the task model around an encoder or a causal LM
(:mod:`~iss.modeling.model`, :mod:`~iss.modeling.family`), its tokenizer (:mod:`~iss.modeling.tokenizer`),
batches and per-sample losses (:mod:`~iss.modeling.batches`), precision and device
(:mod:`~iss.modeling.precision`), layer names (:mod:`~iss.modeling.layers`) and the frozen lower blocks' cached
states (:mod:`~iss.modeling.frozen`).
"""
