"""Memory-lean full fine-tuning: chunked CE, gradient checkpointing through our forward, optimizer
choice, bf16 weights, and the peak-memory estimate checked against what autograd really keeps."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers

from stcompress.config import FinetuneConfig, load_config
from stcompress.errors import ConfigError
from stcompress.model import arch
from stcompress.training import memory
from stcompress.training.forward import TranslationLM
from stcompress.training.losses import chunked_cross_entropy_sum, cross_entropy_sum
from stcompress.training.loop import make_optimizer

SEVEN_B = transformers.Qwen2AudioConfig(
    audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20,
                      encoder_ffn_dim=5120, d_model=1280),
    text_config=dict(model_type="qwen2", vocab_size=156032, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
)


def _saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs (weights excluded)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in skip:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    """A tiny model in training mode and one collated batch of two clips with targets."""
    from conftest import speech_like
    from stcompress.data.example import Example
    from stcompress.data.training import TrainItem
    from stcompress.prompt import PromptBuilder
    from stcompress.training.collate import Collator, encode_items

    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    processor = transformers.AutoProcessor.from_pretrained(str(tiny_model_dir))
    items = [TrainItem(f"e{i}", Example(f"e{i}", speech_like(1.0 + 0.5 * i, seed=i), "de"), t, "reference")
             for i, t in enumerate(["Hallo Welt, wie geht es dir heute?", "Danke schön."])]
    items, _ = encode_items(items, PromptBuilder(processor), processor.feature_extractor, max_length=400)
    tok = processor.tokenizer
    collate = Collator(processor.feature_extractor, tok.pad_token_id or 0, arch.audio_token_id(model))
    model.train()
    return model, collate(items)


def _grads(lm: TranslationLM, batch) -> tuple[float, dict[str, torch.Tensor]]:
    lm.zero_grad(set_to_none=True)
    ce, _ = lm(**batch, ce_only=True)
    ce.backward()
    return float(ce.detach()), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


def test_chunked_cross_entropy_equals_the_plain_loss_and_gradients(batch):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 300, (37,))
    plain = cross_entropy_sum(head(hidden), targets)
    g_plain = torch.autograd.grad(plain, [hidden, head.weight])
    chunked = chunked_cross_entropy_sum(hidden, head, targets, 8)  # 5 chunks, the last one short
    g_chunked = torch.autograd.grad(chunked, [hidden, head.weight])
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b)
    # Through the training forward: same loss and gradients for every weight of the tiny model.
    model, b = batch
    loss_a, grads_a = _grads(TranslationLM(model), b)
    loss_b, grads_b = _grads(TranslationLM(model, loss_chunk=4), b)
    assert loss_b == pytest.approx(loss_a, rel=1e-6) and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4)  # fp32 summation order
    # The chunk's logits are not kept for backward: autograd saves far less (hidden states only).
    lm = TranslationLM(model, loss_chunk=4)
    weights = list(model.parameters())
    kept = _saved_bytes(lambda: lm(**b, ce_only=True), weights)
    kept_plain = _saved_bytes(lambda: TranslationLM(model)(**b, ce_only=True), weights)
    n_targets = int((b["labels"][:, 1:] != -100).sum())
    vocab = arch.lm_head(model).out_features
    assert kept_plain - kept >= 4 * n_targets * vocab  # at least the fp32 log-softmax of all targets


def test_gradient_checkpointing_through_our_forward_gives_the_same_gradients(batch):
    model, b = batch
    calls = []
    # Hooks on a sublayer: transformers 5.x checkpoints a layer's forward, so the layer's own hooks
    # stay outside the checkpoint and run once; its submodules run again when it is recomputed.
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1))
             for m in (arch.decoder_layers(model)[0].mlp, arch.audio_tower(model).layers[0].fc1)]
    try:
        loss_a, grads_a = _grads(TranslationLM(model), b)
        plain_calls = len(calls)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls.clear()
        loss_b, grads_b = _grads(TranslationLM(model), b)
    finally:
        model.gradient_checkpointing_disable()
        for h in hooks:
            h.remove()
    assert plain_calls == 2 and len(calls) == 4  # each layer recomputed once in backward, decoder and encoder
    assert loss_b == pytest.approx(loss_a, rel=1e-6) and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4)  # fp32 summation order


@pytest.mark.parametrize("shape", [(96, 160, 6, 70), (48, 320, 2, 130)])
def test_layer_activation_model_matches_what_autograd_saves(shape):
    """The per-token element counts in memory.py, re-measured at shapes they were not derived at."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoderLayer

    h, i, heads, tokens = shape
    cfg = transformers.Qwen2Config(hidden_size=h, intermediate_size=i, num_attention_heads=heads,
                                   num_key_value_heads=heads, num_hidden_layers=1, vocab_size=10)
    cfg._attn_implementation = "sdpa"
    layer, rope = Qwen2DecoderLayer(cfg, 0), Qwen2RotaryEmbedding(cfg)
    x = torch.randn(2, tokens, h, requires_grad=True)
    pos = torch.arange(tokens)[None].expand(2, -1)
    pe = rope(x, pos)
    got = _saved_bytes(lambda: layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe), [*layer.parameters(), *pe])
    assert got == pytest.approx(4 * 2 * tokens * memory.decoder_layer_elements(h, i, heads), rel=0.02)
    enc_cfg = transformers.Qwen2AudioEncoderConfig(d_model=h, encoder_ffn_dim=i, encoder_attention_heads=heads, encoder_layers=1)
    enc_cfg._attn_implementation = "sdpa"
    enc = Qwen2AudioEncoderLayer(enc_cfg)
    got = _saved_bytes(lambda: arch._run_encoder_layer(enc, x, None), list(enc.parameters()))  # 4.5x and 5.x signatures
    assert got == pytest.approx(4 * 2 * tokens * memory.encoder_layer_elements(h, i, heads), rel=0.02)


def test_whole_model_activation_estimate_against_measurement(batch):
    """What autograd keeps for one fp32 training forward of the tiny model (no autocast) against the
    estimate at that batch's real lengths: activations of decoder + projector (cached tower output,
    chunked CE so no logits are kept), then the plain CE's kept logits (4 bytes each: the log-softmax
    output; the backward's transient peak, covered by the estimate's 10 bytes a logit, is not a
    saved tensor). The tower is left out here: with a padding mask, CPU SDPA falls back to the math
    kernel and keeps T^2 attention weights, which CUDA's memory-efficient kernel does not."""
    model, b = batch
    with torch.no_grad():
        states, lengths = arch.tower_states(model, b["input_features"], b["feature_attention_mask"])
    cached = {k: v for k, v in b.items() if k not in ("input_features", "feature_attention_mask")}
    cached.update(audio_states=states, audio_lengths=lengths)
    weights = list(model.parameters())
    kept = _saved_bytes(lambda: TranslationLM(model, loss_chunk=8)(**cached, ce_only=True), weights)
    kept_plain = _saved_bytes(lambda: TranslationLM(model)(**cached, ce_only=True), weights)
    seconds = float(b["feature_attention_mask"].sum(-1).max()) / 100
    n_targets = int((b["labels"][:, 1:] != -100).sum())
    shape = memory.Shape(batch=b["input_ids"].shape[0], seconds=seconds, sequence=b["input_ids"].shape[1], targets=1)
    est = memory.estimate(model.config, shape, autocast=False, freeze_audio_tower=True, cache_audio=True)
    assert 0.8 * est.activations <= kept <= 1.25 * est.activations, (kept, est.activations)
    logits = 4 * n_targets * arch.lm_head(model).out_features
    assert 0.9 * logits <= kept_plain - kept <= 1.1 * logits, (kept_plain - kept, logits)


def test_seven_b_estimates_and_the_one_80gb_preset():
    shape = memory.Shape(batch=4, seconds=30, sequence=850, targets=60)
    plain = memory.estimate(SEVEN_B, shape)
    assert plain.weights == 4 * 8_397_094_912 and plain.gradients == plain.weights and plain.optimizer == 2 * plain.weights
    assert plain.total > 139e9  # plain fp32 AdamW does not fit even one H200
    lean = memory.estimate(SEVEN_B, shape, master_weights="bf16", optimizer="adamw_8bit", gradient_checkpointing=True,
                           loss_chunk=128)
    assert lean.weights == 2 * 8_397_094_912 and lean.optimizer == 8_397_094_912 * 2 and lean.weight_copies == 0
    assert lean.total < 75e9
    sharded = memory.estimate(SEVEN_B, shape, gradient_checkpointing=True, world=8, sharded=True)
    assert sharded.weights == plain.weights / 8 and sharded.optimizer == plain.optimizer / 8


def test_finetune_dry_run_prints_the_estimate_and_trains_nothing(tmp_path, tiny_model_dir):
    out = tmp_path / "ft"
    done = subprocess.run([sys.executable, "-m", "stcompress", "finetune", "--dry-run", f"--model.path={tiny_model_dir}",
                           f"--output={out}", "--data.dataset=builtin", "--train.optimizer=adamw_8bit",
                           "--train.master_weights=bf16", "--train.gradient_checkpointing=true"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "peak memory per GPU" in done.stdout and "optimizer" in done.stdout and not out.exists()
    cfg = load_config(FinetuneConfig, None, {"model.path": str(tiny_model_dir), "train.optimizer": "adamw_8bit",
                                             "train.master_weights": "bf16", "train.gradient_checkpointing": "true"})
    row = memory.estimate_for(cfg)
    assert f"{row['total'] / 1e9:8.2f} GB" in done.stdout


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw", "adafactor"])
def test_every_optimizer_steps_on_cpu(name):
    pytest.importorskip("bitsandbytes") if name not in ("adamw", "adafactor") else None
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128))
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(model, 1e-2, 0.01, name)
    model(torch.randn(8, 64)).pow(2).mean().backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    if name.endswith("8bit"):
        assert opt.state[model[0].weight]["state1"].dtype == torch.uint8  # 1 byte a moment


def test_optimizer_and_weight_options_are_checked(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)  # as if bitsandbytes were not installed
    with pytest.raises(ConfigError, match=r"train.optimizer: adamw_8bit needs bitsandbytes; pip install 'stcompress\[quant\]'"):
        make_optimizer(torch.nn.Linear(2, 2), 1e-3, 0.0, "adamw_8bit")
    monkeypatch.undo()
    import dataclasses

    base = FinetuneConfig()
    problems = dataclasses.replace(base, mode="lora", train=dataclasses.replace(base.train, master_weights="bf16",
                                                                                loss_chunk=-1)).problems()
    assert any(p.startswith("train.master_weights: bf16 is for mode full") for p in problems)
    assert any(p.startswith("train.loss_chunk: -1 is negative") for p in problems)
    from stcompress.stages.finetune import load_student_dtype

    assert load_student_dtype(load_config(FinetuneConfig, None, {"model.path": "builtin:tiny-random", "train.master_weights": "bf16"})) == "bfloat16"
    assert load_student_dtype(FinetuneConfig()) == "float32"


def test_the_80gb_preset_parses_and_fits_80gb_at_the_papers_batch():
    from pathlib import Path

    from stcompress.config import read_yaml

    preset = Path(__file__).resolve().parents[1] / "recipes" / "presets" / "teacher-80gb.yaml"
    cfg = load_config(FinetuneConfig, read_yaml(preset))
    t = cfg.train
    assert not cfg.problems() and cfg.mode == "full" and (t.epochs, t.batch_size, t.lr) == (3, 4, 1e-5)
    est = memory.estimate(SEVEN_B, memory.Shape(batch=t.batch_size, seconds=30, sequence=t.max_length),
                          master_weights=t.master_weights, optimizer=t.optimizer,
                          gradient_checkpointing=t.gradient_checkpointing, loss_chunk=t.loss_chunk)
    assert est.total < 75e9
