"""TokenBudgetCallback in a plain `transformers.Trainer`: runs that end short of the budget say why, and
batches without an attention mask are counted without a warning per micro-batch."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_config
from torch.utils.data import Dataset
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from hfprune.callbacks import TokenBudgetCallback


VOCAB, SEQ, BATCH = 128, 16, 4
COUNT_WARNING = "Could not determine method to count non-padding tokens"


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Blocks(Dataset):
    """Packed token blocks: `input_ids` and `labels`, with an all-ones `attention_mask` if `masked`."""

    def __init__(self, size: int, masked: bool = True) -> None:
        gen = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(size):
            ids = torch.randint(0, VOCAB, (SEQ,), generator=gen)
            item = {"input_ids": ids, "labels": ids.clone()}
            if masked:
                item["attention_mask"] = torch.ones_like(ids)
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def train(tmp_path, data: Dataset, callbacks: list, **overrides) -> Trainer:
    torch.manual_seed(0)
    config = tiny_config(vocab_size=VOCAB, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    values = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": BATCH,
        "save_strategy": "no",
        "disable_tqdm": True,
        "logging_steps": 1,
        **overrides,
    }
    trainer = Trainer(
        model=LlamaForCausalLM(config),
        args=TrainingArguments(**values),
        train_dataset=data,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def short_of_budget(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "hfprune.callbacks.token_budget"
        and r.levelno == logging.WARNING
        and "not reached" in r.getMessage()
    ]


def test_max_steps_ending_before_the_budget_is_reported(tmp_path, caplog):
    trainer = train(tmp_path, Blocks(64), [TokenBudgetCallback(4096)], max_steps=3)
    assert trainer.state.num_input_tokens_seen == 3 * BATCH * SEQ
    [message] = short_of_budget(caplog)
    assert "Token budget 4096 not reached" in message and f"after {3 * BATCH * SEQ} tokens" in message
    assert "max_steps=3 ended training first" in message and "budget_schedule" in message


def test_data_running_out_before_the_budget_is_reported(tmp_path, caplog):
    trainer = train(tmp_path, Blocks(12), [TokenBudgetCallback(4096)], num_train_epochs=1)
    assert trainer.state.num_input_tokens_seen == 12 * SEQ
    [message] = short_of_budget(caplog)
    assert f"after {12 * SEQ} tokens" in message and "the training data ran out" in message


def test_a_spent_budget_ends_without_a_warning(tmp_path, caplog):
    budget = 3 * BATCH * SEQ
    trainer = train(tmp_path, Blocks(64), [TokenBudgetCallback(budget)], max_steps=100)
    assert trainer.state.num_input_tokens_seen == budget and trainer.state.global_step == 3
    assert short_of_budget(caplog) == []


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def trainer_log():
    # transformers' loggers do not propagate to the root logger that caplog watches: listen on it directly.
    handler = Records()
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addHandler(handler)
    yield handler.messages
    trainer_logger.removeHandler(handler)


def test_batches_without_attention_mask_are_counted_without_a_warning_per_batch(
    tmp_path, trainer_log, caplog
):
    caplog.set_level(logging.INFO, logger="hfprune")
    budget = 5 * BATCH * SEQ
    trainer = train(tmp_path, Blocks(64, masked=False), [TokenBudgetCallback(budget)], max_steps=100)
    assert trainer.state.num_input_tokens_seen == budget and trainer.state.global_step == 5
    assert not any(COUNT_WARNING in m for m in trainer_log)
    notes = [r.getMessage() for r in caplog.records if "no attention_mask" in r.getMessage()]
    assert len(notes) == 1 and "every input token counts" in notes[0]

    # A Trainer without the callback keeps the stock warning, once per micro-batch: the setting is the
    # finding's, and nothing of the budgeted run lingers.
    train(tmp_path, Blocks(64, masked=False), [], max_steps=2, include_num_input_tokens_seen="non_padding")
    assert sum(COUNT_WARNING in m for m in trainer_log) == 2
