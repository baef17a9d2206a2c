"""QThinkModule on the tiny real Qwen3: the losses against an independent step-by-step recomputation,
every distillation mode training, SFT, NaN/inf handling, trainable-only checkpoints, exact resume and export."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from qthink.core.model import QThink
from qthink.export import export_checkpoint
from qthink.teachers.store import TeacherStore
from qthink.training.data import ResumableSampler, TeacherDataModule
from qthink.training.module import (
    NonFiniteLossError,
    QThinkModule,
    distill_term,
    l1_per_step,
    lr_factor,
)
from qthink.training.run_logging import COUNTERS, THROUGHPUT_WINDOW, batch_problems, batch_tokens

QUESTIONS = ["a=3 b=a+4 c=b*2 d=c+5 d?", "a=1 b=a*3 c=b-2 d=c+9 d?", "a=7 b=a+1 c=b+1 d=c*2 d?"]


class Recorder(L.Callback):
    """Keeps each training step's loss (what `training_step` returned) and batch."""

    def __init__(self):
        self.losses, self.batches = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.batches.append(batch)


class Crash(L.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def fit(module, store, base, root, max_steps, batch_size=8, callbacks=(), ckpt_every=None, ckpt_path=None, logger=False,
        **data):
    callbacks = list(callbacks)
    if ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=ckpt_every,
                                         save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=logger, log_every_n_steps=1,
                        enable_checkpointing=bool(ckpt_every), enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=callbacks, default_root_dir=root)
    store_K = None if module.distill == "none" else module.latent_steps
    dm = TeacherDataModule(str(store), base_model=str(base), store_K=store_K, batch_size=batch_size, **data)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


# ---- the math ----


def test_l1_distill_and_schedule_functions():
    h, t = torch.zeros(3, 2, 4), torch.ones(3, 2, 4)
    t[1] = 5.0
    valid = torch.tensor([True, False, True])
    assert l1_per_step(h, t, valid).tolist() == [1.0, 1.0]  # row 1 has no valid teacher: not averaged in
    assert l1_per_step(h, t, torch.zeros(3, dtype=torch.bool)).tolist() == [0.0, 0.0]
    steps = torch.tensor([1.0, 2.0, 3.0])
    assert distill_term(steps, "per_step") == 6.0 and distill_term(steps, "final_step") == 3.0
    assert distill_term(steps, "none") == 0.0
    assert lr_factor(0, 4, 100, 0.1) == 0.25 and lr_factor(3, 4, 100, 0.1) == 1.0
    assert lr_factor(4, 4, 100, 0.1) == 1.0 and math.isclose(lr_factor(100, 4, 100, 0.1), 0.1)
    assert math.isclose(lr_factor(52, 4, 100, 0.0), 0.5)


# ---- training ----


@pytest.mark.parametrize("distill,teacher", [("per_step", "uniform"), ("per_step", "weighted"),
                                             ("final_step", "uniform"), ("final_step", "weighted"),
                                             ("none", "uniform")])
def test_every_mode_trains_and_the_loss_goes_down(distill, teacher, teacher_store, tiny_base, tmp_path):
    module = QThinkModule(str(tiny_base), distill=distill, teacher=teacher, lr=3e-3, warmup_steps=0)
    recorder = Recorder()
    fit(module, teacher_store, tiny_base, tmp_path, max_steps=8, callbacks=[recorder], shuffle=False)
    assert all(math.isfinite(x) for x in recorder.losses)
    assert sum(recorder.losses[-2:]) / 2 < recorder.losses[0] - 0.1, recorder.losses


def reference_loss(module, batch, store, gamma: float) -> float:
    """The loss recomputed one problem at a time, running the model on the whole sequence at every step
    (no KV cache, no padding, default positions), from the store's own rows; an adaptive module runs each
    problem for its own number of steps and adds the halting cross-entropy."""
    model, head = module.model, module.head
    embed = model.get_input_embeddings()
    ces, l1, valid, halts = [], [], [], []
    with torch.no_grad():
        for i in range(batch["prompt_ids"].shape[0]):
            row = store.row(int(batch["problem_index"][i]))
            k_steps = row["num_steps"] if module.adaptive else module.latent_steps
            prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()]
            answer = batch["answer_ids"][i][batch["answer_mask"][i].bool()]
            seq = embed(prompt)[None]
            h = model(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][0, -1]
            states = []
            for _ in range(k_steps):
                seq = torch.cat([seq, head(h)[None, None]], 1)
                h = model(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][0, -1]
                states.append(h)
            logits = model(inputs_embeds=torch.cat([seq, embed(answer[:-1])[None]], 1)).logits[0, -len(answer):]
            ces.append(F.cross_entropy(logits.float(), answer))
            if k_steps:
                target = row[module.teacher][:k_steps]
                ok = row["num_valid"] > 0 and (module.teacher == "uniform" or row["weighted_valid"])
                l1.append((torch.stack(states) - target).abs().mean(-1))  # [k]
                valid.append(ok)
            if module.adaptive and row["num_valid"] > 0:
                stop = torch.zeros(k_steps)
                stop[-1] = 1.0
                halts.append(F.binary_cross_entropy_with_logits(module.halting_head(torch.stack(states)), stop,
                                                                reduction="none"))
    loss = torch.stack(ces).mean()
    if module.distill != "none" and any(valid):
        kept = [x for x, ok in zip(l1, valid, strict=True) if ok]
        per_step = torch.stack([torch.stack([x[k] for x in kept if len(x) > k]).mean()
                                for k in range(max(len(x) for x in kept))])
        loss = loss + gamma * (per_step.sum() if module.distill == "per_step" else per_step[-1])
    if halts:
        loss = loss + module.halt_weight * torch.cat(halts).mean()
    return float(loss)


class GradNormReference(L.Callback):
    """The global gradient norm computed directly (runs before the module's own `on_before_optimizer_step`)."""

    def __init__(self):
        self.norms, self.logged = [], []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [p.grad.detach().float() for p in module.parameters() if p.requires_grad and p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.logged.append(float(trainer.callback_metrics["train/grad_norm"]))


def test_logged_lr_grad_norm_and_throughput_are_the_schedule_and_the_data(teacher_store, tiny_base, tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    steps, lr = THROUGHPUT_WINDOW + 2, 1e-3
    module = QThinkModule(str(tiny_base), lr=lr, warmup_steps=3, min_lr_ratio=0.1)
    recorder, reference = Recorder(), GradNormReference()
    logger = CSVLogger(tmp_path, name="", version="")
    fit(module, teacher_store, tiny_base, tmp_path, steps, batch_size=2, callbacks=[recorder, reference], logger=logger)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))

    def series(name: str) -> list[float]:
        return [float(r[name]) for r in rows if r.get(name)]

    # the learning rate LearningRateMonitor logs is warmup + cosine, exactly, for both parameter groups
    expected = [lr * lr_factor(step, 3, steps, 0.1) for step in range(steps)]
    assert series("lr/decay") == expected and series("lr/no_decay") == expected
    # grad_norm (Lightning's) is the norm of all gradients as one vector, as computed directly
    assert reference.logged == pytest.approx(reference.norms, rel=1e-5) and len(reference.norms) == steps
    # ThroughputMonitor's rates count problems and prompt + K + answer tokens over its window (the two rates
    # share one elapsed time, so their ratio is tokens per problem exactly), and read model FLOPs per batch
    window = recorder.batches[-THROUGHPUT_WINDOW + 1:]  # rates are differences between the window's ends
    tokens_per_problem = sum(batch_tokens(b, module.latent_steps) for b in window) / sum(map(batch_problems, window))
    last = [r for r in rows if r.get("train/device/items_per_sec")][-1]
    assert float(last["train/device/items_per_sec"]) / float(last["train/device/samples_per_sec"]) == \
        pytest.approx(tokens_per_problem, rel=1e-6)
    assert series("train/device/flops_per_sec")[-1] > 0
    # only rates: the monitor's running totals (train/time, batches, samples, lengths) are not logged
    assert not {f"{stage}/{c}" for stage in ("train", "validate") for c in COUNTERS} & set(rows[0])


@pytest.mark.parametrize("distill,teacher", [("per_step", "uniform"), ("final_step", "weighted")])
def test_training_step_loss_matches_an_independent_recomputation(distill, teacher, teacher_store, tiny_base, tmp_path):
    module = QThinkModule(str(tiny_base), distill=distill, teacher=teacher, lr=0.0)  # lr 0: weights stay
    recorder = Recorder()
    fit(module, teacher_store, tiny_base, tmp_path, max_steps=1, callbacks=[recorder], shuffle=False)
    batch = recorder.batches[0]
    assert not batch["weighted_valid"].all() and (batch["num_valid"] == 0).any()  # CE-only rows are in it
    expected = reference_loss(module, batch, TeacherStore(teacher_store), module.gamma)
    assert math.isclose(recorder.losses[0], expected, rel_tol=1e-5), (recorder.losses[0], expected)


def test_adaptive_loss_matches_an_independent_recomputation(store_factory, tiny_base, tmp_path):
    """Rows of 1 to 4 latent steps in one batch (per-row masks and positions) give the loss of running each
    problem alone with its own K, plus the halting head's cross-entropy; and the adaptive student trains."""
    store = store_factory(K=4, adaptive=True)
    module = QThinkModule(str(tiny_base), latent_steps=4, adaptive=True, lr=0.0)
    recorder = Recorder()
    fit(module, store, tiny_base, tmp_path, max_steps=1, callbacks=[recorder], shuffle=False, adaptive=True)
    batch = recorder.batches[0]
    assert sorted(set(batch["num_steps"].tolist())) == [1, 2, 3, 4]
    expected = reference_loss(module, batch, TeacherStore(store), module.gamma)
    assert math.isclose(recorder.losses[0], expected, rel_tol=1e-5), (recorder.losses[0], expected)
    module = QThinkModule(str(tiny_base), latent_steps=4, adaptive=True, lr=3e-3, warmup_steps=0)
    recorder = Recorder()
    fit(module, store, tiny_base, tmp_path / "train", max_steps=8, callbacks=[recorder], shuffle=False, adaptive=True)
    assert sum(recorder.losses[-2:]) / 2 < recorder.losses[0] - 0.1, recorder.losses


def test_k0_without_distillation_is_plain_sft(teacher_store, tiny_base, tmp_path, store_factory):
    module = QThinkModule(str(tiny_base), latent_steps=0, distill="none", lr=0.0)
    calls = []
    recorder = Recorder()
    other_k = store_factory(K=4)  # SFT does not read teachers, so any K will do
    module.configure_model()
    module.head.register_forward_hook(lambda *args: calls.append(1))
    head_before = {k: v.clone() for k, v in module.head.state_dict().items()}
    fit(module, other_k, tiny_base, tmp_path, max_steps=1, callbacks=[recorder], shuffle=False)
    assert calls == [] and not any(p.requires_grad for p in module.head.parameters())
    assert all(torch.equal(v, module.head.state_dict()[k]) for k, v in head_before.items())
    batch, ces = recorder.batches[0], []
    with torch.no_grad():
        for i in range(batch["prompt_ids"].shape[0]):
            prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()]
            answer = batch["answer_ids"][i][batch["answer_mask"][i].bool()]
            logits = module.model(input_ids=torch.cat([prompt, answer])[None]).logits[0, len(prompt) - 1 : -1]
            ces.append(F.cross_entropy(logits, answer))
    assert math.isclose(recorder.losses[0], float(torch.stack(ces).mean()), rel_tol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_before_the_optimizer_step(bad, store_factory, tiny_base, tmp_path):
    store = store_factory(poison={5: bad})
    position = list(ResumableSampler(8, seed=0)).index(5)
    step, batch_idx = position // 2, position // 2  # batch 2, epoch 0: one step per batch
    module = QThinkModule(str(tiny_base), lr=1e-3)
    with pytest.raises(NonFiniteLossError, match=rf"loss is {bad} at global step {step}, batch {batch_idx} ") as e:
        fit(module, store, tiny_base, tmp_path, max_steps=8, batch_size=2, ckpt_every=1)
    assert "\n" not in str(e.value)
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len([p for p in saved if p.name != "last.ckpt"]) == step
    for path in saved:
        weights = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_resume_is_exact_checkpoints_are_small_and_export_generates_the_same(teacher_store, tiny_base, tmp_path):
    kwargs = {"lr": 1e-2, "warmup_steps": 2}
    # 8 problems in batches of 2 = 4 batches an epoch; 7 steps cross an epoch boundary
    whole = QThinkModule(str(tiny_base), **kwargs)
    fit(whole, teacher_store, tiny_base, tmp_path / "whole", max_steps=7, batch_size=2)
    crashed = QThinkModule(str(tiny_base), **kwargs)
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies mid-epoch, after step 3
        fit(crashed, teacher_store, tiny_base, tmp_path / "run", 7, batch_size=2, callbacks=[Crash(3)], ckpt_every=1)
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3
    assert set(ckpt["state_dict"]) == crashed.trainable_names()  # LoRA + head, no frozen base weight
    assert not any("embed_tokens" in k for k in ckpt["state_dict"]) and last.stat().st_size < 6e6
    resumed = QThinkModule(str(tiny_base), **kwargs)
    fit(resumed, teacher_store, tiny_base, tmp_path / "run", 7, batch_size=2, ckpt_every=1, ckpt_path=str(last))
    a, b = trainable(whole), trainable(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.default.weight") and a[k].abs().sum() > 0 for k in a)  # LoRA did train

    out = export_checkpoint(tmp_path / "run" / "ckpt" / "last.ckpt", tmp_path / "export")
    exported = QThink.from_pretrained(out)
    assert exported.info["trained_steps"] == 7 and exported.info["distill"] == "per_step"
    before = resumed.eval().as_qthink().generate(QUESTIONS, max_new_tokens=12)
    after = exported.generate(QUESTIONS, max_new_tokens=12)
    assert [r["token_ids"] for r in after] == [r["token_ids"] for r in before]


def test_bench_train_batched_step_has_the_seed_schedules_gradient(teacher_store, tiny_base):
    from qthink.bench.train import bench_train

    result = bench_train(str(tiny_base), str(teacher_store), batch_size=4, repeats=1, distill="none")
    assert result["batched"]["samples_per_s"] > 0 and result["seed_accumulated"]["samples_per_s"] > 0
    assert result["batched"]["peak_memory_mib"] >= 0 and result["speedup"] > 0
    assert result["max_relative_grad_difference"] < 1e-5  # per-row CE mean: batch 4 == 1 x 4 accumulation
