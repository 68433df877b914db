"""lm-eval tasks shipped with hfprune (task YAMLs, their data and `tasks.py`); see `hfprune.eval.lmeval`."""
