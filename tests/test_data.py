"""TeacherDataModule: answers from rollouts or references, the student layout, batches, the resumable
sampler, and one-line errors for stores that do not fit the model."""

import pytest
import torch

from qthink.core.sequences import encode_prompts
from qthink.errors import UserError
from qthink.tasks import get_task
from qthink.training.data import ResumableDataLoader, ResumableSampler, TeacherDataModule, collate_train


def datamodule(store, base, **kwargs) -> TeacherDataModule:
    dm = TeacherDataModule(str(store), base_model=str(base), **kwargs)
    dm.setup("fit")
    return dm


def test_examples_follow_the_student_layout_and_pick_the_first_correct_rollout(teacher_store, tiny_base):
    dm = datamodule(teacher_store, tiny_base, store_K=6)
    tok, task = dm.tokenizer, get_task("synthetic")
    records = task.load("train", n=8)
    examples = dm.datasets["train"].examples
    assert [ex.problem_index for ex in examples] == list(range(8))
    assert dm.stats == {"problems": 8, "from_rollout": 6, "from_reference": 2, "dropped_long_prompt": 0,
                        "truncated_answer": 0, "no_uniform_teacher": 1, "no_weighted_teacher": 2}
    for ex, record in zip(examples, records, strict=True):
        assert ex.prompt_ids == encode_prompts(tok, [record["question"]], enable_thinking=False)[0]
        assert tok.decode(ex.prompt_ids).endswith("<think>\n\n</think>\n\n")
        # rollout 1 is the correct one; problem 1 has none and problem 2's is unfinished: the reference
        assert ex.answer_ids[-1] == tok.eos_token_id
        assert tok.decode(ex.answer_ids[:-1]) == record["answer"]
    # the rollout's own tokens after `</think>\n\n` are used, not a re-tokenization of its text
    line = (dm.rollouts_path / "rollouts.jsonl").read_text().splitlines()[0]
    rollout_ids = __import__("json").loads(line)["rollouts"][1]["token_ids"]
    assert rollout_ids[-len(examples[0].answer_ids):] == examples[0].answer_ids


def test_reference_answers_truncation_and_dropped_prompts(teacher_store, tiny_base):
    dm = datamodule(teacher_store, tiny_base, answer_source="reference", max_answer_tokens=1)
    assert dm.stats["from_reference"] == 8 and dm.stats["truncated_answer"] == 8
    assert all(len(ex.answer_ids) == 1 for ex in dm.datasets["train"].examples)
    longest = max(len(ex.prompt_ids) for ex in dm.datasets["train"].examples)  # synthetic prompts: all equal
    with pytest.warns(UserWarning, match="dropped 8 problems with prompts over"), \
            pytest.raises(UserError, match="no training problems left"):
        datamodule(teacher_store, tiny_base, max_prompt_tokens=longest - 1)


def test_collate_pads_prompts_left_answers_right_and_stacks_teachers(teacher_store, tiny_base):
    dm = datamodule(teacher_store, tiny_base)
    items = [dm.datasets["train"][i] for i in range(4)]
    batch = collate_train(items, pad_id=dm.tokenizer.pad_token_id)
    for row, (ex, teacher) in enumerate(items):
        p, a = len(ex.prompt_ids), len(ex.answer_ids)
        assert batch["prompt_ids"][row, -p:].tolist() == ex.prompt_ids
        assert batch["prompt_mask"][row].sum() == p and batch["prompt_mask"][row, -p:].all()
        assert batch["answer_ids"][row, :a].tolist() == ex.answer_ids and batch["answer_mask"][row].sum() == a
        assert (batch["labels"][row, a:] == -100).all() and batch["labels"][row, :a].tolist() == ex.answer_ids
        assert torch.equal(batch["teacher_uniform"][row], teacher["uniform"])
    assert batch["teacher_weighted"].shape == (4, 6, 128) and batch["teacher_weighted"].dtype == torch.float32
    assert batch["weighted_valid"].tolist() == [True, False, True, True]
    assert batch["num_valid"].tolist() == [2, 2, 2, 0]


def test_validation_examples_come_from_the_task_without_teachers(teacher_store, tiny_base):
    dm = datamodule(teacher_store, tiny_base, val_limit=5, val_batch_size=2)
    batches = list(dm.val_dataloader())
    assert [len(b["records"]) for b in batches] == [2, 2, 1]
    assert batches[0]["records"][0] == get_task("synthetic").load("test", n=5)[0]
    assert "teacher_uniform" not in batches[0]


def test_sampler_shards_ranks_and_resumes_mid_epoch():
    ranks = [ResumableSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    shards = [list(s) for s in ranks]
    assert all(len(s) == 4 for s in shards)  # padded like DistributedSampler
    assert set(sum(shards, [])) == set(range(10))
    whole = list(ResumableSampler(10, seed=3))
    assert sorted(whole) == list(range(10)) and whole != list(range(10))
    resumed = ResumableSampler(10, seed=3)
    resumed.load_state_dict({"epoch": 0, "consumed": 4, "size": 10, "seed": 3, "world_size": 1})
    assert list(resumed) == whole[4:]
    resumed.set_epoch(1)
    assert resumed.consumed == 0 and list(resumed) != whole
    with pytest.raises(UserError, match="world_size is 2 but this run's is 1"):
        resumed.load_state_dict({"epoch": 0, "consumed": 4, "size": 10, "seed": 3, "world_size": 2})


def test_loader_state_counts_the_batches_it_yielded(teacher_store, tiny_base):
    dm = datamodule(teacher_store, tiny_base, batch_size=3)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and len(loader) == 3
    it = iter(loader)
    first = [next(it)["problem_index"].tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state["consumed"] == 6
    rest = [b["problem_index"].tolist() for b in it]
    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    assert [b["problem_index"].tolist() for b in fresh] == rest
    assert sorted(sum(first + rest, [])) == list(range(8))


def test_store_mismatches_are_one_line_errors(store_factory, tiny_base, tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        datamodule(tmp_path / "nowhere", tiny_base)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"K is 4 but the trainer expects 6") as e:
        datamodule(store_factory(K=4), tiny_base, store_K=6)
    assert "\n" not in str(e.value)
    datamodule(store_factory(K=4), tiny_base, store_K=None)  # not distilling (SFT): K is not checked
    with pytest.raises(UserError, match=r"hidden_size is 64 but the trainer expects 128"):
        datamodule(store_factory(hidden=64), tiny_base, store_K=6)
    with pytest.raises(UserError, match=r"built from base model 'Qwen/Qwen3-1.7B' but the trainer uses") as e:
        datamodule(store_factory(base_name="Qwen/Qwen3-1.7B"), tiny_base)
    assert "\n" not in str(e.value)


def test_distilling_from_a_store_without_any_valid_teacher_is_refused(store_factory):
    from qthink.training.data import TeacherDataModule

    store = store_factory(no_valid=True)
    with pytest.raises(UserError, match="none of its 8 problems has a valid teacher"):
        dm = TeacherDataModule(str(store), store_K=6, answer_source="reference")
        dm.setup("fit")
    dm = TeacherDataModule(str(store), store_K=None, answer_source="reference")  # SFT: no teachers needed
    dm.setup("fit")
    assert dm.stats["no_uniform_teacher"] == 8
