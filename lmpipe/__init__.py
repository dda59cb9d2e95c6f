"""lmpipe: every generation of language model, trained on one corpus, as one tracked pipeline."""

__version__ = "0.1.0"
