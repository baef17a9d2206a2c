"""Teacher position schemes (contract 2 and issue 8): linspace rounding, think spans, token offsets and
the step rule on hand-written think blocks in each task's style."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from qthink.tasks import get_task
from qthink.teachers.positions import (
    content_positions,
    linspace_positions,
    natural_step_offsets,
    offsets_to_tokens,
    select_evenly,
    step_positions,
    think_span,
    token_char_ends,
)


@pytest.fixture(scope="module")
def tok(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


def chars_at(text: str, offsets: list[int]) -> str:
    return "".join(text[o] for o in offsets)


@pytest.mark.parametrize("length,k", [(1, 4), (2, 6), (6, 3), (10, 6), (11, 6), (137, 6), (5000, 7)])
def test_linspace_is_numpy_round_of_linspace_both_ends(length, k):
    got = linspace_positions(length, k)
    assert got == np.round(np.linspace(0, length - 1, k)).astype(int).tolist()
    assert got[0] == 0 and got[-1] == length - 1 and len(got) == k


def test_linspace_rounds_half_to_even():
    assert linspace_positions(6, 3) == [0, 2, 5]  # 2.5 -> 2
    assert linspace_positions(4, 3) == [0, 2, 3]  # 1.5 -> 2


def test_select_evenly_spreads_or_repeats_each_step_in_turn():
    assert select_evenly([3, 8, 9, 15, 20, 30, 31], 3) == [3, 15, 31]
    assert select_evenly([3, 8], 4) == [3, 3, 8, 8]
    assert select_evenly([4, 9, 14], 6) == [4, 4, 9, 9, 14, 14]  # K=6 on 3-step chains: every step twice
    assert select_evenly([4, 9, 14], 4) == [4, 4, 9, 14]
    assert select_evenly([5, 6, 7], 3) == [5, 6, 7]


def test_think_span():
    T, E = 100, 101
    assert think_span([1, T, 5, 6, E, 7], T, E) == (1, 4)
    assert think_span([1, T, 5, 6], T, E) is None  # truncated: never closed
    assert think_span([1, 5, E, 7], T, E) is None  # closed but never opened
    assert think_span([T, 9, T, 5, E, T, E], T, E) == (2, 4)  # the first close, the last open before it
    assert think_span([T, 1, 2, T, 5, E], T, E, search_from=2) == (3, 5)
    assert think_span([T, 1, 2, 5, E], T, E, search_from=2) is None  # opener before the assistant turn


def test_token_char_ends_match_prefix_decoding(tok):
    ids = tok("<think>\nb=7 c=4 d=9\nThé ü 12 Thought: x\n</think>", add_special_tokens=False)["input_ids"]
    text, ends = token_char_ends(tok, ids)
    assert text == tok.decode(ids)
    # every token boundary that does not split a character is where prefix decoding ends
    for i, end in enumerate(ends):
        prefix = tok.decode(ids[: i + 1])
        if "\ufffd" not in prefix:
            assert end == len(prefix)


def test_offsets_map_to_the_state_before_the_value():
    # tokens "a", "=", "7": the '=' token ends right after the '=' character
    assert offsets_to_tokens([1], [1, 2, 3]) == [1]
    # a token "=7" merged: its state has seen the value, so the token before it (whose state predicts it)
    assert offsets_to_tokens([1], [1, 3]) == [0]
    assert offsets_to_tokens([0], [3]) == [0]  # never below 0


def test_synthetic_steps_land_on_the_equals_tokens(tok):
    task = get_task("synthetic")
    record = task.load("train", n=1)[0]
    content = tok(f"\n{record['think']}\n", add_special_tokens=False)["input_ids"]
    every_eq = [i for i, t in enumerate(content) if tok.decode([t]) == "="]
    eq = every_eq[1::2]  # `b=3+4=7`: the second `=` of each step is where its result is computed
    assert len(every_eq) == 6
    assert step_positions(tok, content, 3, task.step_offsets) == eq
    assert step_positions(tok, content, 2, task.step_offsets) == [eq[0], eq[2]]
    assert step_positions(tok, content, 5, task.step_offsets) == [eq[0], eq[0], eq[1], eq[1], eq[2]]
    # without the task's offsets the general rule takes every `=` before a value and the end of the line
    assert step_positions(tok, content, 7) == every_eq + [len(content) - 2]
    assert content_positions("steps", tok, content, 3, task.step_offsets) == eq
    assert content_positions("linspace", tok, content, 3) == linspace_positions(len(content), 3)


def test_general_rule_gsm8k_lines():
    think = ("Natalia sold 48/2 = 24 clips in May.\n"
             "Altogether she sold 48+24 = 72 clips.\n\n"
             "So the answer is 72.\n")
    offsets = natural_step_offsets(think)
    assert chars_at(think, offsets) == " . .."
    assert think[offsets[0] + 1 :].startswith("24") and think[offsets[2] + 1 :].startswith("72")


def test_general_rule_math_latex():
    think = ("We have $x^2 = 16$, so $x = -4$ or $x = 4$.\n"
             "Then \\frac{a}{b} = \\frac{1}{2} and y == z, y <= 3, f(x) => g.\n"
             "Area $= 3\\pi$.")
    offsets = natural_step_offsets(think)
    values = [think[o + 1 :].lstrip(" $")[:5] for o in offsets if think[o] != "\n" and o + 1 < len(think)]
    assert values[:3] == ["16$, ", "-4$ o", "4$.\nT"]
    assert "\\frac" in values[4]  # the value after '=' in the second line
    assert not any(v.startswith(("z", "3,", "g")) for v in values)  # ==, <=, => are not assignments
    assert think[offsets[-1]] == "."  # the end of the last line


def test_general_rule_tooluse_lines():
    think = ("Thought: the user wants the weather in Paris.\n"
             "Action: get_weather\n"
             'Action Input: {"city": "Paris"}\n')
    offsets = natural_step_offsets(think)
    assert chars_at(think, offsets) == ".r}"


def test_general_rule_synthetic_chain_and_fallback(tok):
    think = "b=7 c=4 d=9"
    assert chars_at(think, natural_step_offsets(think)) == "===9"
    assert natural_step_offsets("\n\n  \n") == []
    content = tok("\n\n", add_special_tokens=False)["input_ids"]
    assert step_positions(tok, content, 3) == linspace_positions(len(content), 3)


def test_unknown_scheme(tok):
    with pytest.raises(ValueError, match="unknown position scheme"):
        content_positions("random", tok, [1, 2], 2)
