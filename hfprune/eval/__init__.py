"""Evaluation: held-out perplexity with its protocol, and lm-evaluation-harness on the in-memory model."""
