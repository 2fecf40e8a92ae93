"""`stcompress finetune` on a tiny random Qwen2-Audio: labels, batching, losses, LoRA / QLoRA / full
fine-tuning, resume, dataset mixing, word-level KD, errors and the CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from stcompress import cli
from stcompress.artifacts import read_manifest
from stcompress.config import DataConfig, DatasetMix, FinetuneConfig, LoraOptions, load_config
from stcompress.data.example import Example
from stcompress.data.training import TrainItem, reference_items, repeat_items
from stcompress.errors import ConfigError, DataError, ModelError, StcompressError
from stcompress.model import arch, tower_memo
from stcompress.prompt import IGNORE_INDEX, PromptBuilder, messages
from stcompress.stages import finetune
from stcompress.training.collate import Collator, encode_items
from stcompress.training.forward import TranslationLM
from stcompress.training.losses import cross_entropy_sum, kd_kl_sum, mix_losses

TARGETS = ("Hallo Welt.", "Guten Morgen, wie geht es?", "Danke schön.")


@pytest.fixture
def manifest(tmp_path, make_wav) -> Path:
    rows = [{"id": f"u{i}", "audio": make_wav(f"c{i}.wav", seconds=1.0 + 0.3 * i, seed=i).name, "text_de": t}
            for i, t in enumerate(TARGETS)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return transformers.AutoProcessor.from_pretrained(str(tiny_model_dir))


def _cfg(tmp_path: Path, manifest: Path, **overrides) -> FinetuneConfig:
    base = {
        "mode": "lora", "output": str(tmp_path / "out"), "data.dataset": str(manifest),
        "model.path": "builtin:tiny-random", "model.device": "cpu", "lora.r": "8", "lora.alpha": "16", "train.batch_size": "3", "train.epochs": "6",
        "train.lr": "1e-2", "train.scheduler": "constant", "train.log_every": "1", "dev.dataset": "none",
    }
    return load_config(FinetuneConfig, None, {**base, **overrides})


def _train_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return [r["ce"] for r in rows if r["kind"] == "train"]


# ---------------------------------------------------------------------------------------------
# Labels and batches


def test_training_ids_are_the_chat_template_rendering(processor):
    builder = PromptBuilder(processor)
    ids, labels = builder.training_ids("de", 7, "  Hallo Welt.  ")
    tok = processor.tokenizer
    full = processor.apply_chat_template(
        [*messages(builder.cfg, "de"), {"role": "assistant", "content": "Hallo Welt."}], tokenize=False
    )
    assert full.endswith("<|im_start|>assistant\nHallo Welt.<|im_end|>\n")
    expected = []
    for token in tok(full, add_special_tokens=False)["input_ids"]:
        expected += [token] * (7 if token == tok.convert_tokens_to_ids("<|AUDIO|>") else 1)
    # Our ids stop at <|im_end|>: the template's trailing newline comes after the end of turn,
    # which generation never produces.
    assert ids + tok("\n", add_special_tokens=False)["input_ids"] == expected
    n_prompt = len(builder.input_ids("de", 7))
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert labels[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(labels[n_prompt:]) == "Hallo Welt.<|im_end|>"


def test_collator_masks_prompt_and_padding_token_by_token(processor, speech_like):
    builder = PromptBuilder(processor)
    items = [TrainItem(f"e{i}", Example(f"e{i}", speech_like(s, seed=i), "de"), t, "reference")
             for i, (s, t) in enumerate([(1.0, "Ja."), (2.3, "Ein deutlich längerer Satz, bitte.")])]
    encoded, report = encode_items(items, builder, processor.feature_extractor, max_length=512)
    assert report.kept == 2
    pad = processor.tokenizer.pad_token_id
    batch = Collator(processor.feature_extractor, pad, 151646)(encoded)
    assert batch["input_features"].shape[0] == 2 and batch["feature_attention_mask"].sum(-1).tolist() == [100, 230]
    for row, e in enumerate(encoded):
        n, n_prompt = len(e.input_ids), len(e.input_ids) - e.n_target
        for pos in range(batch["input_ids"].shape[1]):
            label, token, attn = (batch[k][row, pos].item() for k in ("labels", "input_ids", "attention_mask"))
            if pos < n_prompt:
                assert (label, token, attn) == (IGNORE_INDEX, e.input_ids[pos], 1)
            elif pos < n:
                assert (label, token, attn) == (e.input_ids[pos], e.input_ids[pos], 1)
            else:
                assert (label, token, attn) == (IGNORE_INDEX, pad, 0)


def test_audio_over_30_seconds_is_counted_and_skipped_or_truncated(processor, speech_like):
    builder = PromptBuilder(processor)
    items = [TrainItem(f"e{i}", Example(f"e{i}", speech_like(s, seed=i), "de"), "Ja.", "reference")
             for i, s in enumerate([31.0, 2.0])]
    kept, report = encode_items(items, builder, processor.feature_extractor, max_length=2048)
    assert [e.item.id for e in kept] == ["e1"] and report.long_audio == 1
    kept, report = encode_items(items, builder, processor.feature_extractor, max_length=2048, long_audio="truncate")
    audio = builder.rendered("de").audio_token_id
    assert report.long_audio == 1 and [e.input_ids.count(audio) for e in kept] == [750, 50]  # 30 s -> 750 tokens


def test_training_forward_matches_transformers_and_ignores_padding(tiny_model_dir, processor, speech_like):
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    items = [TrainItem(f"e{i}", Example(f"e{i}", speech_like(s, seed=i), "de"), t, "reference")
             for i, (s, t) in enumerate(zip((1.0, 2.1), TARGETS))]
    encoded, _ = encode_items(items, PromptBuilder(processor), processor.feature_extractor, max_length=512)
    collate = Collator(processor.feature_extractor, processor.tokenizer.pad_token_id, arch.audio_token_id(model))
    lm = TranslationLM(model)
    with torch.no_grad():
        logits, targets = lm(**collate(encoded))
        singles = [lm(**collate([e])) for e in encoded]
        reference = model(**{k: v for k, v in collate(encoded[1:]).items() if k != "labels"}).logits[0]
    assert torch.equal(targets, torch.cat([t for _, t in singles]))
    torch.testing.assert_close(logits, torch.cat([lg for lg, _ in singles]), atol=1e-4, rtol=1e-4)
    # transformers' own forward, at the positions that predict the second item's target tokens
    labels = torch.tensor(encoded[1].labels)
    where = (labels[1:] != IGNORE_INDEX).nonzero().squeeze(-1)
    torch.testing.assert_close(singles[1][0], reference[where], atol=1e-4, rtol=1e-4)
    from stcompress.training.lora import setup_full

    setup_full(model, freeze_audio_tower=True, gradient_checkpointing=False)
    tower = {id(p) for p in arch.audio_tower(model).parameters()}
    assert all(p.requires_grad == (id(p) not in tower) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Losses


def test_kd_loss_limits_and_mixing():
    torch.manual_seed(0)
    student = torch.randn(6, 50)
    labels = torch.randint(0, 50, (6,))
    assert kd_kl_sum(student, student.clone(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-5)
    one_hot = torch.nn.functional.one_hot(labels, 50).float() * 1e4  # teacher certain of the label
    torch.testing.assert_close(kd_kl_sum(student, one_hot), cross_entropy_sum(student, labels))
    teacher = torch.randn(6, 50)
    p = torch.softmax(teacher / 3, -1)
    kl = (p * (torch.log_softmax(teacher / 3, -1) - torch.log_softmax(student / 3, -1))).sum() * 9
    torch.testing.assert_close(kd_kl_sum(student, teacher, temperature=3.0), kl)
    ce, kd = torch.tensor(2.0), torch.tensor(6.0)
    assert mix_losses(ce, kd, 0.25).item() == pytest.approx(0.75 * 2 + 0.25 * 6)
    assert mix_losses(ce, None, 0.5) is ce and mix_losses(ce, kd, 0.0) is ce


# ---------------------------------------------------------------------------------------------
# Data mixing


def _fake_distill(tmp_path: Path, manifest: Path) -> Path:
    """A `stcompress distill` output as its contract describes it (text rows + the data section)."""
    out = tmp_path / "distill"
    out.mkdir()
    rows = [{"id": f"u{i}:{tag}", "source_id": f"u{i}", "target": f"{t} ({tag})", "origin": origin}
            for i, t in enumerate(TARGETS) for tag, origin in (("ref", "reference"), ("kd", "teacher"))]
    (out / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "manifest.json").write_text(json.dumps({"stage": "distill", "config": {"data": {"dataset": str(manifest)}}}))
    return out


def test_dataset_mix_repeat_counts(tmp_path, manifest):
    items = reference_items([Example("a", None, "de", references=("x", "y", " ")), Example("b", None, "de", references=("z",))])
    assert [i.id for i in items] == ["a#0", "a#1", "b#0"]  # each reference is an item; blank ones are not
    assert len(repeat_items(items, 2.0)) == 6 and len(repeat_items(items, 0)) == 0
    assert len(repeat_items(items * 2, 1.5)) == 9 and repeat_items(items, 0.34, seed=1) == repeat_items(items, 0.34, seed=1)
    distilled = _fake_distill(tmp_path, manifest)
    cfg = dataclasses.replace(
        _cfg(tmp_path, manifest),
        datasets=(DatasetMix(data=load_config(FinetuneConfig, None, {"data.dataset": str(manifest), "model.path": "builtin:tiny-random"}).data, repeat=2.5),
                  DatasetMix(distilled=str(distilled), repeat=10)),
    )
    mixed, report, _ = finetune.load_training_items(cfg)
    assert [(r["items"], r["items_after_repeat"]) for r in report] == [(3, 8), (6, 60)]
    assert len(mixed) == 68 and sum(i.origin == "distilled" for i in mixed) == 60
    assert {i.example.id for i in mixed} == {"u0", "u1", "u2"}


# ---------------------------------------------------------------------------------------------
# Training runs


def test_lora_steps_reduce_loss_train_the_encoder_and_keep_the_best(tmp_path, manifest, tiny_model_dir, monkeypatch):
    import safetensors.torch

    from stcompress.training.loop import Trainer

    scripted = iter([5.0, 4.0, 3.0, 3.5, 2.0, 1.0])  # dev losses: step 4 is worse, patience 1 stops there
    monkeypatch.setattr(Trainer, "dev_loss", lambda self: next(scripted))
    cfg = _cfg(tmp_path, manifest, **{"dev.dataset": str(manifest), "dev.every": "1", "dev.patience": "1",
                                      "train.keep_checkpoints": "true"})
    out = finetune.run(cfg, progress=False)
    losses = _train_losses(out)
    assert len(losses) == 4 and losses[-1] < losses[0] - 1.0
    m = read_manifest(out)
    t = m["training"]
    assert t["steps"] == 4 and t["stopped_early"] and m["best_checkpoint"]["step"] == 3 and t["final_dev_loss"] == 3.5
    adapter = safetensors.torch.load_file(str(out / "adapter" / "adapter_model.safetensors"))
    ckpts = tmp_path / "out.checkpoints"
    best = {k.removeprefix("model.").replace(".default.", "."): v
            for k, v in safetensors.torch.load_file(str(ckpts / "best" / "model.safetensors")).items()}
    last = {k.removeprefix("model.").replace(".default.", "."): v
            for k, v in safetensors.torch.load_file(str(ckpts / "last" / "model.safetensors")).items()}
    assert adapter.keys() == best.keys() == last.keys()
    assert all(torch.equal(adapter[k], best[k]) for k in adapter)  # the output holds the best weights ...
    assert not all(torch.equal(adapter[k], last[k]) for k in adapter)  # ... not the last ones
    audio_b = [v for k, v in adapter.items() if "audio_tower" in k and "lora_B" in k]
    assert audio_b and all(v.abs().sum() > 0 for v in audio_b)  # zero-initialised: gradients reached the encoder
    assert not any("lm_head" in k for k in adapter)
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "tokenizer_config.json").is_file()
    assert m["stage"] == "finetune" and m["mode"] == "lora" and m["base_model"] == str(tiny_model_dir)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert m["target_lang"] == "de" and "Translate the English speech into German:" in m["prompt"]
    assert t["epochs_completed"] == 4 and t["final_train_loss"] < losses[0]
    assert 0 < t["trainable_percent"] < 1 and t["tokens_per_s"] > 0 and m["adapter_check"]["identical"]
    assert m["lora"]["adapted_layers"]["audio"] > 0 and m["data"]["train_items"] == 3 and m["data"]["dev_items"] == 3


def test_qlora_steps_on_cpu_reduce_loss(tmp_path, manifest):
    pytest.importorskip("bitsandbytes")
    # The paper's QLoRA path: prepare_model_for_kbit_training with gradient checkpointing.
    out = finetune.run(_cfg(tmp_path, manifest, mode="qlora", **{"train.gradient_checkpointing": "true", "train.epochs": "4"}),
                       progress=False)
    losses = _train_losses(out)
    assert losses[-1] < losses[0] - 1.0
    m = read_manifest(out)
    assert m["mode"] == "qlora" and m["lora"]["prepare_kbit"]["applied"]
    assert m["training"]["total_parameters"] > m["training"]["trainable_parameters"] > 0
    assert not (tmp_path / "out.checkpoints").exists()  # removed after success


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path, manifest):
    import peft

    over = {"train.batch_size": "1", "train.epochs": "2", "train.save_every": "2", "train.scheduler": "cosine",
            "train.warmup_steps": "1", "lora.dropout": "0.1"}
    whole = finetune.run(_cfg(tmp_path / "a", manifest, **over), progress=False)

    class Killed(Exception):
        pass

    def kill_after_5(state):
        if state.step == 5:
            raise Killed

    cfg = _cfg(tmp_path / "b", manifest, **over)
    with pytest.raises(Killed):
        finetune.run(cfg, progress=False, on_step=kill_after_5)
    assert not Path(cfg.output).exists() and (Path(cfg.output).parent / "out.checkpoints" / "last").is_dir()
    with pytest.raises(StcompressError, match=r"different config: train.lr \(0.01 -> 0.001\)"):
        finetune.run(_cfg(tmp_path / "b", manifest, **over, **{"train.lr": "1e-3"}), progress=False)
    resumed = finetune.run(cfg, progress=False)
    m = read_manifest(resumed)
    assert m["training"]["resumed_from_steps"] == [4] and m["training"]["steps"] == 6
    assert _train_losses(resumed) == pytest.approx(_train_losses(whole), rel=1e-5)
    a = peft.load_peft_weights(str(whole / "adapter"))
    b = peft.load_peft_weights(str(resumed / "adapter"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_cached_tower_output_trains_exactly_like_the_live_tower(tmp_path, manifest, monkeypatch):
    over = {"mode": "full", "train.freeze_audio_tower": "true", "train.epochs": "3", "train.lr": "1e-3",
            "train.check_segments": "1", "dev.dataset": str(manifest)}
    live = finetune.run(_cfg(tmp_path / "live", manifest, **over), progress=False)
    calls = []
    real = arch.tower_states
    monkeypatch.setattr(arch, "tower_states", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(tower_memo.MEMO, "limit", 0)  # count every tower run (no cross-stage memo)
    cached = finetune.run(_cfg(tmp_path / "cached", manifest, **over, **{"train.cache_audio": "true"}), progress=False)
    m = read_manifest(cached)
    # 3 distinct clips (train and dev share them), encoded one by one before training; the 9
    # training steps and 3 dev passes then never run the tower (the reload check's decoding does).
    assert m["data"]["cached_clips"] == 3 and read_manifest(live)["data"]["cached_clips"] == 0
    assert len(calls) == 3 + 2 * m["reload_check"]["segments"]
    assert _train_losses(cached) == pytest.approx(_train_losses(live), rel=1e-5)
    dev = [[json.loads(r)["dev_loss"] for r in (out / "history.jsonl").read_text().splitlines() if '"dev"' in r]
           for out in (live, cached)]
    assert dev[0] == pytest.approx(dev[1], rel=1e-5) and len(dev[0]) == 3
    problems = FinetuneConfig(train=dataclasses.replace(FinetuneConfig().train, cache_audio=True)).problems()
    assert any("train.cache_audio: needs train.freeze_audio_tower" in p for p in problems)


def test_a_kill_between_the_checkpoint_renames_keeps_the_previous_checkpoint(tmp_path):
    from stcompress.training import checkpoint as ckpt

    old = tmp_path / "last.old"
    old.mkdir()
    (old / ckpt.STATE_FILE).write_text(json.dumps(ckpt.TrainerState(config={"a": 1}, step=7).to_json()))
    ckpt.write_checksums(old)
    state = ckpt.read_state(tmp_path)  # `last` is gone: the kill came after last -> last.old
    assert state is not None and state.step == 7 and (tmp_path / "last" / ckpt.STATE_FILE).is_file()
    assert not old.exists() and ckpt.read_state(tmp_path / "nothing") is None


def test_full_finetune_with_kd_dev_and_reload(tmp_path, manifest, tiny_model_dir):
    cfg = _cfg(tmp_path, manifest, mode="full", **{
        "train.max_steps": "2", "train.lr": "1e-3", "dev.dataset": str(manifest), "dev.chrf_segments": "1",
        "train.check_segments": "1", "train.save_dtype": "bfloat16",  # fp32 training, bf16 model/ (the GPU default)
        "dev.max_new_tokens": "4", "dev.every": "2", "kd.teacher": str(tiny_model_dir), "kd.ratio": "0.5",
        "kd.temperature": "2", "train.keep_checkpoints": "true",
    })
    out = finetune.run(cfg, progress=False)
    m = read_manifest(out)
    assert m["mode"] == "full" and m["output"] == {"model": "model"} and m["reload_check"]["identical"]
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    train, dev = [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "dev"]
    assert train[0]["kd"] == pytest.approx(0.0, abs=1e-4)  # student == teacher before the first update
    assert train[1]["kd"] > 0 and train[1]["loss"] == pytest.approx(0.5 * train[1]["ce"] + 0.5 * train[1]["kd"])
    assert len(dev) == 1 and dev[0]["step"] == 2 and "dev_chrf" in dev[0]  # every 2 steps, not each epoch
    assert m["best_checkpoint"]["step"] == 2 and m["training"]["final_dev_loss"] == dev[0]["dev_loss"]
    assert (tmp_path / "out.checkpoints" / "best" / "model.safetensors").is_file()
    reloaded = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(out / "model"), dtype="auto")
    assert arch.num_decoder_layers(reloaded) == 4 and next(reloaded.parameters()).dtype == torch.bfloat16
    assert transformers.AutoProcessor.from_pretrained(str(out / "model")).chat_template


@pytest.mark.slow
def test_two_processes_and_accumulation_equal_one_big_batch(tmp_path, make_wav):
    """DDP (torchrun, 2 CPU processes, gloo) x batch 1 == batch 2 == batch 1 x 2 accumulation steps:
    every step divides by the target tokens of the whole step, so the updates are the same."""
    import peft

    rows = [{"id": f"u{i}", "audio": make_wav(f"c{i}.wav", seconds=1.0 + 0.4 * i, seed=i).name, "text_de": t}
            for i, t in enumerate([*TARGETS, "Bis morgen, auf Wiedersehen!"])]
    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, torch\ntorch.set_num_threads(1)\n"
        "from stcompress.config import FinetuneConfig, load_config\nfrom stcompress.stages import finetune\n"
        "over = dict(a.split('=', 1) for a in sys.argv[1:])\n"
        "finetune.run(load_config(FinetuneConfig, None, over), progress=False)\n"
    )
    common = ["mode=lora", f"data.dataset={data}", "train.epochs=2", "train.lr=1e-2", "train.scheduler=constant",
              "lora.r=8", "lora.alpha=16", "train.log_every=1", "model.path=builtin:tiny-random", "model.device=cpu"]
    runs = {
        "ddp": ["-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), "train.batch_size=1"],
        "big": [str(script), "train.batch_size=2"],
        "accum": [str(script), "train.batch_size=1", "train.grad_accum=2"],
    }
    for name, args in runs.items():
        done = subprocess.run([sys.executable, *args, *common, f"output={tmp_path / name}"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    big = _train_losses(tmp_path / "big")
    weights = {name: peft.load_peft_weights(str(tmp_path / name / "adapter")) for name in runs}
    for name in ("ddp", "accum"):
        assert _train_losses(tmp_path / name) == pytest.approx(big, rel=1e-5)
        for k, v in weights["big"].items():
            torch.testing.assert_close(weights[name][k], v, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Lineage, the paper's trainable share, errors, CLI


def test_lora_share_on_the_real_architecture_is_the_papers():
    """LoRA on every linear layer (audio encoder included, LM head excluded) of the 7B architecture:
    2.41% trainable. Built on the meta device at r 1 (LoRA weights grow linearly with r)."""
    from stcompress.training.lora import apply_lora, resolve_targets, trainable_report

    config = transformers.Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=128, encoder_layers=32,
                          encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280),
        text_config=dict(model_type="qwen2", vocab_size=156032, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    )
    with torch.device("meta"):
        model = transformers.Qwen2AudioForConditionalGeneration(config)
    decoder_only = resolve_targets(model, ("all-linear",), audio_tower=False)  # lora.audio_tower: false
    assert len(decoder_only) == 225 and not any("audio_tower" in n for n in decoder_only)
    assert len(resolve_targets(model, ("q_proj", "fc1"), audio_tower=True)) == 32 + 32 + 32
    model, info = apply_lora(model, LoraOptions(r=1), quantized=False, audio_tower=True, gradient_checkpointing=False)
    report = trainable_report(model)
    base = report["total_parameters"] - report["trainable_parameters"]
    assert base == 8_397_094_912 and info["adapted_layers"] == {"audio": 192, "projector": 1, "decoder": 224}
    lora_r64 = 64 * report["trainable_parameters"]
    assert lora_r64 == 207_437_824 and 100 * lora_r64 / (base + lora_r64) == pytest.approx(2.41, abs=0.005)


def test_bad_inputs_get_one_line_errors(tmp_path, manifest, tiny_model_dir, monkeypatch):
    empty = dataclasses.replace(_cfg(tmp_path, manifest), datasets=(DatasetMix(data=_cfg(tmp_path, manifest).data, repeat=0),))
    with pytest.raises(DataError, match="no training items"):
        finetune.run(empty, progress=False)
    with pytest.raises(DataError, match=r"train.max_length: 3 items .* longer than 40 tokens.*raise train.max_length"):
        finetune.run(_cfg(tmp_path, manifest, **{"train.max_length": "40"}), progress=False)
    with pytest.raises(ConfigError, match="kd.teacher: word-level KD .* needs a teacher"):
        _cfg(tmp_path, manifest, **{"kd.ratio": "0.5"})
    with pytest.raises(ConfigError, match="lora.targets: 'qkv' matches no linear layer"):
        finetune.run(_cfg(tmp_path, manifest, **{"lora.targets": "q_proj,qkv"}), progress=False)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ModelError, match="qlora needs bitsandbytes"):
        finetune.run(_cfg(tmp_path, manifest, mode="qlora"), progress=False)
    adapter_only = tmp_path / "lora-run"
    (adapter_only / "adapter").mkdir(parents=True)
    (adapter_only / "manifest.json").write_text(json.dumps({"stage": "finetune", "mode": "lora"}))
    with pytest.raises(ModelError, match="merge it first with `stcompress export"):
        finetune.run(_cfg(tmp_path, manifest, **{"model.path": str(adapter_only)}), progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_help_and_end_to_end_from_a_pruned_model(tmp_path, manifest, tiny_model_dir):
    out = subprocess.run([sys.executable, "-m", "stcompress", "finetune", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--lora.targets" in out.stdout and "--kd.ratio" in out.stdout
    pruned = tmp_path / "prune"
    shutil.copytree(tiny_model_dir, pruned)
    (pruned / "manifest.json").write_text(json.dumps({
        "stage": "prune", "removed_layers": [1], "layer_map": [0, 2, 3, 4], "base_model": "Qwen/Qwen2-Audio-7B-Instruct",
    }))
    args = ["finetune", "--mode", "lora", "--model.path", str(pruned), "--data.dataset", str(manifest),
            "--train.max-steps", "1", "--lora.r", "4", "--output", str(tmp_path / "ft"), "-q"]
    assert cli.main(args) == 0
    m = read_manifest(tmp_path / "ft")
    assert m["base_model"] == str(pruned.resolve()) and m["removed_layers"] == [1] and m["layer_map"] == [0, 2, 3, 4]
    assert m["original_model"] == "Qwen/Qwen2-Audio-7B-Instruct" and m["upstream"][-1]["stage"] == "prune"
    assert m["training"]["steps"] == 1 and m["config"]["lora"]["r"] == 4
    assert (tmp_path / "ft" / "adapter" / "adapter_model.safetensors").is_file()


def test_freeze_language_model_trains_the_projector_alone(tmp_path, manifest, tiny_model_dir):
    """The alignment warm-up: after training, the saved LM and tower are bit-identical to the base."""
    over = {"mode": "full", "train.freeze_audio_tower": "true", "train.freeze_language_model": "true",
            "train.epochs": "2", "train.lr": "1e-2", "train.check_segments": "1", "dev.dataset": "none"}
    cfg = _cfg(tmp_path / "proj", manifest, **over, **{"model.path": str(tiny_model_dir)})
    out = finetune.run(cfg, progress=False)
    from safetensors.torch import load_file

    def weights(folder):
        return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(f).items()}

    base, trained = weights(cfg.model.path), weights(out / "model")
    assert base.keys() == trained.keys()
    changed = {k for k in base if not torch.equal(base[k].float(), trained[k].float())}
    assert changed and all(arch.component_of(k) == "projector" for k in changed), sorted(changed)[:5]
    m = read_manifest(out)
    assert m["training"]["trainable_parameters"] == sum(p.numel() for k, p in base.items() if "multi_modal_projector" in k)
    problems = FinetuneConfig(mode="lora", train=dataclasses.replace(FinetuneConfig().train, freeze_language_model=True)).problems()
    assert any("train.freeze_language_model: is for mode full" in p for p in problems)


def test_lora_train_projector_trains_its_full_weights_and_export_merges_them(tmp_path, manifest, tiny_model_dir):
    """lora.train_projector: the projector's own weights train beside the LM adapters (no LoRA on
    it), ride in the adapter, and the merged export holds exactly them."""
    from safetensors.torch import load_file

    from stcompress.config import ExportConfig
    from stcompress.stages import export

    cfg = _cfg(tmp_path / "tp", manifest, **{"model.path": str(tiny_model_dir), "lora.train_projector": "true",
                                             "lora.audio_tower": "false", "train.epochs": "2"})
    out = finetune.run(cfg, progress=False)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    proj = {k: v for k, v in adapter.items() if "multi_modal_projector" in k}
    assert proj and not any("lora_" in k for k in proj), sorted(proj)  # full weights, no LoRA on the projector
    assert any("lora_B" in k and arch.component_of(k) == "decoder_layers" for k in adapter)

    def weights(folder):
        return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(f).items()}

    base = weights(tiny_model_dir)
    base_proj = {k: v for k, v in base.items() if "multi_modal_projector" in k}
    assert len(base_proj) == len(proj)
    trained = {k.rsplit("multi_modal_projector.", 1)[1]: v for k, v in proj.items()}
    assert any(not torch.equal(base_proj[k], trained[k.rsplit("multi_modal_projector.", 1)[1]]) for k in base_proj)
    m = read_manifest(out)
    assert m["lora"]["trained_in_full"] == ["multi_modal_projector"] and m["lora"]["adapted_layers"]["projector"] == 0
    assert m["adapter_check"]["identical"]

    merged_dir = export.run(ExportConfig(output=str(tmp_path / "merged"), input=str(out), dtype="float32", device="cpu",
                                         check_segments=2, check_max_new_tokens=6, data=DataConfig(limit=2)), progress=False)
    merged = weights(merged_dir)
    for k, v in base_proj.items():  # the export carries the trained projector, bit for bit
        assert torch.equal(merged[k], trained[k.rsplit("multi_modal_projector.", 1)[1]]), k
    assert read_manifest(merged_dir)["reload_check"]["identical"] is True

    full = FinetuneConfig(mode="full", lora=dataclasses.replace(FinetuneConfig().lora, train_projector=True)).problems()
    assert any("lora.train_projector: is for mode lora / qlora" in p for p in full)
    q = FinetuneConfig(mode="qlora", lora=dataclasses.replace(FinetuneConfig().lora, train_projector=True)).problems()
    assert any("add projector to lora.keep_unquantized" in p for p in q)
