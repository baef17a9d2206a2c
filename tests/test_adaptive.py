"""The adaptive student: rows that think for different numbers of latent steps in one batch give exactly
what each row gives alone with its own K (the seed's recipe), whether the counts are given (training) or
chosen by the halting head (inference, greedy or sampled); the halting and masking math; the store's
per-problem step counts."""

import pytest
import torch

from qthink.bench.inference import spread_weights
from qthink.bench.seed_recipe import seed_generate
from qthink.core.latent import HaltingHead, decode, generate, think
from qthink.core.model import QThink, init_checkpoint
from qthink.core.sampling import Sampler
from qthink.core.sequences import encode_prompts, left_pad
from qthink.teachers.extract import problem_steps
from qthink.training.module import halting_loss, l1_per_step, step_mask

MAX_NEW = 20


def random_questions(seed: int, n: int) -> list[str]:
    """Questions of 1 to 40 words, so batches need left padding."""
    import random

    words = "the a of to and in is it what how many a=3 b=a+4 c=b*2 d? x y 7 8 9 + - * ( ) ? ! . ,".split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def qt(tiny_base, tmp_path_factory) -> QThink:
    ckpt = init_checkpoint(str(tiny_base), tmp_path_factory.mktemp("ckpt") / "ckpt", seed=0)
    qt = QThink.from_pretrained(ckpt, torch.float32)
    spread_weights(qt.model, 3)
    spread_weights(qt.head, 1003)
    return qt


def batch_of(qt: QThink, questions: list[str]):
    return left_pad(encode_prompts(qt.tokenizer, questions), qt.tokenizer.pad_token_id)


def spread_halting(hidden_size: int, seed: int) -> HaltingHead:
    torch.manual_seed(seed)
    head = HaltingHead(hidden_size)
    head.proj.weight.data.normal_(0, 3 / hidden_size**0.5)  # stops at different steps for different rows
    head.proj.bias.data.fill_(-0.5)
    return head


@torch.inference_mode()
def test_rows_with_their_own_step_counts_equal_each_row_alone(qt):
    questions = random_questions(5, 8)
    row_steps = torch.tensor([1, 4, 2, 6, 3, 6, 1, 5])
    batch = batch_of(qt, questions)
    tok = qt.tokenizer
    state = think(qt.model, qt.head, batch.input_ids, batch.attention_mask, 6, MAX_NEW, row_steps=row_steps)
    assert state.steps.tolist() == row_steps.tolist()
    gen = decode(qt.model, state, MAX_NEW, tok.eos_token_id, tok.pad_token_id)
    for row, (q, n) in enumerate(zip(questions, row_steps.tolist(), strict=True)):
        want = seed_generate(qt.model, tok, qt.head, q, n, MAX_NEW)
        assert gen.tokens[row, : gen.lengths[row]].tolist() == want, f"row {row} (K={n}) differs from running alone"
        alone = think(qt.model, qt.head, batch_of(qt, [q]).input_ids, batch_of(qt, [q]).attention_mask, n)
        torch.testing.assert_close(state.latents[row, :n], alone.latents[0], rtol=1e-3, atol=2e-4)
    # control: the same batch with every row at K=6 answers differently, so the masks matter
    full = generate(qt.model, qt.head, batch.input_ids, batch.attention_mask, 6, MAX_NEW, tok.eos_token_id,
                    tok.pad_token_id)
    assert not torch.equal(full.tokens[:, :3], gen.tokens[:, :3])


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_halting_head_choices_equal_each_row_alone(qt, mode):
    tok = qt.tokenizer
    halting = spread_halting(qt.model.config.hidden_size, 0)
    questions = random_questions(6, 16)
    batch = batch_of(qt, questions)
    gen = generate(qt.model, qt.head, batch.input_ids, batch.attention_mask, 6, MAX_NEW, tok.eos_token_id,
                   tok.pad_token_id, decode_mode=mode, halting_head=halting)
    taken = gen.latent_steps.tolist()
    assert len(set(taken)) >= 3, f"the halting head stops every row alike ({taken}): the test is blind"
    assert all(1 <= n <= 6 for n in taken)
    for row, q in enumerate(questions):
        one = batch_of(qt, [q])
        alone = generate(qt.model, qt.head, one.input_ids, one.attention_mask, 6, MAX_NEW, tok.eos_token_id,
                         tok.pad_token_id, halting_head=halting)
        assert int(alone.latent_steps[0]) == taken[row]
        assert gen.tokens[row, : gen.lengths[row]].tolist() == seed_generate(qt.model, tok, qt.head, q, taken[row], MAX_NEW)


def test_sampled_halting_is_reproducible_and_batch_independent(qt):
    tok = qt.tokenizer
    halting = spread_halting(qt.model.config.hidden_size, 1)
    questions = random_questions(7, 8)
    batch = batch_of(qt, questions)
    seeds = torch.arange(8) * 7919 + 11

    def run(rows):
        b = batch_of(qt, [questions[i] for i in rows])
        gen = generate(qt.model, qt.head, b.input_ids, b.attention_mask, 6, MAX_NEW, tok.eos_token_id,
                       tok.pad_token_id, Sampler(seeds[rows], 1.0, 1.0, 0), halting_head=halting)
        return gen.latent_steps.tolist(), [gen.tokens[i, : gen.lengths[i]].tolist() for i in range(len(rows))]

    everything = run(list(range(8)))
    assert run(list(range(8))) == everything
    halves = [run([0, 1, 2, 3]), run([4, 5, 6, 7])]
    assert halves[0][0] + halves[1][0] == everything[0] and halves[0][1] + halves[1][1] == everything[1]
    greedy = generate(qt.model, qt.head, batch.input_ids, batch.attention_mask, 6, MAX_NEW, tok.eos_token_id,
                      tok.pad_token_id, halting_head=halting).latent_steps.tolist()
    assert greedy != everything[0], "sampled stops equal the greedy ones: sampling is not applied"


def test_halting_loss_and_masked_l1():
    num_steps = torch.tensor([1, 3, 2])
    assert step_mask(num_steps, 3).tolist() == [[True, False, False], [True, True, True], [True, True, False]]
    # a head certain and right at every counted step has ~0 loss; the uncounted steps do not matter
    big = 30.0
    logits = torch.tensor([[big, 5.0, -5.0], [-big, -big, big], [-big, big, 7.0]])
    assert float(halting_loss(logits, num_steps, torch.ones(3, dtype=torch.bool))) < 1e-6
    wrong = logits.clone()
    wrong[1, 2] = -big  # row 1 does not stop at its last step
    assert float(halting_loss(wrong, num_steps, torch.ones(3, dtype=torch.bool))) == pytest.approx(big / 6, rel=1e-4)
    assert float(halting_loss(wrong, num_steps, torch.tensor([True, False, True]))) < 1e-6  # row 1 not counted
    latents, targets = torch.zeros(3, 3, 4), torch.ones(3, 3, 4)
    targets[0, 1:] = 100.0  # slots row 0 does not take: never counted
    l1 = l1_per_step(latents, targets, step_mask(num_steps, 3))
    assert l1.tolist() == [1.0, 1.0, 1.0]
    assert l1_per_step(latents, targets, torch.ones(3, dtype=torch.bool)).tolist() == [1.0, 34.0, 34.0]


def test_problem_steps_is_the_most_common_count_capped():
    assert problem_steps([3, 3, 2], 4) == 3
    assert problem_steps([2, 3], 4) == 3  # a tie: the larger
    assert problem_steps([7, 7, 6], 4) == 4  # capped at K_max
    assert problem_steps([], 4) == 4  # no valid rollout: K_max (CE only, not counted for halting)
    assert problem_steps([0], 4) == 1
