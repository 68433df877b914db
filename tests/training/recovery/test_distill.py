"""Distillation from the parent (`hfprune.training.recovery.distill`): the loss against hand-computed divergences,
and training through `PruneTrainer(train_loss=...)` with budgets and masks on CPU."""

import copy

import pytest
import torch
from conftest import masked_nonzeros, tiny_llama
from pydantic import ValidationError
from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainingArguments

from hfprune.trainer import PruneTrainer
from hfprune.training.recovery.distill import (
    DistillationLoss,
    DistillationSetupError,
    LogitHead,
    distillation_loss,
    next_token_labels,
)
from hfprune.training.recovery.specs import DistillSpec


VOCAB = 96
SEQ = 16


class PaddedTokens(Dataset):
    """Random sequences, each with a random number of real tokens followed by padding (labels -100)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(size):
            ids = torch.randint(1, VOCAB, (SEQ,), generator=gen)
            mask = (torch.arange(SEQ) < int(torch.randint(4, SEQ + 1, (), generator=gen))).long()
            self.items.append(
                {
                    "input_ids": ids * mask,
                    "attention_mask": mask,
                    "labels": (ids * mask).masked_fill(mask == 0, -100),
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def batch(size: int = 3) -> dict[str, torch.Tensor]:
    items = [PaddedTokens(size, seed=1)[i] for i in range(size)]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


# ---- The loss against hand-computed divergences ----


def hand_loss(h_s, w_s, h_t, w_t, labels, spec: DistillSpec, count):
    """The same loss written out with softmax/log_softmax over full logits."""
    temp = spec.temperature
    log_s = torch.log_softmax(h_s @ w_s.T / temp, -1)
    log_t = torch.log_softmax(h_t @ w_t.T / temp, -1)
    if spec.divergence == "forward_kl":
        div = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif spec.divergence == "reverse_kl":
        div = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        beta = spec.beta
        mix = torch.log((1 - beta) * log_s.exp() + beta * log_t.exp())
        div = beta * (log_t.exp() * (log_t - mix)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - mix)).sum(
            -1
        )
    valid = labels != -100
    ce = -torch.log_softmax(h_s @ w_s.T, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_token = spec.alpha * temp**2 * div + (1 - spec.alpha) * ce
    return per_token[valid].sum() / count


@pytest.mark.parametrize(
    "spec",
    [
        DistillSpec(divergence="forward_kl"),
        DistillSpec(divergence="reverse_kl", temperature=2.0),
        DistillSpec(divergence="jsd", beta=0.3, temperature=0.7),
        DistillSpec(divergence="forward_kl", alpha=0.6, temperature=2.0),
        DistillSpec(divergence="jsd", alpha=0.25),
    ],
    ids=["fkl", "rkl-T2", "jsd0.3-T0.7", "fkl-alpha0.6-T2", "jsd-alpha0.25"],
)
@pytest.mark.parametrize("num_items", [None, 20])
def test_loss_equals_hand_computed_divergence_and_gradient(spec, num_items):
    gen = torch.Generator().manual_seed(0)
    h_s = torch.randn(2, 7, 8, generator=gen, dtype=torch.float64).float().requires_grad_()
    w_s = torch.randn(11, 8, generator=gen).requires_grad_()
    h_t, w_t = torch.randn(2, 7, 6, generator=gen), torch.randn(11, 6, generator=gen)  # a wider teacher
    labels = torch.randint(0, 11, (2, 7), generator=gen)
    labels[0, 5:] = -100
    labels[1, 2] = -100
    count = num_items if num_items is not None else int((labels != -100).sum())

    got = distillation_loss(h_s, h_t, LogitHead(w_s), LogitHead(w_t), labels, spec, num_items)
    want = hand_loss(h_s, w_s, h_t, w_t, labels, spec, count)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    got_grads = torch.autograd.grad(got, (h_s, w_s))
    want_grads = torch.autograd.grad(want, (h_s, w_s))
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # Padding positions take no part: changing their hidden states changes nothing.
    moved = h_s.detach().clone()
    moved[0, 5:] += 10.0
    assert distillation_loss(moved, h_t, LogitHead(w_s), LogitHead(w_t), labels, spec, num_items).item() == (
        pytest.approx(got.item(), rel=1e-6)
    )


def test_alpha_zero_is_the_models_own_cross_entropy_and_skips_the_teacher():
    student, teacher = tiny_llama(0, vocab=VOCAB), tiny_llama(1, layers=3, vocab=VOCAB)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    inputs = batch()
    hook = DistillationLoss(teacher, DistillSpec(alpha=0.0))
    for num_items in (None, torch.tensor(17)):
        kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
        want = student(**inputs, **kwargs).loss
        got = hook(student, inputs, num_items)
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert calls == []


def test_teacher_equal_to_student_gives_zero_divergence_and_runs_frozen_in_the_given_dtype():
    student = tiny_llama(0, vocab=VOCAB)
    teacher = copy.deepcopy(student)
    inputs = batch()
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        loss = DistillationLoss(teacher, DistillSpec(divergence=divergence))(student, inputs, None)
        assert abs(loss.item()) < 1e-5

    hook = DistillationLoss(teacher, DistillSpec(), dtype=torch.bfloat16)
    loss = hook(student, inputs, None)
    loss.backward()
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert student.model.layers[0].mlp.up_proj.weight.grad is not None


def test_next_token_labels_shift_like_transformers():
    labels = torch.tensor([[5, 6, 7, -100]])
    assert next_token_labels({"labels": labels}).tolist() == [[6, 7, -100, -100]]
    assert next_token_labels({"labels": labels, "shift_labels": labels}) is labels


def test_vocabulary_mismatch_is_refused():
    hook = DistillationLoss(tiny_llama(1, vocab=VOCAB + 8), DistillSpec())
    with pytest.raises(DistillationSetupError, match=r"vocabulary \(104 tokens\) differs .* \(96\)"):
        hook(tiny_llama(0, vocab=VOCAB), batch(), None)


def test_spec_validation():
    assert DistillSpec().trl_beta == 0.0
    assert DistillSpec(divergence="reverse_kl").trl_beta == 1.0
    assert DistillSpec(divergence="jsd", beta=0.2).trl_beta == 0.2
    with pytest.raises(ValidationError, match="beta applies only to divergence: jsd"):
        DistillSpec(divergence="forward_kl", beta=0.2)
    for bad in ({"alpha": 1.5}, {"temperature": 0}, {"divergence": "kl"}, {"beta": 1.0, "divergence": "jsd"}):
        with pytest.raises(ValidationError):
            DistillSpec(**bad)
    with pytest.raises(ValidationError, match="Extra inputs"):
        DistillSpec(alhpa=0.5)


# ---- Training through PruneTrainer ----


def random_masks(model, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(p.shape, generator=gen) < 0.5
        for name, p in model.named_parameters()
        if ".layers." in name and p.ndim == 2
    }


class StopAt(TrainerCallback):
    """Simulates a kill right after the checkpoint of step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(tmp_path, name: str, train_loss=None, masks=None, save_steps=None, resume=None, callbacks=()):
    args = TrainingArguments(
        output_dir=str(tmp_path / name),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=100,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        disable_tqdm=True,
        seed=0,
        learning_rate=3e-3,
    )
    trainer = PruneTrainer(
        model=tiny_llama(0, vocab=VOCAB),
        args=args,
        train_dataset=PaddedTokens(96),
        token_budget=600,
        masks=masks,
        train_loss=train_loss,
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_distillation_trains_counts_the_same_tokens_and_keeps_masks(tmp_path):
    masks = random_masks(tiny_llama(0, vocab=VOCAB))
    teacher = tiny_llama(1, layers=3, vocab=VOCAB)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    plain = train(tmp_path, "plain", masks=masks)
    distilled = train(tmp_path, "distilled", train_loss=DistillationLoss(teacher, DistillSpec()), masks=masks)
    # alpha = 0 through the hook is plain training: same normalisation under gradient accumulation.
    hooked_ce = train(
        tmp_path, "ce", train_loss=DistillationLoss(teacher, DistillSpec(alpha=0.0)), masks=masks
    )
    for (name, p), q in zip(plain.model.named_parameters(), hooked_ce.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)

    # The teacher's forward is not counted: same tokens, same steps as plain training on the same data.
    assert distilled.state.num_input_tokens_seen == plain.state.num_input_tokens_seen >= 600
    assert distilled.state.global_step == plain.state.global_step > 4
    losses = [entry["loss"] for entry in distilled.state.log_history if "loss" in entry]
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2])  # the student moves towards the teacher
    assert masked_nonzeros(distilled.model, masks) == 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # The distilled student is closer to the teacher than the plainly trained one.
    kl = DistillationLoss(teacher, DistillSpec())
    inputs = batch(4)
    with torch.no_grad():
        assert kl(distilled.model, inputs, None).item() < kl(plain.model, inputs, None).item()


def test_distillation_resumes_after_a_kill_like_an_uninterrupted_run(tmp_path):
    teacher = tiny_llama(1, layers=3, vocab=VOCAB)
    full = train(tmp_path, "full", train_loss=DistillationLoss(teacher, DistillSpec(divergence="jsd")))
    train(
        tmp_path,
        "cut",
        DistillationLoss(teacher, DistillSpec(divergence="jsd")),
        save_steps=3,
        callbacks=[StopAt(3)],
    )
    resumed = train(
        tmp_path,
        "cut",
        DistillationLoss(copy.deepcopy(teacher), DistillSpec(divergence="jsd")),
        resume=str(tmp_path / "cut" / "checkpoint-3"),
    )
    assert resumed.state.num_input_tokens_seen == full.state.num_input_tokens_seen
    assert resumed.state.global_step == full.state.global_step > 3
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_evaluation_keeps_the_models_own_loss(tmp_path):
    model, teacher = tiny_llama(0, vocab=VOCAB), tiny_llama(1, layers=3, vocab=VOCAB)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=3
    )
    data = PaddedTokens(3, seed=1)
    plain = PruneTrainer(model=model, args=args, eval_dataset=data).evaluate()["eval_loss"]
    hooked = PruneTrainer(
        model=model, args=args, eval_dataset=data, train_loss=DistillationLoss(teacher, DistillSpec())
    ).evaluate()["eval_loss"]
    assert hooked == pytest.approx(plain, rel=1e-6)
    assert plain == pytest.approx(model(**batch(3)).loss.item(), rel=1e-5)
