"""The plan before any work: per stage, peak accelerator memory, peak host memory, peak disk and a time class.

Runs on the parent's config alone, after the recipe is validated and before any weights load: `--dry-run`
prints it, and a run refuses to start (`hfprune.plan.check`, exit 2) when a stage needs more than the machine
has, naming the knob to turn (the disk: `hfprune.plan.disk`, checked by `hfprune.plan.check` against the
output folder's free space). Every number is a sum of named terms, each with the formula that produced
it, so a reader can check the plan by hand (`format_plan`; `Plan.to_dict()` for JSON). The terms model
what the code does today (formulas in `hfprune.plan.train_eval` and `hfprune.plan.prune_stage`); tests measure
them on tiny models.

Time: FLOP counts (2 x matmul parameters per token forward, plus causal attention; training 3x that,
4x with gradient checkpointing) divided by an assumed throughput: `MFU` of the device's dense peak for
the compute dtype, or on a CPU `CPU_EFFICIENCY` of a matmul throughput measured at planning time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hfprune.errors import InvalidInput
from hfprune.plan.disk import DiskNeed, model_folder, size, train_disk, with_disk
from hfprune.plan.hardware import GIB, Hardware, detect_hardware
from hfprune.plan.prune_stage import prune_stage
from hfprune.plan.terms import DTYPE_BYTES, HOST_BASELINE, Shape, StageEstimate
from hfprune.plan.train_eval import eval_stage, train_stage


if TYPE_CHECKING:
    from transformers import PretrainedConfig


MFU = 0.40  # model FLOP utilisation assumed on an accelerator, of its dense peak for the compute dtype
CPU_EFFICIENCY = 0.5  # fraction of the measured matmul throughput a CPU forward/backward reaches
DEVICE_RESERVE = GIB  # CUDA context and allocator slack, not available to tensors


@dataclass(frozen=True)
class Plan:
    """Estimates for every stage of one run on one machine, and the assumptions behind them."""

    title: str
    hardware: Hardware
    stages: list[StageEstimate]
    assumptions: list[str] = field(default_factory=list)
    disk: list[DiskNeed] = field(default_factory=list)  # what is left of the run, per file system (preflight)

    def stage(self, name: str) -> StageEstimate:
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "hardware": self.hardware.to_dict(),
            "assumptions": self.assumptions,
            "stages": {s.name: s.to_dict() for s in self.stages},
            "disk": [need.to_dict() for need in self.disk],
        }


class PlanError(InvalidInput, ValueError):
    """A stage needs more memory than the machine has, or the run more disk than is free; `problems`
    holds (knob, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = "\n".join(f"  {key}: {message}" for key, message in problems)
        super().__init__(f"the run does not fit this machine: {len(problems)} problem(s)\n{lines}")


def plan_recipe(recipe: Any, config: PretrainedConfig, hardware: Hardware | None = None) -> Plan:
    """The plan of a validated recipe (duck-typed `hfprune.recipe.schema.Recipe`) for the parent `config`."""
    return estimate(
        config,
        method=recipe.prune.method,
        ratio=recipe.prune.ratio,
        options=recipe.prune.options,
        dtype=recipe.parent.dtype,
        calibration=recipe.calibration,
        eval_sets=recipe.eval.perplexity,
        eval_batch_size=recipe.eval.batch_size,
        train=recipe.train,
        budgets={run: recipe.token_budget(run) for run in recipe.train.runs} if recipe.train else None,
        hardware=hardware,
        title=recipe.name,
    )


def estimate(
    config: PretrainedConfig,
    *,
    method: str,
    ratio: float,
    calibration: Any,
    eval_sets: list[Any],
    eval_batch_size: int = 1,
    train: Any = None,
    budgets: dict[str, int] | None = None,
    options: dict[str, Any] | None = None,
    dtype: str = "float32",
    hardware: Hardware | None = None,
    title: str = "",
) -> Plan:
    """Estimate every stage; `calibration`, `eval_sets` and `train` are the recipe's sections (or any
    objects with the same fields: num_samples/seq_len/batch_size; name/seq_len/max_windows; runs/...);
    `budgets` gives a run's own token budget where it is not `train.token_budget` (setting 2)."""
    from hfprune.models.structure import updated_config
    from hfprune.pruners import build_pruner

    hardware = hardware or detect_hardware()
    pruner = build_pruner(method, options)
    target = pruner.plan(config, ratio)
    parent = Shape.from_config(config, _dtype_name(dtype, config))
    pruned = Shape.from_config(updated_config(config, target.config_changes), parent.dtype)
    sparse = str(pruner.granularity) == "sparse"
    stages = [
        eval_stage("parent_eval", parent, eval_sets, eval_batch_size),
        with_disk(
            prune_stage(
                method, pruner.needs_calibration, parent, pruned, calibration, pruner.options, sparse
            ),
            model_folder("pruned model", pruned, sparse),
        ),
        eval_stage("pruned_eval", pruned, eval_sets, eval_batch_size),
    ]
    for run in train.runs if train is not None else []:
        budget = (budgets or {}).get(run, train.token_budget)  # a setting-2 kind's is the pipeline's
        trained = train_stage(run, pruned, train, hardware.devices, sparse, budget)
        stages.append(with_disk(trained, train_disk(run, pruned, train, budget, sparse)))
        stages.append(eval_stage(f"{run}_eval", pruned.as_dtype("float32"), eval_sets, eval_batch_size))
    stages = [_place(_timed(s, hardware), hardware) for s in stages if s is not None]
    title = title or f"{method} at {ratio}"
    return Plan(title=title, hardware=hardware, stages=stages, assumptions=_assumptions(hardware))


def _dtype_name(dtype: str, config: PretrainedConfig) -> str:
    if dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = str(found).removeprefix("torch.") if found else "float32"
    return dtype if dtype in DTYPE_BYTES else "float32"


def _timed(stage: StageEstimate, hardware: Hardware) -> StageEstimate:
    """Seconds from the stage's FLOPs and the assumed throughput of `stage.processes` devices."""
    if hardware.has_device:
        rate = stage.processes * MFU * hardware.peak(stage.compute_dtype)
    else:
        rate = CPU_EFFICIENCY * hardware.peak(stage.compute_dtype)
    return stage.with_seconds(stage.flops / rate if stage.flops is not None else None)


def _place(stage: StageEstimate, hardware: Hardware) -> StageEstimate:
    """On a machine without an accelerator, what would sit on the device sits in host memory."""
    if hardware.has_device:
        return stage
    return stage.on_host_only()


def _assumptions(hardware: Hardware) -> list[str]:
    throughput = (
        f"{MFU:.0%} of the device's dense peak ({hardware.peak('bfloat16') / 1e12:.0f} TFLOP/s bf16, "
        f"{hardware.peak('float32') / 1e12:.1f} TFLOP/s fp32) per process"
        if hardware.has_device
        else f"{CPU_EFFICIENCY:.0%} of the measured CPU matmul throughput"
    )
    return [
        f"hardware: {hardware.name} x {hardware.devices}; {hardware.source}",
        (
            f"time = FLOPs / ({throughput}); forward FLOPs per token = 2 x matmul parameters "
            "(non-embedding + the LM head's vocab x hidden) + 2 x layers x seq_len x query width (causal "
            "attention); training = 3 x forward (4 x with gradient checkpointing)"
        ),
        (
            f"host memory includes a process baseline of {HOST_BASELINE / GIB:.0f} GiB (Python, torch, "
            "transformers); device memory is checked against the device's memory less "
            f"{DEVICE_RESERVE / GIB:.0f} GiB (CUDA context, allocator slack)"
        ),
        (
            "the parent is on the accelerator when there is one, and calibration computes there: statistics "
            "methods stream one batch at a time; the sparse methods' sequential walk holds every window's "
            "hidden state up to prune.options.max_activation_bytes and spills the rest (hfprune/pruners/calibration.py)"
        ),
        (
            "evaluation counts max_windows full windows (a smaller dataset gives fewer); trained models are "
            "evaluated in float32 (fp32 master weights)"
        ),
    ]


def problems(plan: Plan) -> list[tuple[str, str]]:
    """(knob, message) for every stage whose device or host estimate exceeds the machine."""
    found = []
    limits = {"device": _device_limit(plan.hardware), "host": plan.hardware.host_memory}
    for stage in plan.stages:
        for where, limit in limits.items():
            total = stage.total(where)
            if limit is None or total is None or total <= limit:
                continue
            found.append(_advice(stage, where, total, limit))
    return found


def _device_limit(hardware: Hardware) -> int | None:
    return None if hardware.device_memory is None else hardware.device_memory - DEVICE_RESERVE


def _advice(stage: StageEstimate, where: str, total: int, limit: int) -> tuple[str, str]:
    head = (
        f"{stage.name} needs {total / GIB:.1f} GiB of {where} memory, "
        f"{limit / GIB:.1f} GiB {'usable' if where == 'device' else 'available'}"
    )
    terms = {t.name: t.bytes for t in stage.terms(where)}
    for knob in stage.knobs:
        if knob.where != where or knob.value <= 1:
            continue
        scaled = sum(terms.get(name, 0) for name in knob.terms)
        fixed = total - scaled
        if scaled and fixed < limit:
            most = knob.value * (limit - fixed) // scaled  # integers: exact for byte-sized knobs
            if 1 <= most < knob.value:
                return knob.key, f"{head}: lower {knob.key} from {knob.value} to at most {most}{knob.note}"
    key, hint = stage.fallback.get(where, ("", "use a machine with more memory"))
    return key, f"{head}: {hint}"


def format_table(plan: Plan) -> str:
    """One line per stage: peak device memory, peak host memory, peak disk, estimated time (the run's
    start log); then the disk the stages still to run need, per file system, against its free space."""
    lines = [
        f"plan: {plan.title} on {plan.hardware.name} x {plan.hardware.devices}",
        f"{'stage':<18}{'device':>12}{'host':>12}{'disk':>12}{'time':>20}",
    ]
    for s in plan.stages:
        device = "-" if s.total("device") is None else f"{s.total('device') / GIB:.2f} GiB"
        disk = size(sum(t.bytes for t in s.disk)) if s.disk else "-"
        time = "-" if s.seconds is None else f"{_duration(s.seconds)} ({s.time_class})"
        lines.append(f"{s.name:<18}{device:>12}{s.total('host') / GIB:>8.2f} GiB{disk:>12}{time:>20}")
    for need in plan.disk:
        fits = "fits" if need.need <= need.free else "DOES NOT FIT"
        lines.append(f"disk: the stages still to run need {need.describe()}: {fits}")
    return "\n".join(lines)


def format_plan(plan: Plan) -> str:
    """The plan for people: one line per stage, then the terms with their formulas, then assumptions."""
    lines = [format_table(plan)]
    for s in plan.stages:
        lines.append(f"\n{s.name}:")
        for where in ("device", "host"):
            for term in s.terms(where) or []:
                lines.append(f"  {where:<6} {term.bytes / GIB:9.3f} GiB  {term.name}: {term.formula}")
        lines.extend(f"  disk   {size(t.bytes):>13}  {t.name}: {t.formula}" for t in s.disk)
        if s.flops is not None:
            lines.append(f"  time   {s.flops:.3g} FLOP: {s.flops_formula}")
    lines.append("\nassumptions:")
    lines.extend(f"  - {a}" for a in plan.assumptions)
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f} {unit}"
    return f"{seconds:.0f} s"
