"""hfprune: prune a Hugging Face Llama parent into a small model, train it beside a random-init twin,
evaluate both and publish them.

The public surface is small on purpose: recipes (`load_recipe`), the pipeline (`run`), the pruner
registry (`get_pruner`, `PRUNERS`) and, for other training scripts, the callbacks in
`hfprune.callbacks`.
"""

__version__ = "0.1.0"
