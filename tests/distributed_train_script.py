"""Worker for tests/test_distributed.py, run as `torchrun --nproc_per_node=2 distributed_train_script.py OUT`.

Three phases on CPU with gloo, each rank writing what it saw to OUT/rank{N}.json:
1. DDP, plain `transformers.Trainer` + `TokenBudgetCallback` + `SparsityMaskCallback` on padded data;
2. DDP, `PruneTrainer` on a `PackedTokenStream` (iterable, dispatched by accelerate);
3. raw FSDP2 (`fully_shard` over checkpoint-wrapped layers): the mask callback's hooks on DTensor shards.
"""

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import masked_nonzeros, tiny_llama  # this script runs from tests/, beside conftest.py
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import Dataset
from transformers import (
    PreTrainedTokenizerFast,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

import hfprune.trainer
from hfprune.callbacks import SparsityMaskCallback, TokenBudgetCallback, budget_schedule
from hfprune.callbacks.sparsity_mask import canonical_name
from hfprune.trainer import PruneTrainer
from hfprune.training.packing import PackedTokenStream


VOCAB, SEQ, BATCH, ACCUMULATION = 260, 16, 2, 2  # the byte tokenizer has 257 tokens
BUDGET_DDP = 500


def layer_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        n: torch.rand(p.shape, generator=gen) < 0.5
        for n, p in model.named_parameters()
        if ".layers." in n and p.ndim == 2
    }


class Padded(Dataset):
    def __init__(self, size: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(size):
            mask = (torch.arange(SEQ) < int(torch.randint(3, SEQ + 1, (), generator=gen))).long()
            ids = torch.randint(1, VOCAB, (SEQ,), generator=gen) * mask
            self.items.append(
                {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def record_inputs(model: torch.nn.Module) -> list[dict]:
    seen: list[dict] = []

    def hook(module, args, kwargs):
        seen.append({"tokens": int(kwargs["attention_mask"].sum()), "rows": kwargs["input_ids"].tolist()})

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def args_for(out: Path, name: str, **overrides) -> TrainingArguments:
    values = {
        "output_dir": str(out / name),
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "learning_rate": 1e-2,
        "weight_decay": 0.1,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "ddp_find_unused_parameters": False,
        "seed": 0,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def phase_ddp_trainer(out: Path) -> dict:
    model = tiny_llama(vocab=VOCAB, layers=4)
    masks = layer_masks(model)
    seen = record_inputs(model)
    trainer = Trainer(
        model=model,
        args=args_for(out, "ddp", max_steps=100),
        train_dataset=Padded(48),
        callbacks=[TokenBudgetCallback(BUDGET_DDP), SparsityMaskCallback(masks)],
    )
    trainer.train()
    return {
        "local_tokens": [item["tokens"] for item in seen],
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "global_step": trainer.state.global_step,
        "tokens_logged": trainer.state.log_history[-1]["tokens_trained"],
        "masked_nonzeros": masked_nonzeros(model, masks),
        "weight_sum": float(sum(p.detach().double().abs().sum() for p in model.parameters())),
        "wrapped": type(trainer.model_wrapped).__name__,
    }


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def phase_packed_prune_trainer(out: Path) -> dict:
    docs = [f"document {i}: " + "pruning versus scratch " * (i % 5 + 1) for i in range(200)]
    tokenizer = byte_tokenizer()

    def make_stream() -> PackedTokenStream:
        return PackedTokenStream(lambda: iter(docs), tokenizer, SEQ, seed=0, skip_tokens=5)

    world = dist.get_world_size()
    tokens_per_step = world * BATCH * ACCUMULATION * SEQ
    budget = 2 * tokens_per_step + 1  # three steps
    model = tiny_llama(1, vocab=VOCAB, layers=4)
    masks = layer_masks(model)
    seen = record_inputs(model)
    args = args_for(out, "packed", **budget_schedule(budget, tokens_per_step))
    trainer = PruneTrainer(
        model=model, args=args, train_dataset=make_stream(), token_budget=budget, masks=masks
    )
    trainer.train()
    used = trainer.state.global_step * ACCUMULATION * world * BATCH
    return {
        "rows": [row for item in seen for row in item["rows"]],
        "expected_rows": [block for _, block in zip(range(used), make_stream().blocks(), strict=False)],
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "budget": budget,
        "tokens_per_step": tokens_per_step,
        "global_step": trainer.state.global_step,
        "masked_nonzeros": masked_nonzeros(model, masks),
    }


def phase_fsdp2(rank: int) -> dict:
    model = tiny_llama(2, vocab=VOCAB, layers=4)
    masks = layer_masks(model)
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    for index, layer in enumerate(model.model.layers):
        model.model.layers[index] = checkpoint_wrapper(layer)  # names gain `_checkpoint_wrapped_module.`
        fully_shard(model.model.layers[index], mesh=mesh)
    fully_shard(model, mesh=mesh)
    callback, state, control = SparsityMaskCallback(masks), TrainerState(), TrainerControl()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    name = "model.layers.1.mlp.up_proj.weight"
    param = dict(model.named_parameters())["model.layers.1._checkpoint_wrapped_module.mlp.up_proj.weight"]
    start = param.full_tensor()
    callback.on_train_begin(None, state, control, model=model)
    masked_grad_nonzeros = 0
    for step in range(3):
        ids = torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(10 * step + rank))
        model(input_ids=ids, labels=ids).loss.backward()
        callback.on_pre_optimizer_step(None, state, control, model=model)
        masked_grad_nonzeros += masked_nonzeros_full(model, masks, grads=True)
        optimizer.step()
        callback.on_optimizer_step(None, state, control, model=model)
        optimizer.zero_grad()
    callback.verify(model)
    result = {
        "param_type": type(param).__name__,
        "local_rows": param.to_local().shape[0],
        "full_rows": param.shape[0],
        "masked_nonzeros": masked_nonzeros_full(model, masks),
        "masked_grad_nonzeros": masked_grad_nonzeros,
        "survivors_changed": not torch.equal(param.full_tensor()[masks[name]], start[masks[name]]),
    }
    return {**result, **escape_on_rank_one(callback, model, param, ~masks[name], rank)}


def escape_on_rank_one(callback, model, param, drop, rank: int) -> dict:
    """A nonzero written into one rank's shard at a masked position is caught on that rank only."""
    if rank == 1:
        with torch.no_grad():
            local_drop = drop.chunk(dist.get_world_size())[rank]  # FSDP2 shards dim 0 like torch.chunk
            param.to_local()[tuple(local_drop.nonzero()[0])] = 1.0
    try:
        callback.verify(model)
        error = None
    except RuntimeError as caught:
        error = str(caught)
    return {"escaped": callback.count_escaped(model), "verify_error": error}


def masked_nonzeros_full(model: torch.nn.Module, masks: dict[str, torch.Tensor], grads: bool = False) -> int:
    """Nonzeros at masked positions of the gathered full tensors (a collective: same order on all ranks)."""
    total = 0
    for param_name, param in model.named_parameters():
        keep = masks.get(canonical_name(param_name))
        if keep is not None:
            full = (param.grad if grads else param).full_tensor()
            total += int(torch.count_nonzero(full[~keep]))
    return total


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    results = {"ddp": phase_ddp_trainer(out), "packed": phase_packed_prune_trainer(out)}
    rank = dist.get_rank()
    results["fsdp2"] = phase_fsdp2(rank)
    results["exit_hook"] = hfprune.trainer._exit_hook_registered
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    # No destroy_process_group() here: PruneTrainer registered it to run at exit.


if __name__ == "__main__":
    main()
