"""Robustness attacks on an unlearned model: is the knowledge gone, or only refused?

Pure functions and thin model loops, one file per attack; the ``rerule attack`` command
(:mod:`rerule_lightning.cli.attack`) assembles them with a datamodule's items:

* :mod:`.sampling`: k samples per item at temperature 1 (refusal, answer accuracy, leak@k / answer@k);
* :mod:`.quantize`: 8-bit and 4-bit weight quantization (bitsandbytes, else a torch weight-only quantizer);
* :mod:`.relearn`: a few fine-tuning steps on one half of the forget targets, scored on the other half (the
  halves: :mod:`rerule_lightning.primitives.halves`);
* :mod:`.prompts`: the world-independent adversarial templates (the datamodule side renders the rest);
* :mod:`.scoring`: generation metrics of item lists through :class:`~rerule_lightning.evaluation.evaluator.
  UnlearningEvaluator`, and the one table of attack results.
"""
