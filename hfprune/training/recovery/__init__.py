"""Recovery modes of the train stage beyond plain continued training.

- `hfprune.training.recovery.specs`: the recipe pieces `DistillSpec` (`train.distill`) and `LoraSpec`
  (`train.lora`); imports only pydantic.
- `hfprune.training.recovery.distill`: `DistillationLoss`, logit distillation from the parent (imports trl).
- `hfprune.training.recovery.lora`: `wrap_lora` and `merge_lora`, LoRA trained on the budget and merged into a
  plain checkpoint that keeps sparse masks (imports peft).

Validating a recipe imports only the specs, so it loads neither trl nor peft.
"""
