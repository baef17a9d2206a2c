"""`qthink bench`: the inference comparison (rows, equality with the seed recipe), the no-cache baseline,
the weight spread the tiny benches rely on, the other benches' wiring, and `bench gpu` (--small on CPU)."""

import json
import math

import pytest
import torch

from qthink.bench.gpu import QWEN3_1P7B
from qthink.bench.inference import (
    flatten_result,
    nocache_generate,
    pass_times,
    spread_weights,
    tiny_qthink,
)
from qthink.bench.seed_recipe import seed_generate
from qthink.cli import main
from qthink.measure import train_flops

ROW_FIELDS = {"system", "batch_size", "problems_per_s", "tokens_per_s", "seconds_per_problem", "speedup_vs_seed"}


@pytest.fixture(scope="module")
def qt(tmp_path_factory):
    return tiny_qthink(tmp_path_factory.mktemp("bench"))


def test_bench_inference_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "inference", "--problems", "6", "--max-new-tokens", "8", "--batch-sizes", "1,4",
                 "--repeats", "1", "--decode-modes", "dynamic,static", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [(r["system"], r["batch_size"], r.get("decode_mode")) for r in rows] == [
        ("seed", 1, None), ("nocache", 1, None), ("qthink", 1, "dynamic"), ("qthink", 4, "dynamic"),
        ("qthink", 1, "static"), ("qthink", 4, "static"), ("think", 4, "dynamic")]
    for r in rows:
        assert ROW_FIELDS <= set(r) and r["problems_per_s"] > 0 and r["tokens_per_s"] > 0
    assert all(r["identical_to_seed"] for r in rows if r["system"] == "qthink")
    for r in rows:  # the pass timings ride on the qthink rows only
        has_passes = {"latent_pass_ms", "decode_pass_ms", "pass_ratio"} <= set(r)
        assert has_passes == (r["system"] == "qthink")
        assert not has_passes or r["pass_ratio"] == r["latent_pass_ms"] / r["decode_pass_ms"]
    assert rows[0]["speedup_vs_seed"] == 1.0
    assert "| qthink | 4 |" in capsys.readouterr().out


def test_pass_times_runs_the_passes_it_divides_by(qt):
    """Three runs per round (prefill; + 3 latent passes; + 3 decoding passes), one warm-up round and one timed:
    the decoder sees 2 x (1 + 4 + 4) calls and the head 2 x 3. Counted on the decoder's final norm, which the
    prefill's forward and each step (`LayerStep` calls the layers directly) run once."""
    calls = {"decoder": 0, "head": 0}
    hooks = [qt.model.get_decoder().norm.register_forward_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1)),
             qt.head.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))]
    try:
        latent_ms, decode_ms = pass_times(qt, ["a=1 b=a+2 b?", "what is the total left?"], passes=3, repeats=1)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"decoder": 18, "head": 6}
    assert math.isfinite(latent_ms) and math.isfinite(decode_ms)


def test_nocache_recipe_equals_seed_recipe(qt):
    questions = ["a=1 b=a+2 c=b*3 c?", "what is the total left?", "x"]
    for k in (0, 3):
        for q in questions:
            assert nocache_generate(qt.model, qt.tokenizer, qt.head, q, k, 10) == \
                seed_generate(qt.model, qt.tokenizer, qt.head, q, k, 10)


def test_spread_weights_makes_outputs_depend_on_the_prompt(tiny_base):
    from qthink.core.model import QThink

    questions = [f"a={i} b=a+{j} b?" for i in range(4) for j in range(1, 4)]
    plain = QThink.for_base(tiny_base, torch.float32)
    first = {tuple(r["token_ids"]) for r in plain.generate(questions, 0, 4, batch_size=12)}
    spread_weights(plain.model, 0)
    std = plain.model.get_input_embeddings().weight.std().item()
    assert abs(std - 2 / math.sqrt(plain.model.config.hidden_size)) < 0.01
    spread = {tuple(r["token_ids"]) for r in plain.generate(questions, 0, 4, batch_size=12)}
    # the tiny base is already drawn at 1/fan_in (qthink.core.tiny.redraw_weights); spreading to 2/fan_in changes
    # what it says and keeps its outputs prompt-dependent
    assert 2 < len(spread) and spread != first


def test_train_flops_match_the_model_shape():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(QWEN3_1P7B.read_text()))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    block_params = sum(p.numel() for n, p in model.named_parameters() if "layers." in n and p.dim() == 2)
    work, palm = train_flops(config, batch=1, prompt=1, latents=0, answer=0)
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim  # one token, one key
    assert work == 2 * (2 * block_params) + 3 * attention
    assert palm == 3 * (2 * block_params + attention)
    work, palm = train_flops(config, batch=8, prompt=1024, latents=6, answer=256)
    assert 0.6 < work / palm < 0.7  # frozen weights: no weight gradients


def test_flatten_other_bench_results():
    rows = flatten_result("teachers", {"K": 6, "extractor": {"seconds": 1.0}, "naive": {"seconds": 2.0}})
    assert rows == [{"bench": "teachers", "system": "teachers:extractor", "K": 6, "seconds": 1.0},
                    {"bench": "teachers", "system": "teachers:naive", "K": 6, "seconds": 2.0}]
    assert flatten_result("train", [{"system": "x"}]) == [{"bench": "train", "system": "x"}]


def test_bench_all_one_table(tmp_path, capsys):
    """inference + train (qthink.bench.train) + teachers (qthink.teachers.extract): one table, one JSON."""
    out = tmp_path / "all.json"
    assert main(["bench", "all", "--problems", "3", "--max-new-tokens", "4", "--batch-sizes", "3", "--repeats", "1",
                 "--systems", "seed,qthink", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["system"] for r in rows] == ["seed", "qthink", "train:batched", "train:seed_accumulated",
                                           "teachers:extractor", "teachers:naive"]
    assert rows[1]["identical_to_seed"] and rows[2]["samples_per_s"] > 0 and rows[4]["rollouts_per_s"] > 0
    printed = capsys.readouterr().out
    assert printed.count("| bench |") == 1 and "| train | train:batched |" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_bench_gpu_without_cuda_is_one_line_error(capsys):
    assert main(["bench", "gpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "CUDA" in err and "--small" in err


def test_bench_gpu_small_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["bench", "gpu", "--small", "--decode-modes", "dynamic,static"]) == 0
    rows = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert [(r["system"], r.get("decode_mode")) for r in rows] == [
        ("latent-inference", "dynamic"), ("latent-inference", "static"), ("train-step", None)]
    assert all(r["tokens_per_s"] > 0 for r in rows) and rows[2]["tflops_per_s"] > 0
    assert rows[1]["tokens_equal_first"] == 1.0  # float32 on CPU: the static cache decodes the same tokens
