"""The pipeline on Qwen3's real tokenizer (151,643 BPE tokens, Qwen3's special ids and chat template) with a
toy Qwen3 body: the defects the stand-in tokenizer hides. Skips where the shared fixtures are absent."""

import json
from pathlib import Path

import pytest
import torch

from qthink.bench.seed_recipe import seed_generate
from qthink.core.model import QThink, init_checkpoint
from qthink.core.sequences import encode_prompts, stop_ids
from qthink.tasks import get_task
from qthink.teachers.extract import rollout_positions, special_ids
from qthink.teachers.positions import step_positions

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "fixtures" / "qwen3-tokenizer"
DATA = ROOT.parent / "shared" / "data"
IM_END, ENDOFTEXT, THINK, END_THINK = 151645, 151643, 151667, 151668

pytestmark = pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").is_file(),
                                reason=f"Qwen3's tokenizer fixture is not at {TOKENIZER}")


@pytest.fixture(scope="module")
def qwen3_base(tmp_path_factory) -> Path:
    """Real tokenizer, toy body: Qwen3ForCausalLM with Qwen3's 151,936-row vocabulary, hidden 32, and
    Qwen3's generation config (stops on <|im_end|> and <|endoftext|>, pads with <|endoftext|>)."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from qthink.bench.inference import spread_weights

    out = tmp_path_factory.mktemp("qwen3-toy")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    config = Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    spread_weights(model, 0)  # outputs depend on the input (a default init repeats one token)
    model.generation_config = GenerationConfig(eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen3_qt(qwen3_base, tmp_path_factory) -> QThink:
    ckpt = init_checkpoint(str(qwen3_base), tmp_path_factory.mktemp("qwen3-ckpt") / "ckpt", seed=0)
    return QThink.from_pretrained(ckpt, torch.float32)


def test_chat_template_ids_in_both_modes(qwen3_qt):
    tok = qwen3_qt.tokenizer
    nothink = encode_prompts(tok, ["What is 2+3?"], enable_thinking=False)[0]
    think = encode_prompts(tok, ["What is 2+3?"], enable_thinking=True)[0]
    assert nothink[-7:] == [151644, 77091, 198, THINK, 271, END_THINK, 271]  # <|im_start|>assistant\n<think>\n\n</think>\n\n
    assert think[-3:] == [151644, 77091, 198] and nothink[: len(think)] == think
    assert stop_ids(tok, qwen3_qt.model.generation_config) == [IM_END, ENDOFTEXT]


def test_generation_equals_the_seed_recipe(qwen3_qt):
    questions = ["Natalia sold 48 clips in April and half as many in May. How many in total?",
                 "Hey, can you show me a random picture of an axolotl?", "Résumé: 3 × 4 = ?"]
    for k in (0, 6):
        want = [seed_generate(qwen3_qt.model, qwen3_qt.tokenizer, qwen3_qt.head, q, k, 8) for q in questions]
        got = [r["token_ids"] for r in qwen3_qt.generate(questions, k, 8, batch_size=3)]
        assert got == want
    assert len({tuple(w) for w in want}) == 3


def test_generation_stops_on_every_eos_id_of_the_generation_config(qwen3_qt):
    question = ["What is 2+3?"]
    first = qwen3_qt.generate(question, 6, 4)[0]["token_ids"][0]
    assert first not in (IM_END, ENDOFTEXT)
    config = qwen3_qt.model.generation_config
    saved = config.eos_token_id
    try:
        config.eos_token_id = [IM_END, first]  # the token this model emits first now ends an answer
        result = qwen3_qt.generate(question, 6, 4)[0]
    finally:
        config.eos_token_id = saved
    assert result["token_ids"] == [first] and result["finished"] and result["answer"] == ""


def rollout_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_whitespace_only_think_is_empty_and_unclosed_is_unclosed(qwen3_qt):
    tok = qwen3_qt.tokenizer
    prompt = encode_prompts(tok, ["What is 2+3?"], enable_thinking=True)[0]
    specials = special_ids(tok)
    empty = rollout_ids(tok, "<think>\n\n</think>\n\n5<|im_end|>")
    assert empty[:3] == [THINK, 271, END_THINK]  # Qwen3's empty block: one "\n\n" token
    assert rollout_positions(prompt, empty, specials, "linspace", 6, tok)[0] == "empty"
    truncated = rollout_ids(tok, "<think>\nOkay, 2 + 3 = 5")
    assert rollout_positions(prompt, truncated, specials, "steps", 6, tok)[0] == "unclosed"
    real = rollout_ids(tok, "<think>\nOkay, 2 + 3 = 5.\n</think>\n\n5<|im_end|>")
    status, ids, positions = rollout_positions(prompt, real, specials, "steps", 2, tok)
    assert status == "valid" and [tok.decode([ids[p]]) for p in positions] == [" ", "5"]


@pytest.mark.parametrize("think, k, expected", [
    # GSM8k-style: the state before each computed value (Qwen3 puts a space token before digits) and line ends
    ("Okay, 48 / 2 = 24 clips in May.\nSo 48 + 24 = 72 in total.\n", 4, [" ", " May", " ", " total"]),
    # Tooluse: no `=`, one step per line; " {}\n" is one token, so the state before it (":") is chosen
    ("The user wants an axolotl picture.\nAction: getRandomAxolotlImage\nAction Input: {}\n", 3,
     [" picture", "Image", ":"]),
    # unicode: offsets are characters, tokens may hold several bytes of one character
    ("Le résumé coûte 3 € × 4 = 12 €.\nDonc 12.\n", 3, [" ", " €", "2"]),
])
def test_steps_positions_on_hand_written_qwen3_chains(qwen3_qt, think, k, expected):
    tok = qwen3_qt.tokenizer
    content = rollout_ids(tok, think)
    positions = step_positions(tok, content, k)
    assert [tok.decode([content[p]]) for p in positions] == expected


def test_unclosed_think_has_no_answer_unless_asked():
    tooluse = get_task("tooluse")
    if (DATA / "tooluse").is_dir():
        record = next(r for r in tooluse.load("test", DATA) if "getRandomAxolotlImage" in tooluse.reference(r))
        output = "<think>\n" + tooluse.reference(record)  # `<think>\nAction: getRandomAxolotlImage\nAction Input: {}`
        assert tooluse.grade(output, record) == {"exact_match": 0.0, "action_accuracy": 0.0}
        assert tooluse.grade(output, record, grade_unclosed=True)["exact_match"] == 1.0
    gsm8k = get_task("gsm8k")
    record = {"question": "2+3?", "answer": "2 + 3 = 5\n#### 5", "id": "t-0"}
    assert gsm8k.grade("<think>\nSo 2 + 3 = 5", record)["exact_match"] == 0.0
    assert gsm8k.grade("<think>\nSo 2 + 3 = 5", record, grade_unclosed=True)["exact_match"] == 1.0
    assert gsm8k.grade("<think>\nSo 2 + 3 = 5\n</think>\n\nThe answer is 5.", record)["exact_match"] == 1.0


def test_pipeline_end_to_end_on_the_real_tokenizer(qwen3_base, tmp_path):
    """Reference chains of thought as rollouts → teachers (both schemes) → a few fit steps → export → eval →
    generate, all on Qwen3's tokenizer."""
    from qthink.cli import main
    from qthink.teachers.extract import build_teachers
    from qthink.teachers.rollouts import write_reference_rollouts

    rollouts = write_reference_rollouts(str(qwen3_base), tmp_path / "rollouts", n=6, G=2)
    for scheme in ("linspace", "steps"):
        manifest = build_teachers(str(qwen3_base), rollouts, tmp_path / f"teachers-{scheme}", K=3, dtype="float32",
                                  position_scheme=scheme)
        assert manifest["counts"]["valid"] == 12 and manifest["position_scheme"] == scheme
    root = tmp_path / "run"
    args = ["-c", str(ROOT / "configs" / "tiny" / "qthink.yaml"), "--model.base_model", str(qwen3_base),
            "--data.teachers", str(tmp_path / "teachers-steps"), "--model.latent_steps", "3",
            "--trainer.default_root_dir", str(root), "--data.batch_size", "3", "--trainer.max_steps", "2",
            "--data.val_limit", "3", "--trainer.val_check_interval", "2", "--data.val_batch_size", "3"]
    assert main(["fit", *args]) == 0
    assert main(["export", str(root / "checkpoints" / "last.ckpt"), str(tmp_path / "export")]) == 0
    assert main(["eval", str(tmp_path / "export"), "--task", "synthetic", "--limit", "3", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    summary = json.loads(next((tmp_path / "eval").glob("*/summary.json")).read_text())
    assert summary["problems"] == 3 and summary["K"] == 3
    assert main(["generate", str(tmp_path / "export"), "-q", "a=3 b=a+4 c=b*2 d=c+5 d?", "--max-new-tokens", "4"]) == 0


def test_adaptive_store_counts_natural_steps_on_the_real_tokenizer(qwen3_base, tmp_path):
    """Free-text chains of thought (the general step rule: the state before each value after `=`, each line's
    end) teach each problem its own number of latent steps: 4, 3 and 2 here, capped at K_max."""
    from transformers import AutoTokenizer

    from qthink.teachers.extract import build_teachers
    from qthink.teachers.rollouts import problem_line, reference_rollout
    from qthink.teachers.store import TeacherStore

    tok = AutoTokenizer.from_pretrained(qwen3_base)
    thinks = ["Okay, 48 / 2 = 24 clips in May.\nSo 48 + 24 = 72 in total.",  # " "24, May, " "72, total: 4
              "The user wants an axolotl picture.\nAction: getRandomAxolotlImage\nAction Input: {}",  # 3 lines
              "So 2 + 3 = 5."]  # " "5 and the line's end: 2
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    lines = [problem_line(i, f"p-{i}", f"question {i}?", [{**reference_rollout(tok, t, "5"), "reward": 1.0}] * 2)
             for i, t in enumerate(thinks)]
    (rollouts / "rollouts.jsonl").write_text("\n".join(lines) + "\n")
    (rollouts / "manifest.json").write_text(json.dumps({"base_model": str(qwen3_base), "task": "gsm8k", "G": 2}))
    for k_max, expected in ((6, [4, 3, 2]), (3, [3, 3, 2])):
        out = tmp_path / f"adaptive-k{k_max}"
        build_teachers(str(qwen3_base), rollouts, out, K=k_max, dtype="float32", position_scheme="steps", adaptive=True)
        store = TeacherStore(out)
        assert [store.row(i)["num_steps"] for i in range(3)] == expected
        assert all(not store.row(i)["uniform"][n:].any() for i, n in enumerate(expected))
