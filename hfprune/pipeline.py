"""The only module that orders stages: recipe -> parent -> calibration -> pruned model -> train -> eval
-> cards -> push.

Each stage declares the fingerprint of its inputs and the outputs it owns; `Run` executes the stages
in order, skips those whose inputs have not changed since they last finished (unless forced), and
loads the parent lazily, so a rerun with nothing changed never touches the weights. Outputs follow
the output-folder layout in the README: `recipe.yaml`, `models/pruned/`, `metrics.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from hfprune import __version__, distributed
from hfprune.cards import recorded_license, render_pruned_card, write_cards
from hfprune.data import calibration_tokens
from hfprune.eval import evaluation_windows, perplexity
from hfprune.hub import (
    Parent,
    PushError,
    PushResult,
    load_parent,
    load_parent_config,
    parent_license,
    published_kinds,
    push_folder,
    repo_id_for,
)
from hfprune.lmeval import evaluate_lm
from hfprune.modeling import ParamCount, count_config_parameters, count_parameters
from hfprune.outputs import (
    StageLedger,
    atomic_dir,
    distributed_staging_dir,
    read_json,
    write_json,
    write_text,
)
from hfprune.pruners import Pruner, PruneResult, get_pruner
from hfprune.recipe import Recipe
from hfprune.training import (
    HeldOutCurveCallback,
    learning_curve,
    save_trained,
    train_model,
    training_work_dir,
)
from hfprune.twin import make_scratch_twin


logger = logging.getLogger(__name__)

STOP_AFTER = {"prune": ("prune", "card")}
MASKS_FILE = "sparsity_masks.safetensors"


@dataclass
class StageOutcome:
    stage: str
    ran: bool


@dataclass
class RunSummary:
    output_dir: Path
    outcomes: list[StageOutcome] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def make_pruner(recipe: Recipe) -> Pruner:
    pruner_cls = get_pruner(recipe.prune.method)
    return pruner_cls(pruner_cls.Options(**recipe.prune.options))


class Run:
    """One execution of a recipe against its output folder."""

    def __init__(self, recipe: Recipe, *, force: bool = False, command: str | None = None):
        self.recipe = recipe
        self.out = recipe.output_path
        self.force = force
        # The resolved recipe reproduces the run exactly, whatever overrides produced it.
        self.command = command or shlex.join(["hfprune", "run", str(self.out / "recipe.yaml")])
        self.ledger = StageLedger(self.out)
        self.pruner = make_pruner(recipe)
        self._parent: Parent | None = None
        self._pruned: PreTrainedModel | None = None
        self._trained: dict[str, PreTrainedModel] = {}

    def stages(self, stop_after: str | None = None) -> tuple[str, ...]:
        """The stages of this recipe, in order; a recipe without `train` trains nothing."""
        if stop_after:
            return STOP_AFTER[stop_after]
        runs = self.recipe.train.runs if self.recipe.train else []
        trained = tuple(stage for run in runs for stage in (f"train_{run}", f"{run}_eval"))
        push = ("push",) if self.recipe.push.enabled else ()
        return ("parent_eval", "prune", "pruned_eval", *trained, "card", *push)

    # -- paths and fingerprints -------------------------------------------------------------
    @property
    def pruned_dir(self) -> Path:
        return self.out / "models" / "pruned"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.json"

    def model_dir(self, run: str) -> Path:
        return self.out / "models" / run

    def fingerprint(self, stage: str) -> str:
        r = self.recipe
        prune = r.fingerprint("parent", "prune", "calibration", "seed")
        train = f"{prune}-{r.fingerprint('train')}"
        # The cards show the scores, so they are stale whenever metrics.json changed (bar push records);
        # what is published is the cards' folders, so the push is stale exactly when they are.
        cards = (
            f"{prune}-{r.fingerprint('name', 'eval', 'output_dir', 'train', 'push')}-{self._scores_hash()}"
        )
        return {
            "parent_eval": r.fingerprint("parent", "eval"),
            "prune": prune,
            "pruned_eval": f"{prune}-{r.fingerprint('eval')}",
            "train_continued": train,
            "train_scratch": train,
            "continued_eval": f"{train}-{r.fingerprint('eval')}",
            "scratch_eval": f"{train}-{r.fingerprint('eval')}",
            "card": cards,
            "push": f"push-{cards}",
        }[stage]

    def outputs(self, stage: str) -> tuple[Path, ...]:
        if stage in {"prune", "card"}:
            return (self.pruned_dir / "model.safetensors", self.pruned_dir / "prune_report.json")
        if stage.startswith("train_"):
            folder = self.model_dir(stage.removeprefix("train_"))
            return (folder / "model.safetensors", folder / "training_report.json")
        return (self.metrics_path,)

    # -- orchestration ----------------------------------------------------------------------
    def execute(self, stop_after: str | None = None) -> RunSummary:
        """Run every stage that is not up to date.

        Under torchrun every process walks the same list; training stages run on all of them, every
        other stage on the main process only while the others wait, and only the main process writes.
        """
        summary = RunSummary(self.out)
        for stage in self.stages(stop_after):
            distributed.barrier()
            self.ledger.reload()
            fingerprint = self.fingerprint(stage)
            if not self.force and self.ledger.is_current(stage, fingerprint, *self.outputs(stage)):
                logger.info("stage %s: up to date, skipped", stage)
                summary.outcomes.append(StageOutcome(stage, ran=False))
                continue
            if distributed.is_main_process() or stage.startswith("train_"):
                logger.info("stage %s: running", stage)
                self._run_stage(stage)
            if distributed.is_main_process():
                write_text(self.out / "recipe.yaml", self.recipe.to_yaml())
                self.ledger.record(stage, fingerprint)
            summary.outcomes.append(StageOutcome(stage, ran=True))
        distributed.barrier()
        summary.metrics = read_json(self.metrics_path, {})
        return summary

    def _run_stage(self, stage: str) -> None:
        if stage.startswith("train_"):
            self.stage_train(stage.removeprefix("train_"))
        elif stage in {"continued_eval", "scratch_eval"}:
            self.stage_trained_eval(stage.removesuffix("_eval"))
        else:
            getattr(self, f"stage_{stage}")()

    @property
    def parent(self) -> Parent:
        if self._parent is None:
            self._parent = load_parent(self.recipe.parent)
        return self._parent

    # -- stages -----------------------------------------------------------------------------
    def stage_parent_eval(self) -> None:
        self._record_metrics("parent", self.parent.model, self.parent.tokenizer)

    def stage_prune(self) -> None:
        parent = self.parent
        parent_config = parent.model.config.to_dict()
        before = count_parameters(parent.model)
        # The parent is consumed here (depth pruning drops its layers in place): parent_eval runs first.
        result = self.prune_parent(parent)
        self._parent = None
        self._pruned = result.model
        report = self._report(result, parent_config, before, self.pruner.needs_calibration)
        with atomic_dir(self.pruned_dir) as tmp:
            result.model.save_pretrained(tmp)
            parent.tokenizer.save_pretrained(tmp)
            if result.masks:
                from hfprune.masks import save_masks

                save_masks(result.masks, tmp / MASKS_FILE)
            write_json(tmp / "prune_report.json", report)
            self._write_card(tmp, report)

    def prune_parent(self, parent: Parent) -> PruneResult:
        """Calibrate and prune; `parent.model` may be consumed. A sweep cell shares this work."""
        spec = self.recipe.calibration
        calibration = None
        if self.pruner.needs_calibration:
            calibration = calibration_tokens(spec.dataset, parent.tokenizer, spec.num_samples, spec.seq_len)
        return self.pruner.prune(parent.model, calibration, self.recipe.prune.ratio, spec.batch_size)

    def stage_pruned_eval(self) -> None:
        model = self._pruned or AutoModelForCausalLM.from_pretrained(self.pruned_dir, dtype="auto")
        self._record_metrics("pruned", model, AutoTokenizer.from_pretrained(self.pruned_dir))

    def stage_train(self, run: str) -> None:
        """Train the pruned model ("continued") or its random-init twin ("scratch") on the budget."""
        spec = self.recipe.train
        tokenizer = AutoTokenizer.from_pretrained(self.pruned_dir)
        # fp32 master weights whatever the checkpoint dtype; bf16 compute comes from train.args.
        model = AutoModelForCausalLM.from_pretrained(self.pruned_dir, dtype=torch.float32)
        masks = None
        if (self.pruned_dir / MASKS_FILE).exists():
            from hfprune.masks import load_masks

            masks = load_masks(self.pruned_dir / MASKS_FILE)
        if run == "scratch":
            model = make_scratch_twin(
                model,
                seed=self.recipe.seed,
                masks=masks,
                reinit_embeddings_and_norms=spec.reinit_embeddings_and_norms,
            )
        work_dir = training_work_dir(self.out / ".hfprune" / "train" / run, self.fingerprint(f"train_{run}"))
        trainer, outcome = train_model(
            model,
            tokenizer,
            spec,
            run=run,
            seed=self.recipe.seed,
            work_dir=work_dir,
            masks=masks,
            callbacks=self._curve_callbacks(tokenizer),
        )
        with distributed_staging_dir(self.model_dir(run)) as staging:
            save_trained(trainer, tokenizer, outcome, staging)
            if masks is not None and distributed.is_main_process():
                shutil.copyfile(self.pruned_dir / MASKS_FILE, staging / MASKS_FILE)
        if distributed.is_main_process():
            metrics = read_json(self.metrics_path, {})
            metrics[run] = {"tokens_trained": outcome.tokens_trained, "training": outcome.to_dict()}
            if self.recipe.eval.every_tokens:
                metrics[run]["curve"] = learning_curve(trainer)
            write_json(self.metrics_path, metrics)
            # The trained model is published; its checkpoints (weights plus optimizer state, about four
            # times the model) only served resuming this stage, and a sweep would pile them up.
            shutil.rmtree(work_dir, ignore_errors=True)
        self._trained[run] = trainer.accelerator.unwrap_model(trainer.model)

    def _curve_callbacks(self, tokenizer: Any) -> list[HeldOutCurveCallback]:
        """Learning curves on the first perplexity set, when `eval.every_tokens` asks for them."""
        every, sets = self.recipe.eval.every_tokens, self.recipe.eval.perplexity
        if not every or not sets:
            return []
        spec = sets[0]
        windows, bos = evaluation_windows(spec.dataset, tokenizer, spec.seq_len, spec.max_windows)
        return [HeldOutCurveCallback(windows, bos, every, self.recipe.eval.batch_size)]

    def stage_trained_eval(self, run: str) -> None:
        model = self._trained.get(run) or AutoModelForCausalLM.from_pretrained(
            self.model_dir(run), dtype="auto"
        )
        self._record_metrics(run, model, AutoTokenizer.from_pretrained(self.model_dir(run)))

    def stage_card(self) -> list[Path]:
        """Cards for every model folder of the run, each with every model's scores side by side."""
        license = recorded_license(self.pruned_dir) or parent_license(self.recipe.parent)
        metrics = read_json(self.metrics_path, {})
        return write_cards(self.out, self.recipe, metrics, license, self.command, self.card_figures())

    def card_figures(self) -> list[str]:
        """PNG files the cards show, already in each model folder; a single run has none (sweeps do)."""
        return []

    def stage_push(self) -> dict[str, PushResult]:
        """Publish the run's models (see `hub.published_kinds`) and record each commit in metrics.json."""
        spec = self.recipe.push
        if not spec.repo_prefix:
            raise PushError(
                "push.repo_prefix is not set: add it to the recipe, or pass push.repo_prefix=org/name"
            )
        available = [
            k for k in ("pruned", "continued", "scratch") if (self.model_dir(k) / "config.json").is_file()
        ]
        kinds = published_kinds(spec.include_pruned, available)
        if not kinds:
            raise PushError(f"nothing to publish in {self.out / 'models'}: run the recipe first")
        if kinds == ["pruned"] and not spec.include_pruned:
            logger.info("this run trained no model: publishing the one-shot pruned model only")
        recipe_hash = self.recipe.fingerprint(
            "name", "seed", "parent", "prune", "calibration", "train", "eval"
        )
        results = {}
        for kind in kinds:
            result = results[kind] = push_folder(
                self.model_dir(kind),
                repo_id_for(spec.repo_prefix, kind),
                private=spec.private,
                commit_message=f"hfprune {self.recipe.name}: {kind} model (recipe {recipe_hash})",
                commit_description=f"Made by `{self.command}` with hfprune {__version__}.",
                retries=spec.retries,
                retry_hint=f"publish them with `hfprune push {self.out}`",
            )
            metrics = read_json(self.metrics_path, {})
            metrics.setdefault(kind, {})["hub"] = result.to_dict()
            write_json(self.metrics_path, metrics)  # per repo: a later failure keeps the URLs of earlier ones
        return results

    # -- helpers ----------------------------------------------------------------------------
    def _report(self, result: Any, parent_config: dict, before: Any, calibrated: bool) -> dict[str, Any]:
        after = count_parameters(result.model)
        if result.masks:  # sparse: the shapes are the parent's, the removed weights are the masked ones
            removed = sum(int((~keep).sum()) for keep in result.masks.values())
            after = ParamCount(total=after.total - removed, embedding=after.embedding)
        shape = result.shape.to_dict()
        # Measured counts are authoritative; the plan's are from the config formula.
        shape["params_before"], shape["params_after"] = before.to_dict(), after.to_dict()
        shape["ratio_achieved"] = round(1 - after.non_embedding / before.non_embedding, 6)
        return {
            "method": self.pruner.name,
            "granularity": str(self.pruner.granularity),
            "description": self.pruner.description,
            "options": self.pruner.options.model_dump(mode="json"),
            "ratio_requested": self.recipe.prune.ratio,
            "ratio_achieved": shape["ratio_achieved"],
            "params_before": shape["params_before"],
            "params_after": shape["params_after"],
            **result.details,
            "shape": shape,
            "parent": self.recipe.parent.model_dump(mode="json"),
            "parent_config": {k: parent_config.get(k) for k in _SHAPE_KEYS},
            "calibration": self.recipe.calibration.model_dump(mode="json") if calibrated else None,
            "seed": self.recipe.seed,
            "seconds": round(result.seconds, 3),
            "hfprune_version": __version__,
        }

    def _write_card(self, folder: Path, report: dict[str, Any]) -> None:
        card = render_pruned_card(
            self.recipe,
            report,
            read_json(self.metrics_path, {}),
            parent_license(self.recipe.parent),
            self.command,
        )
        write_text(folder / "README.md", str(card))

    def _record_metrics(self, key: str, model: PreTrainedModel, tokenizer: Any) -> None:
        entry: dict[str, Any] = {"params": count_parameters(model).to_dict(), "perplexity": {}}
        for spec in self.recipe.eval.perplexity:
            batch, bos = evaluation_windows(spec.dataset, tokenizer, spec.seq_len, spec.max_windows)
            dataset = spec.dataset.model_dump(mode="json", exclude_defaults=True)
            result = perplexity(model, batch, bos, dataset, self.recipe.eval.batch_size)
            entry["perplexity"][spec.name] = result.to_dict()
            logger.info("%s perplexity on %s: %.3f", key, spec.name, result.value)
        entry["lm_eval"] = evaluate_lm(model, tokenizer, self.recipe.eval)
        metrics = read_json(self.metrics_path, {})
        metrics[key] = {**metrics.get(key, {}), **entry}  # keeps tokens_trained of trained models
        if metrics[key]["lm_eval"] is None:  # a recipe without lm-eval tasks records none
            del metrics[key]["lm_eval"]
        write_json(self.metrics_path, metrics)

    def _scores_hash(self) -> str:
        """metrics.json without the push records, which describe the published cards, not their content."""
        metrics = read_json(self.metrics_path, None)
        if metrics is None:
            return "none"
        scores = {k: {f: v for f, v in entry.items() if f != "hub"} for k, entry in metrics.items()}
        return hashlib.sha256(json.dumps(scores, sort_keys=True).encode()).hexdigest()[:12]


_SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


def run(recipe: Recipe, *, force: bool = False, stop_after: str | None = None) -> RunSummary:
    """Run (or resume) a recipe; stages whose inputs are unchanged are skipped."""
    return Run(recipe, force=force).execute(stop_after)


def publish(recipe: Recipe) -> dict[str, PushResult]:
    """Publish the models of an existing output folder (`hfprune push`): the push stage on its own."""
    return Run(recipe).stage_push()


def render_cards(recipe: Recipe) -> list[Path]:
    """Re-render the cards of an existing output folder (`hfprune card`) from its metrics.json."""
    return Run(recipe).stage_card()


def describe_plan(recipe: Recipe, stop_after: str | None = None, runner: Run | None = None) -> dict[str, Any]:
    """What a run would do, from configs only: stages (and whether they would run), paths, shapes."""
    runner = runner or Run(recipe)
    config = load_parent_config(recipe.parent)
    shape = runner.pruner.plan(config, recipe.prune.ratio)
    stages = runner.stages(stop_after)
    return {
        "output_dir": str(runner.out),
        "stages": {
            s: "up to date"
            if runner.ledger.is_current(s, runner.fingerprint(s), *runner.outputs(s))
            else "will run"
            for s in stages
        },
        "outputs": {
            "recipe": str(runner.out / "recipe.yaml"),
            "pruned": str(runner.pruned_dir),
            "metrics": str(runner.metrics_path),
        },
        "parent_shape": {k: getattr(config, k, None) for k in _SHAPE_KEYS},
        "target_shape": shape.config_changes,
        "params": {
            "parent": count_config_parameters(config).to_dict(),
            "pruned": shape.params_after.to_dict(),
        },
        "ratio": {"requested": recipe.prune.ratio, "achieved": round(shape.ratio_achieved, 6)},
    }
