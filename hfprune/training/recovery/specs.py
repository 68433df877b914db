"""Recipe pieces of the recovery modes: `train.distill` (`DistillSpec`) and `train.lora` (`LoraSpec`).

The recipe schema (`hfprune.recipe.schema`) includes these models; the train stage hands them to
`hfprune.training.recovery.distill.DistillationLoss` and `hfprune.training.recovery.lora.wrap_lora`. This module imports
only pydantic, so validating a recipe never loads trl or peft.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from hfprune.recipe.base import Strict


LLAMA_LINEAR_PROJECTIONS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""The seven linear projections of a Llama-family decoder layer: LoRA's default targets."""

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


class DistillSpec(Strict):
    """Logit distillation from the parent (the teacher) into the trained model (the student).

    Per token the loss is `alpha * T^2 * D(teacher, student) + (1 - alpha) * CE(student, next token)`,
    with both distributions softened by the temperature `T` (the `T^2` keeps the distillation gradient's
    scale independent of `T`, as in Hinton et al. 2015); padding positions (labels -100) are excluded.

    Example (recipe):
        train:
          distill: {alpha: 1.0, temperature: 1.0, divergence: forward_kl}
    """

    alpha: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="weight of the distillation term; 1 - alpha weights plain next-token loss",
    )
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature applied to both models' logits")
    divergence: Divergence = Field(
        "forward_kl",
        description="forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher); "
        "jsd: generalised Jensen-Shannon with mixture (1 - beta) * student + beta * teacher",
    )
    beta: float = Field(
        0.5, gt=0.0, lt=1.0, description="mixture weight of the generalised JSD (divergence: jsd)"
    )

    @model_validator(mode="after")
    def _beta_only_for_jsd(self) -> DistillSpec:
        if "beta" in self.model_fields_set and self.divergence != "jsd":
            raise ValueError(f"beta applies only to divergence: jsd (divergence is {self.divergence})")
        return self

    @property
    def trl_beta(self) -> float:
        """The divergence as trl's single `beta`: 0 is forward KL, 1 reverse KL, in between the JSD."""
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.divergence, self.beta)


class LoraSpec(Strict):
    """LoRA recovery: low-rank adapters trained on the budget, merged into the weights before saving.

    The defaults (rank 16, alpha 32, dropout 0.05, all seven projections) are the usual choice for
    Llama-family decoders.

    Example (recipe):
        train:
          lora: {rank: 16, alpha: 32, dropout: 0.05}
    """

    rank: int = Field(16, gt=0, description="rank r of each adapter")
    alpha: float = Field(32.0, gt=0.0, description="LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    target_modules: tuple[str, ...] = Field(
        LLAMA_LINEAR_PROJECTIONS, description="names (last path segment) of the linear modules to adapt"
    )

    @field_validator("target_modules")
    @classmethod
    def _nonempty_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("target_modules must name at least one module, e.g. q_proj")
        duplicates = sorted({name for name in value if value.count(name) > 1})
        if duplicates:
            raise ValueError(f"target_modules lists {duplicates} more than once")
        return value
