"""TokenBudgetCallback, budget_schedule, SparsityMaskCallback and PruneTrainer with a real Trainer on CPU."""

import copy
import itertools
import math

import pytest
import torch
from conftest import masked_nonzeros, tiny_llama
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from hfprune.callbacks import (
    PAPER_TRAINING_DEFAULTS,
    SparsityMaskCallback,
    TokenBudgetCallback,
    budget_schedule,
)
from hfprune.callbacks.sparsity_mask import canonical_name
from hfprune.trainer import PruneTrainer


VOCAB = 256
SEQ = 24
BATCH = 4


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models run several times faster on one thread than on two contended ones.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TokenDataset(Dataset):
    """Random token sequences; with `padded`, each has a random number of real tokens then padding."""

    def __init__(self, size: int, padded: bool, seq_len: int = SEQ, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(size):
            ids = torch.randint(1, VOCAB, (seq_len,), generator=gen)
            real = int(torch.randint(4, seq_len + 1, (), generator=gen)) if padded else seq_len
            mask = (torch.arange(seq_len) < real).long()
            ids = ids * mask  # pad id 0
            labels = ids.masked_fill(mask == 0, -100)
            self.items.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def training_args(tmp_path, **overrides) -> TrainingArguments:
    values = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": BATCH,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "learning_rate": 1e-3,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def random_masks(model: nn.Module, seed: int = 0, keep: float = 0.5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(p.shape, generator=gen) < keep
        for name, p in model.named_parameters()
        if ".layers." in name and p.ndim == 2
    }


def zero_masked(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            params[name].masked_fill_(~keep, 0)


class TokensPerForward:
    """Records the non-padding tokens of every forward call, independently of the Trainer's counting."""

    def __init__(self, model: nn.Module) -> None:
        self.counts: list[int] = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.counts.append(int(kwargs["attention_mask"].sum()))


class StopAt(TrainerCallback):
    """Simulates an interruption right after the checkpoint of step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


# ---- TokenBudgetCallback ----


def test_budget_stops_at_first_step_reaching_it_and_skips_padding(tmp_path):
    model = tiny_llama(vocab=VOCAB, layers=4)
    seen = TokensPerForward(model)
    budget, accumulation = 1000, 2
    args = training_args(tmp_path, gradient_accumulation_steps=accumulation, max_steps=100)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(32, padded=True),
        callbacks=[TokenBudgetCallback(budget)],
    )
    trainer.train()

    per_step = [sum(seen.counts[i : i + accumulation]) for i in range(0, len(seen.counts), accumulation)]
    cumulative = [sum(per_step[: i + 1]) for i in range(len(per_step))]
    first_reaching = next(i for i, total in enumerate(cumulative) if total >= budget) + 1
    assert trainer.args.include_num_input_tokens_seen == "non_padding"
    assert trainer.state.global_step == first_reaching == len(per_step)
    assert trainer.state.num_input_tokens_seen == cumulative[-1]
    assert cumulative[-2] < budget <= cumulative[-1]
    overshoot = cumulative[-1] - budget
    assert overshoot < per_step[-1] <= BATCH * accumulation * SEQ
    # Padding was present and not counted.
    assert cumulative[-1] < len(seen.counts) * BATCH * SEQ
    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["tokens_trained"] for entry in step_logs] == cumulative


def test_budget_schedule_values_and_validation():
    paper = budget_schedule(50_000_000_000, 512 * 8192)
    assert paper["max_steps"] == 11921  # ceil(50e9 / 4,194,304)
    assert paper["warmup_steps"] == 597  # ceil(0.05 * 11921)
    assert paper["lr_scheduler_type"] == "cosine_warmup_with_min_lr"
    assert paper["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}
    assert budget_schedule(4096, 4096)["max_steps"] == 1
    assert budget_schedule(4097, 4096)["max_steps"] == 2
    for bad in ({"token_budget": 0}, {"warmup_ratio": 1.0}, {"min_lr_ratio": -0.1}):
        with pytest.raises(ValueError):
            budget_schedule(**{"token_budget": 100, "tokens_per_step": 10, **bad})
    with pytest.raises(TypeError):
        PAPER_TRAINING_DEFAULTS["learning_rate"] = 1.0  # read-only


def test_schedule_ends_at_floor_on_the_step_that_spends_the_budget(tmp_path):
    peak, steps = 1e-3, 10
    tokens_per_step = BATCH * SEQ
    budget = tokens_per_step * steps - 5
    settings = {**PAPER_TRAINING_DEFAULTS, **budget_schedule(budget, tokens_per_step, warmup_ratio=0.2)}
    args = training_args(tmp_path, **{**settings, "learning_rate": peak})
    assert args.adam_beta2 == 0.95 and args.weight_decay == 0.1 and args.max_grad_norm == 1.0
    trainer = Trainer(
        model=tiny_llama(vocab=VOCAB, layers=4),
        args=args,
        train_dataset=TokenDataset(64, padded=False),
        callbacks=[TokenBudgetCallback(budget)],
    )
    trainer.train()

    lrs = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert trainer.state.global_step == steps == len(lrs)
    assert trainer.state.num_input_tokens_seen == steps * tokens_per_step
    assert lrs[0] == pytest.approx(peak / 2, rel=1e-9)  # warmup over ceil(0.2 * 10) = 2 steps
    assert lrs[1] == pytest.approx(peak, rel=1e-9)
    assert all(a > b for a, b in itertools.pairwise(lrs[1:]))
    assert lrs[-1] == pytest.approx(0.1 * peak, rel=1e-9)


# ---- SparsityMaskCallback ----


def test_masks_hold_under_adamw_with_weight_decay_and_high_lr(tmp_path):
    masks = random_masks(tiny_llama(vocab=VOCAB, layers=4))
    settings = {"max_steps": 6, "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "weight_decay": 0.1}

    control = tiny_llama(vocab=VOCAB, layers=4)
    zero_masked(control, masks)
    Trainer(
        model=control, args=training_args(tmp_path, **settings), train_dataset=TokenDataset(32, True)
    ).train()
    assert masked_nonzeros(control, masks) > 0  # without the callback, pruned weights come back

    model = tiny_llama(
        vocab=VOCAB, layers=4
    )  # masked weights nonzero at start: the callback zeroes them at train begin
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, **settings),
        train_dataset=TokenDataset(32, True),
        callbacks=[SparsityMaskCallback(masks)],
    )
    trainer.train()

    assert masked_nonzeros(model, masks) == 0
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        assert not torch.equal(params[name][keep], before[name][keep])  # survivors trained
        # Gradients were zeroed before each step, so Adam's moments never saw the pruned entries.
        state = trainer.optimizer.state[params[name]]
        assert torch.count_nonzero(state["exp_avg"][~keep]) == 0
        assert torch.count_nonzero(state["exp_avg_sq"][~keep]) == 0


def test_resume_matches_uninterrupted_run(tmp_path):
    masks = random_masks(tiny_llama(vocab=VOCAB, layers=4))
    budget = 700
    settings = {
        "max_steps": 50,
        "gradient_accumulation_steps": 2,
        "weight_decay": 0.1,
        "save_strategy": "steps",
        "save_steps": 5,
    }

    def run(name: str, extra_callbacks=(), resume_from=None, seed: int = 0) -> Trainer:
        trainer = Trainer(
            model=tiny_llama(seed, vocab=VOCAB, layers=4),
            args=training_args(tmp_path / name, **settings),
            train_dataset=TokenDataset(32, padded=True),
            callbacks=[TokenBudgetCallback(budget), SparsityMaskCallback(masks), *extra_callbacks],
        )
        trainer.train(resume_from_checkpoint=resume_from)
        return trainer

    whole = run("whole")
    interrupted = run("split", [StopAt(5)])
    assert interrupted.state.global_step == 5 < whole.state.global_step
    checkpoint = tmp_path / "split" / "out" / "checkpoint-5"
    # A differently initialised model: every weight must come from the checkpoint.
    resumed = run("split", resume_from=str(checkpoint), seed=1)

    assert whole.state.num_input_tokens_seen >= budget
    assert resumed.state.num_input_tokens_seen == whole.state.num_input_tokens_seen
    assert resumed.state.global_step == whole.state.global_step
    assert resumed.state.log_history[-1]["tokens_trained"] == whole.state.num_input_tokens_seen
    assert masked_nonzeros(resumed.model, masks) == 0
    whole_weights = whole.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, whole_weights[name], rtol=0, atol=1e-6, msg=name)


class WriteIntoMask(TrainerCallback):
    """Writes a nonzero into a masked weight after the last optimizer step."""

    def __init__(self, name: str, keep: torch.Tensor, step: int) -> None:
        self.name, self.position, self.step = name, tuple(int(i) for i in (~keep).nonzero()[0]), step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                dict(model.named_parameters())[self.name][self.position] = 1.0


def test_escaped_weight_raises_naming_module_and_count(tmp_path):
    model = tiny_llama(vocab=VOCAB, layers=4)
    masks = random_masks(model)
    name = "model.layers.1.mlp.up_proj.weight"
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=TokenDataset(16, padded=False),
        callbacks=[SparsityMaskCallback(masks), WriteIntoMask(name, masks[name], step=2)],
    )
    with pytest.raises(RuntimeError, match=r"module model\.layers\.1\.mlp\.up_proj \(weight\): 1\b"):
        trainer.train()


def test_from_zeros_and_name_resolution_through_wrappers():
    model = tiny_llama(vocab=VOCAB, layers=4)
    masks = random_masks(model)
    zero_masked(model, masks)
    callback = SparsityMaskCallback.from_zeros(model)
    assert set(callback.masks) == set(masks)  # by default: Linear weights holding zeros
    for name, keep in masks.items():
        assert torch.equal(callback.masks[name], keep)
    assert set(SparsityMaskCallback.from_zeros(model, ["lm_head.weight"]).masks) == {"lm_head.weight"}

    assert (
        canonical_name(
            "module._fsdp_wrapped_module.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight"
        )
        == "model.layers.0.mlp.up_proj.weight"
    )
    wrapper = nn.Module()
    wrapper.module = model  # what DistributedDataParallel looks like by name
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    callback.apply_to_weights(wrapper)
    assert masked_nonzeros(model, masks) == 0
    assert callback.count_escaped(wrapper) == {}


def test_bad_masks_get_clear_errors():
    model = tiny_llama(vocab=VOCAB, layers=4)
    with pytest.raises(KeyError, match=r"did you mean 'model\.layers\.0\.mlp\.up_proj\.weight'"):
        SparsityMaskCallback(
            {"model.layer.0.mlp.up_proj.weight": torch.ones(128, 64, dtype=torch.bool)}
        ).verify(model)
    with pytest.raises(TypeError, match="bool"):
        SparsityMaskCallback({"model.layers.0.mlp.up_proj.weight": torch.ones(128, 64)})
    with pytest.raises(ValueError, match=r"shape \(64, 128\)"):
        SparsityMaskCallback(
            {"model.layers.0.mlp.up_proj.weight": torch.ones(64, 128, dtype=torch.bool)}
        ).verify(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_masking_is_bit_exact_and_clears_non_finite_values(dtype):
    model = tiny_llama(vocab=VOCAB, layers=4).to(dtype)
    masks = random_masks(model)
    params = dict(model.named_parameters())
    name = "model.layers.1.mlp.down_proj.weight"
    keep = masks[name]
    with torch.no_grad():
        weight = params[name]
        dropped = (~keep).nonzero()
        weight[tuple(dropped[0])] = float("nan")
        weight[tuple(dropped[1])] = float("inf")
        weight[tuple(dropped[2])] = -0.0
        kept_before = weight[keep].clone()
    weight.grad = torch.full_like(weight, float("nan"))
    callback = SparsityMaskCallback(masks)
    callback.apply_to_weights(model)
    callback.zero_masked_grads(model)
    # Dropped entries are +0.0 (no NaN, no inf, no sign bit); kept ones are the same bits as before.
    assert torch.equal(weight.detach()[~keep], torch.zeros(int((~keep).sum()), dtype=dtype))
    assert not torch.signbit(weight.detach()[~keep]).any()
    assert torch.equal(weight.detach()[keep].view(torch.uint8), kept_before.view(torch.uint8))
    assert torch.equal(weight.grad[~keep], torch.zeros_like(weight.grad[~keep]))
    assert weight.grad[keep].isnan().all()
    assert masked_nonzeros(model, masks) == 0


# ---- PruneTrainer ----


def test_prune_trainer_clips_without_masked_gradients(tmp_path):
    data = TokenDataset(BATCH, padded=False)
    masks = random_masks(tiny_llama(vocab=VOCAB, layers=4))
    initial = tiny_llama(vocab=VOCAB, layers=4)
    zero_masked(initial, masks)

    reference = copy.deepcopy(initial).train()
    batch = {key: torch.stack([item[key] for item in data.items]) for key in data.items[0]}
    reference(**batch).loss.backward()
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            params[name].grad.masked_fill_(~keep, 0)
    expected = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in reference.parameters()))

    def first_grad_norm(trainer_class, **kwargs) -> float:
        args = training_args(tmp_path, max_steps=1, max_grad_norm=1.0)
        trainer = trainer_class(model=copy.deepcopy(initial), args=args, train_dataset=data, **kwargs)
        trainer.train()
        return trainer.state.log_history[0]["grad_norm"]

    pruned = first_grad_norm(PruneTrainer, masks=masks, token_budget=10**9)
    plain = first_grad_norm(Trainer, callbacks=[SparsityMaskCallback(masks)])
    assert pruned == pytest.approx(expected, rel=1e-5)
    assert plain > pruned * 1.01  # a plain Trainer clips with the pruned entries still in the norm


def test_prune_trainer_wires_budget_and_masks(tmp_path):
    model = tiny_llama(vocab=VOCAB, layers=4)
    masks = random_masks(model)
    trainer = PruneTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=100, learning_rate=1e-2),
        train_dataset=TokenDataset(32, padded=False),
        token_budget=3 * BATCH * SEQ,
        masks=masks,
    )
    trainer.train()
    assert trainer.state.global_step == 3
    assert trainer.state.num_input_tokens_seen == 3 * BATCH * SEQ
    assert len(trainer.mask_callbacks) == 1
    assert masked_nonzeros(model, masks) == 0


def test_masks_hold_when_restored_optimizer_moments_are_dense(tmp_path):
    # A checkpoint trained without masks carries nonzero Adam moments at the pruned positions; only the
    # re-application after each step keeps those weights at zero when training resumes with masks.
    masks = random_masks(tiny_llama(vocab=VOCAB, layers=4))
    settings = {
        "max_steps": 6,
        "learning_rate": 1e-2,
        "weight_decay": 0.1,
        "save_strategy": "steps",
        "save_steps": 3,
    }
    args = training_args(tmp_path, **settings)
    Trainer(
        model=tiny_llama(vocab=VOCAB, layers=4),
        args=args,
        train_dataset=TokenDataset(32, True),
        callbacks=[StopAt(3)],
    ).train()

    model = tiny_llama(vocab=VOCAB, layers=4)
    trainer = Trainer(
        model=model, args=args, train_dataset=TokenDataset(32, True), callbacks=[SparsityMaskCallback(masks)]
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    params = dict(model.named_parameters())
    name = next(iter(masks))
    assert torch.count_nonzero(trainer.optimizer.state[params[name]]["exp_avg"][~masks[name]]) > 0
    assert masked_nonzeros(model, masks) == 0
