"""rerule-lightning: reinforcement unlearning of LLMs (RULE and ReRULE) with PyTorch Lightning."""

__version__ = "0.1.0"
