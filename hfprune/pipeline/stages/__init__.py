"""The stages of a run: functions over a workspace, one module per kind of work.

Each stage is a function of a `Context` (`base.py`: the recipe, its `Workspace`, its pruner, its
`Providers`), and `base.Stage` gives it its declared inputs (what its fingerprint is made of) and
outputs. `hfprune.pipeline.runner.stage_table` lists a recipe's stages in order and is the one place that runs
them:

- `pretrain`: `pretrain`, a parent hfprune makes itself (`parent.pretrain`), first when there is one;
- `evaluate`: `<kind>_eval`, the scores of one model kind into metrics.json;
- `prune`: `prune`, the pruned model and its report;
- `train`: `train_<kind>`, one trained kind on the token budget;
- `publish`: `card` and `push`.

A new stage is a function here (in one of these modules or a new one) and a row in `stage_table`.
"""
