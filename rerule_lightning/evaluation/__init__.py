"""Layer 2, evaluation: torchmetrics metrics and their functional twins (:mod:`.metrics`), the evaluation
splits of a benchmark (:mod:`.suite`) and the evaluator that generates, scores and writes ``eval.json``
(:mod:`.evaluator`).

Imports only :mod:`rerule_lightning.primitives`; never an algorithm or a DataModule."""
