"""`TeacherDataModule`: training batches from a teacher store and its rollouts, validation problems from the task.

A training example is one problem of the store: the prompt in the student layout (ARCHITECTURE.md contract 1:
`enable_thinking=False`, so it ends with an empty think block), the answer tokens + EOS, and the problem's
teacher rows ([K,H] uniform and weighted, with validity). The answer is, with `answer_source: rollout`,
the post-think answer of the problem's first correct finished rollout (the base model's own tokens), else
the task's reference; with `answer_source: reference`, always the reference. Validation examples are the
task's `val_split` problems (no teachers needed), graded by the task.

Batches: prompts left-padded, answers right-padded (labels -100 on padding), teachers stacked. The train
loader is resumable mid-epoch and shards across DDP ranks itself (`ResumableSampler`), so the Trainer must
run with `use_distributed_sampler: false` (`qthink fit`'s default, not a config key); `qthink fit --ckpt_path
last` then continues at the exact sample.
"""

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from qthink.arguments import Count, PositiveCount, Seed
from qthink.core.model import generation_config, hidden_size_of, load_tokenizer
from qthink.core.sequences import encode_prompts, left_pad, right_pad, stop_ids
from qthink.errors import require
from qthink.files import read_json
from qthink.identity import require_same_base, resolve_ref
from qthink.recipe import SEED
from qthink.tasks import load_problems
from qthink.tasks.base import THINK_CLOSE
from qthink.teachers.rollouts import MANIFEST, ROLLOUTS, read_rollouts, rollout_at
from qthink.teachers.store import TeacherStore
from qthink.training.lightning_private import uses_distributed_sampler

# ---- reading the pipeline's outputs ----


def same_model(a: str, b: str) -> bool:
    """Whether two base-model references name the same model (equal ids, or the same local directory)."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def load_rollouts(directory: Path, problems: set[int]) -> dict[int, dict]:
    """problem_index -> its rollouts.jsonl record, for `problems` only (the file is streamed, validated)."""
    _, entries = read_rollouts(directory)
    path = directory / ROLLOUTS
    return {i: rollout_at(path, offset, length) for i, offset, length in entries if i in problems}


def rollout_answer_ids(token_ids: list[int], think_close: int, eos: int | Collection[int],
                       is_blank: Callable[[int], bool]) -> list[int] | None:
    """The answer tokens after `</think>` (leading blank tokens dropped) up to and including the first EOS
    (any of `eos`: Qwen3 ends with `<|im_end|>` or `<|endoftext|>`).

    None if the think block never closes or the rollout did not end with EOS (a truncated answer).
    """
    stops = {eos} if isinstance(eos, int) else set(eos)
    if think_close not in token_ids:
        return None
    answer = token_ids[token_ids.index(think_close) + 1 :]
    while answer and answer[0] not in stops and is_blank(answer[0]):  # the "\n\n" the student prompt ends with
        answer = answer[1:]
    end = next((i for i, t in enumerate(answer) if t in stops), None)
    return None if end is None else answer[: end + 1]


def first_correct_answer(rollouts: list[dict], think_close: int, eos: int | Collection[int],
                         is_blank: Callable[[int], bool]) -> list[int] | None:
    """The answer tokens of the first correct rollout (reward > 0) that closed its think block and ended."""
    for r in rollouts:
        if r.get("reward", 0) > 0 and (answer := rollout_answer_ids(r["token_ids"], think_close, eos, is_blank)):
            return answer
    return None


# ---- datasets and batches ----


@dataclass
class Example:
    problem_index: int
    prompt_ids: list[int]
    answer_ids: list[int] = field(default_factory=list)
    record: dict | None = None
    padding: bool = False  # a copy that evens out the ranks' validation shares; not scored


class TeacherDataset(Dataset):
    """Training examples joined with their teacher rows (read lazily from the memory-mapped store)."""

    def __init__(self, examples: list[Example], store: TeacherStore):
        self.examples, self.store = examples, store

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[Example, dict]:
        ex = self.examples[i]
        return ex, self.store.row(ex.problem_index)


def collate_train(items: list[tuple[Example, dict]], pad_id: int) -> dict[str, torch.Tensor]:
    examples, rows = zip(*items, strict=True)
    prompts = left_pad([ex.prompt_ids for ex in examples], pad_id)
    answer_ids, answer_mask = right_pad([ex.answer_ids for ex in examples], pad_id)
    return {
        "prompt_ids": prompts.input_ids,
        "prompt_mask": prompts.attention_mask,
        "answer_ids": answer_ids,
        "answer_mask": answer_mask,
        "labels": answer_ids.masked_fill(answer_mask == 0, -100),
        "teacher_uniform": torch.stack([r["uniform"] for r in rows]),
        "teacher_weighted": torch.stack([r["weighted"] for r in rows]),
        "weighted_valid": torch.tensor([r["weighted_valid"] for r in rows], dtype=torch.bool),
        "num_valid": torch.tensor([r["num_valid"] for r in rows], dtype=torch.long),
        "num_steps": torch.tensor([r["num_steps"] for r in rows], dtype=torch.long),
        "problem_index": torch.tensor([ex.problem_index for ex in examples], dtype=torch.long),
    }


def collate_eval(examples: list[Example], pad_id: int) -> dict[str, Any]:
    prompts = left_pad([ex.prompt_ids for ex in examples], pad_id)
    return {"prompt_ids": prompts.input_ids, "prompt_mask": prompts.attention_mask,
            "records": [ex.record for ex in examples], "scored": [not ex.padding for ex in examples],
            "problem_index": torch.tensor([ex.problem_index for ex in examples], dtype=torch.long)}


# ---- a resumable, DDP-aware sampler ----


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch, padded and dealt to ranks like `DistributedSampler`, that can start
    mid-epoch: `consumed` counts this rank's samples already trained on in `epoch` (the loader advances it)."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        require(size > 0, "the training set is empty")
        self.size, self.seed, self.shuffle, self.rank, self.world_size = size, seed, shuffle, rank, world_size
        self.epoch, self.consumed = 0, 0

    def epoch_indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        total = len(self) * self.world_size
        order = (order * math.ceil(total / self.size))[:total]  # every rank gets the same count
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __iter__(self):
        return iter(self.epoch_indices()[self.consumed :])

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "size": self.size, "seed": self.seed,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("size", "seed", "world_size"):
            require(state[key] == getattr(self, key), f"cannot resume the data order: the checkpoint's {key} is "
                    f"{state[key]} but this run's is {getattr(self, key)}; resume with the same data, data.seed "
                    "and number of devices, or start a new run")
        self.epoch, self.consumed = state["epoch"], state["consumed"]


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position (the sampler's epoch and consumed count) is saved in Lightning checkpoints."""

    def __iter__(self):
        # A generator: the sampler is read at the first `next`, after Lightning has restored it and set the epoch.
        for batch in super().__iter__():
            self.sampler.consumed += len(batch["problem_index"])
            yield batch

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


# ---- the datamodule ----


class TeacherDataModule(L.LightningDataModule):
    """Teacher-store training data and task validation data for `QThinkModule`.

    Args:
        teachers: Teacher store directory (written by `qthink teachers`).
        rollouts: Rollouts directory (`qthink rollouts`); None: the one named in the store's manifest.
        task: Task name (gsm8k, math500, tooluse, synthetic); None: the store's.
        data_path: The task's data file or folder (None: the task's default source).
        task_options: Task constructor options (e.g. {steps: 3} for synthetic); default: the rollouts' own.
        base_model: Base model whose tokenizer is used; must be the store's base model (linked to model.base_model).
        store_K: K the store must have (linked from model.latent_steps; None when not distilling).
        adaptive: The store must teach each problem its own step count (`qthink teachers --adaptive`; linked
            from model.adaptive).
        batch_size: Problems per batch on each device.
        num_workers: DataLoader worker processes.
        max_prompt_tokens: Longer prompts are dropped (and counted in the log).
        max_answer_tokens: Answers (EOS included) are truncated to this many tokens (counted in the log).
        answer_source: `rollout`: the first correct rollout's answer, else the reference; `reference`: always the reference.
        train_limit: Train on the store's first N problems only (by problem index; a data-size study); None: all.
        val_split: Task split of the validation problems (no teachers needed).
        val_limit: At most this many validation problems (the first ones); None: all.
        test_split: Task split used by `qthink test`.
        test_limit: At most this many test problems; None: all.
        val_batch_size: Problems decoded together in validation/test; None: batch_size.
        shuffle: Shuffle the training problems every epoch.
        seed: Seed of the shuffling (epoch e uses seed + e).
        trust_remote_code: Allow custom tokenizer code from the base model's repo.
    """

    def __init__(
        self,
        teachers: str,
        rollouts: str | None = None,
        task: str | None = None,
        data_path: str | None = None,
        task_options: dict[str, Any] | None = None,
        base_model: str | None = None,
        store_K: int | None = None,
        adaptive: bool = False,
        batch_size: PositiveCount = SEED.batch_size,
        num_workers: Count = 0,
        max_prompt_tokens: PositiveCount = SEED.max_prompt_tokens,
        max_answer_tokens: PositiveCount = SEED.max_answer_tokens,
        answer_source: Literal["rollout", "reference"] = "rollout",
        train_limit: PositiveCount | None = None,
        val_split: str = "test",
        val_limit: PositiveCount | None = 64,
        test_split: str = "test",
        test_limit: PositiveCount | None = None,
        val_batch_size: PositiveCount | None = None,
        shuffle: bool = True,
        seed: Seed = 0,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.teachers, self.rollouts_dir, self.task_name, self.data_path = teachers, rollouts, task, data_path
        self.task_options, self.base_model, self.store_K = task_options or {}, base_model, store_K
        self.adaptive = adaptive
        self.batch_size, self.num_workers = batch_size, num_workers
        self.max_prompt_tokens, self.max_answer_tokens, self.answer_source = max_prompt_tokens, max_answer_tokens, answer_source
        self.val_split, self.val_limit, self.test_split, self.test_limit = val_split, val_limit, test_split, test_limit
        self.val_batch_size, self.train_limit = val_batch_size or batch_size, train_limit
        self.shuffle, self.seed, self.trust_remote_code = shuffle, seed, trust_remote_code
        self.store: TeacherStore | None = None
        self.rollouts_path: Path | None = None
        self.tokenizer = None
        self.task = None
        self.split: str | None = None
        self.stats: dict[str, int] = {}
        self.datasets: dict[str, Any] = {}  # train: TeacherDataset; val/test: lists of Example

    # ---- setup ----

    def open_store(self) -> TeacherStore:
        """Open the store and check it against the base model (and K when distilling); one-line errors."""
        if self.store is not None:
            return self.store
        path = Path(self.teachers)
        require(path.is_dir(), f"teacher store {path} does not exist; build it with `qthink teachers` or fix data.teachers")
        manifest = TeacherStore(path, verify=False).manifest  # cheap first look, to name the base model
        built_from = resolve_ref(str(manifest.get("base_model")), path)
        base = self.base_model or (built_from if manifest.get("base_model") is not None else None)
        require(base is not None, f"{path}/manifest.json names no base_model; set model.base_model")
        fix = "rebuild the store for this base or point data.teachers at one built from it"
        if "base_fingerprint" in manifest:  # by content: the base may have moved, or been replaced in place
            require_same_base(manifest["base_fingerprint"], base, f"teacher store {path}", fix)
        else:  # a store from before fingerprints: by path
            require(same_model(built_from, base), f"teacher store {path} was built from base model {built_from!r} "
                    f"but the trainer uses {base!r}; {fix}")
        self.base_model = base
        expect = {"hidden_size": hidden_size_of(base, self.trust_remote_code)}
        if self.store_K is not None:
            expect["K"] = self.store_K
        self.store = TeacherStore(path, expect=expect)
        require(self.store.adaptive or not self.adaptive, f"teacher store {path} teaches every problem K="
                f"{self.store.K} steps, but model.adaptive needs each problem's own step count: build it with "
                "`qthink teachers --adaptive --position-scheme steps`")
        return self.store

    def setup(self, stage: str) -> None:
        store = self.open_store()
        if self.tokenizer is None:
            from qthink.tasks import make_task

            named = self.rollouts_dir or store.manifest.get("rollouts")
            self.rollouts_path = Path(named) if self.rollouts_dir else Path(resolve_ref(named, store.path)) if named else None
            found = self.rollouts_path / MANIFEST if self.rollouts_path else None
            rollouts_manifest = read_json(found, "rerun `qthink rollouts`") if found and found.is_file() else {}
            task = self.task_name or store.manifest.get("task") or rollouts_manifest.get("task")
            require(task is not None, f"{store.path}/manifest.json names no task; set data.task")
            # the rollouts' own task options (e.g. synthetic steps) unless the config names others
            options = self.task_options or rollouts_manifest.get("task_options") or {}
            self.task = make_task(task, options)
            self.split = store.manifest.get("split") or rollouts_manifest.get("split") or "train"
            self.tokenizer = load_tokenizer(self.base_model, self.trust_remote_code)
        if stage == "fit" and "train" not in self.datasets:
            self.datasets["train"] = TeacherDataset(self._train_examples(store), store)
        if stage in ("fit", "validate") and "val" not in self.datasets:
            self.datasets["val"] = self._eval_examples(self.val_split, self.val_limit)
        if stage == "test" and "test" not in self.datasets:
            self.datasets["test"] = self._eval_examples(self.test_split, self.test_limit)

    def _encode(self, questions: list[str]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, questions, enable_thinking=False)

    def _train_examples(self, store: TeacherStore) -> list[Example]:
        tok, indices = self.tokenizer, sorted(store.problem_indices)[: self.train_limit]
        records = load_problems(self.task, self.split, self.data_path, max(indices) + 1)
        require(max(indices) < len(records), f"teacher store has problem {max(indices)} but {self.task.name} "
                f"{self.split} has {len(records)} problems; point data.data_path at the data the store was built from")
        rollouts = {}
        if self.answer_source == "rollout":
            require(self.rollouts_path is not None, f"{store.path}/manifest.json names no rollouts; set data.rollouts")
            rollouts = load_rollouts(self.rollouts_path, set(indices))
        think_close, stops = tok.convert_tokens_to_ids(THINK_CLOSE), stop_ids(tok, generation_config(self.base_model))

        def is_blank(token: int) -> bool:
            return tok.decode([token]).strip() == ""

        stats = dict.fromkeys(("problems", "from_rollout", "from_reference", "dropped_long_prompt",
                               "truncated_answer", "no_uniform_teacher", "no_weighted_teacher"), 0)
        questions = [self.task.prompt(records[i]) for i in indices]
        examples = []
        for i, question, prompt in zip(indices, questions, self._encode(questions), strict=True):
            record, answer = records[i], None
            if rollouts:
                require(i in rollouts, f"{self.rollouts_path}/{ROLLOUTS} has no problem {i} of the store")
                entry = rollouts[i]
                require(entry.get("question", question) == question and
                        str(entry.get("problem_id", self.task.problem_id(record))) == self.task.problem_id(record),
                        f"rollouts problem {i} is not {self.task.name} {self.split} problem {i} "
                        f"({entry.get('problem_id')!r}); set data.task/data.data_path/data.task_options as for the rollouts")
                answer = first_correct_answer(entry["rollouts"], think_close, stops, is_blank)
            stats["from_rollout" if answer is not None else "from_reference"] += 1
            if answer is None:
                answer = tok(self.task.reference(record), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if len(prompt) > self.max_prompt_tokens:
                stats["dropped_long_prompt"] += 1
                continue
            if len(answer) > self.max_answer_tokens:
                stats["truncated_answer"] += 1
                answer = answer[: self.max_answer_tokens]
            row = store.row(i)
            stats["no_uniform_teacher"] += row["num_valid"] == 0
            stats["no_weighted_teacher"] += not (row["weighted_valid"] and row["num_valid"] > 0)
            examples.append(Example(i, prompt, answer))
        stats["problems"] = len(examples)
        self.stats = stats
        # distilling (the store's K is checked) from a store where no problem has a valid teacher would
        # silently train on the answer CE alone
        require(self.store_K is None or stats["no_uniform_teacher"] < len(examples),
                f"teacher store {self.teachers}: none of its {len(examples)} problems has a valid teacher (every "
                "rollout was unclosed or empty); resample the rollouts with a larger --max-new-tokens, or train "
                "without distillation (model.distill: none)")
        if self.store_K is not None and stats["no_uniform_teacher"]:
            rank_zero_warn(f"{stats['no_uniform_teacher']} of {len(examples)} problems "
                           f"({stats['no_uniform_teacher'] / len(examples):.0%}) have no valid teacher: CE only for them")
        rank_zero_info(f"training data: {stats}")
        if stats["dropped_long_prompt"]:
            rank_zero_warn(f"dropped {stats['dropped_long_prompt']} problems with prompts over "
                           f"data.max_prompt_tokens={self.max_prompt_tokens} tokens")
        if stats["truncated_answer"]:
            rank_zero_warn(f"truncated {stats['truncated_answer']} answers to data.max_answer_tokens={self.max_answer_tokens}")
        require(examples, f"no training problems left from {self.teachers} (all prompts over data.max_prompt_tokens?)")
        return examples

    def _eval_examples(self, split: str, limit: int | None) -> list[Example]:
        records = load_problems(self.task, split, self.data_path, limit, rank_zero_warn)
        prompts = self._encode([self.task.prompt(r) for r in records])
        examples = [Example(i, p, record=r) for i, (p, r) in enumerate(zip(prompts, records, strict=True))
                    if len(p) <= self.max_prompt_tokens]
        if len(examples) < len(records):
            rank_zero_warn(f"{split}: dropped {len(records) - len(examples)} of {len(records)} problems with prompts "
                           f"over data.max_prompt_tokens={self.max_prompt_tokens} tokens")
        return examples

    # ---- loaders ----

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> ResumableDataLoader:
        rank, world = self._rank_world()
        require(world == 1 or not uses_distributed_sampler(self.trainer),
                "set trainer.use_distributed_sampler: false; TeacherDataModule shards the data itself (resumably)")
        sampler = ResumableSampler(len(self.datasets["train"]), self.seed, self.shuffle, rank, world)
        return ResumableDataLoader(self.datasets["train"], batch_size=self.batch_size, sampler=sampler,
                                   num_workers=self.num_workers, collate_fn=partial(collate_train, pad_id=self.tokenizer.pad_token_id))

    def _eval_loader(self, name: str) -> DataLoader:
        rank, world = self._rank_world()
        # every problem is scored once; ranks with a shorter share get unscored copies, so that every rank
        # runs the same number of steps and logs the metric (a rank with none would hang the others' sync)
        examples = self.datasets[name][rank::world]
        width = math.ceil(len(self.datasets[name]) / world)
        examples += [replace(self.datasets[name][0], padding=True)] * (width - len(examples))
        return DataLoader(examples, batch_size=self.val_batch_size, num_workers=self.num_workers,
                          collate_fn=partial(collate_eval, pad_id=self.tokenizer.pad_token_id))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
