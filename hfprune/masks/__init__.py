"""Sparsity masks: the file beside a sparse checkpoint, its bit-packed in-memory form, and a sparse parent's masks."""
