"""The stages of a run, as a table of functions over a workspace.

`table.stage_table(recipe)` lists them in order, each with its declared inputs (what its fingerprint is
made of) and outputs; `hfprune.pipeline` is the one module that executes the table. Each stage is a
function of a `Context` (recipe, `Workspace`, pruner, `Providers`), in its own module:

- `evaluate`: `<kind>_eval`, the scores of one model kind into metrics.json;
- `prune`: `prune`, the pruned model and its report;
- `train`: `train_<kind>`, one trained kind on the token budget;
- `publish`: `card` and `push`.

A new stage is a function in one of these modules (or a new one) and a row in `table.stage_table`.
"""

from hfprune.stages.table import Context, Stage, make_pruner, making_stage, stage_table


__all__ = ["Context", "Stage", "make_pruner", "making_stage", "stage_table"]
