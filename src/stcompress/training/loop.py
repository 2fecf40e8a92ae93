"""The training loop: plain PyTorch + accelerate, one code path for CPU, one GPU and many.

`accelerate launch` gives DDP (checked on CPU: two processes train exactly like one with twice the
batch), or FSDP2 with the shipped FSDP config (training/fsdp.py; checked likewise). Optimizer,
gradient clipping and checkpoints go through accelerate, which shards them under FSDP.

Per optimizer step the loop takes `grad_accum` micro-batches, divides every summed token loss by
the number of target tokens of the whole step (all micro-batches, all processes), clips, steps
AdamW and the LR schedule, then evaluates the dev split, keeps the best weights, stops early, and
checkpoints, as configured.

Data order: epoch e visits the items in `default_rng([seed, e]).permutation`, cut into batches;
process r of w takes batches r, r + w, ... . A checkpoint stores (epoch, micro-batches done), so
a resumed run skips exactly the batches already trained on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from stcompress.config import FinetuneConfig, GenerationConfig
from stcompress.data.example import Example
from stcompress.errors import ConfigError
from stcompress.progress import bar as progress_bar
from stcompress.prompt import IGNORE_INDEX
from stcompress.training import checkpoint as ckpt
from stcompress.training import fsdp
from stcompress.training.collate import Collator, Encoded
from stcompress.training.forward import TranslationLM, evaluating
from stcompress.training.losses import cross_entropy_sum, kd_kl_sum, mix_losses

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    train: list[Encoded]
    dev: list[Encoded]
    dev_examples: list[Example]  # translated for chrF when dev.chrf_segments > 0
    collator: Collator


def epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int, world: int = 1, rank: int = 0) -> list[list[int]]:
    """This process's batches (item indices) of one epoch; every process gets the same count."""
    order = np.random.default_rng([seed, epoch]).permutation(n_items).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n_items, batch_size)]
    batches += batches[: (-len(batches)) % world]  # wrap around so no process runs out first
    return batches[rank::world]


OPTIMIZERS = {  # train.optimizer -> (module, class); bytes of state per trainable weight in memory.py
    "adamw": ("torch.optim", "AdamW"),
    "adamw_8bit": ("bitsandbytes.optim", "AdamW8bit"),  # Dettmers et al. 2022, block-wise 8-bit states
    "paged_adamw_8bit": ("bitsandbytes.optim", "PagedAdamW8bit"),  # states in CUDA unified memory
    "paged_adamw": ("bitsandbytes.optim", "PagedAdamW"),
    "adafactor": ("torch.optim", "Adafactor"),  # Shazeer & Stern 2018, factored second moment
}


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, name: str = "adamw") -> torch.optim.Optimizer:
    """train.optimizer with HF Trainer's AdamW defaults; matrices decay, biases and norm weights do not."""
    import importlib

    module, cls = OPTIMIZERS[name]
    try:
        optimizer_cls = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise ConfigError([f"train.optimizer: {name} needs bitsandbytes; pip install 'stcompress[quant]', "
                           "or use train.optimizer: adamw"]) from exc
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"lr": lr} if name == "adafactor" else {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8}
    if name == "adamw" and params and all(p.device.type == "cuda" for p in params):
        kwargs["fused"] = True  # one kernel, no foreach temporaries the size of all weights at step time
    return optimizer_cls([g for g in groups if g["params"]], **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup: int, total: int) -> Any:
    from transformers import get_scheduler

    if name == "constant" and warmup:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def plan(n_items: int, cfg: FinetuneConfig, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    t = cfg.train
    per_epoch = math.ceil(len(epoch_batches(n_items, t.batch_size, t.seed, 0, world)) / t.grad_accum)
    total = per_epoch * t.epochs
    return per_epoch, min(total, t.max_steps) if t.max_steps else total


class Trainer:
    """One fine-tuning run; `fit` returns the final TrainerState (best weights loaded)."""

    def __init__(self, cfg: FinetuneConfig, accelerator: Any, model: TranslationLM, data: TrainData, *,
                 processor: Any, ckpt_dir: Path, config: dict[str, Any], teacher: TranslationLM | None = None,
                 progress: bool = True, on_step: Callable[[ckpt.TrainerState], None] | None = None):
        self.cfg, self.acc, self.data, self.processor = cfg, accelerator, data, processor
        self.ckpt_dir, self.teacher, self.on_step = ckpt_dir, teacher, on_step
        self.progress = progress and accelerator.is_main_process
        self.steps_per_epoch, self.total = plan(len(data.train), cfg, accelerator.num_processes)
        optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.optimizer)
        scheduler = make_scheduler(optimizer, cfg.train.scheduler, cfg.train.warmup_steps, self.total)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        ckpt.install_hooks(accelerator)
        self.state = ckpt.TrainerState(config=ckpt.resume_config(config))

    # -- resume ------------------------------------------------------------------------------

    def restore(self) -> None:
        """Continue from the last checkpoint (train.resume auto) or clear it (never)."""
        if self.cfg.train.resume == "never":
            if self.acc.is_main_process and (self.ckpt_dir / ckpt.LAST).exists():
                import shutil

                log.info("train.resume never: removing the old checkpoints in %s", self.ckpt_dir)
                shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            self.acc.wait_for_everyone()
            return
        saved = ckpt.read_state(self.ckpt_dir)
        if saved is None:
            return
        ckpt.check_resumable(saved, self.state.config, self.ckpt_dir)
        ckpt.load_checkpoint(self.acc, self.ckpt_dir)
        saved.resumed_from.append(saved.step)
        self.state = saved
        log.info("resumed from the checkpoint at step %d (epoch %d) in %s", saved.step, saved.epoch, self.ckpt_dir)

    # -- one optimizer step ------------------------------------------------------------------

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.teacher is None or self.cfg.kd.ratio == 0:
            ce, _ = self.model(**batch, ce_only=True)  # chunked when train.loss_chunk > 0
            return ce, ce, None
        logits, targets = self.model(**batch)
        ce = cross_entropy_sum(logits, targets)
        with torch.no_grad(), self.acc.autocast():
            teacher_logits, _ = self.teacher(**batch)
        kd = kd_kl_sum(logits, teacher_logits, self.cfg.kd.temperature)
        return mix_losses(ce, kd, self.cfg.kd.ratio), ce, kd

    def train_step(self, micro: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Forward/backward over the micro-batches, then one optimizer step; global sums back."""
        local_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        n_targets = self.acc.reduce(torch.tensor(float(local_targets), device=self.acc.device), reduction="sum")
        scale = self.acc.num_processes / max(float(n_targets), 1.0)  # DDP averages gradients over processes
        sums = torch.zeros(5, device=self.acc.device)  # loss, ce, kd, target tokens, input tokens
        for i, batch in enumerate(micro):
            batch = self._to_device(batch)
            with nullcontext() if i == len(micro) - 1 else self.acc.no_sync(self.model):
                loss, ce, kd = self._losses(batch)
                self.acc.backward(loss * scale)
            counts = [(batch["labels"][:, 1:] != IGNORE_INDEX).sum(), batch["attention_mask"].sum()]
            kd = kd if kd is not None else torch.zeros_like(ce)
            sums += torch.stack([t.detach().float() for t in (loss, ce, kd, *counts)])
        grad_norm = None
        if self.cfg.train.max_grad_norm:
            grad_norm = float(self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, ce, kd, targets, tokens = self.acc.reduce(sums, reduction="sum").tolist()
        return {"loss": loss, "ce": ce, "kd": kd, "targets": targets, "tokens": tokens, "grad_norm": grad_norm}

    # -- evaluation --------------------------------------------------------------------------

    def dev_loss(self) -> float:
        """Token-mean cross-entropy over the dev items (all processes, padded batches weighted 0)."""
        size, world = self.cfg.dev.batch_size, self.acc.num_processes
        batches = [(self.data.dev[i : i + size], 1.0) for i in range(0, len(self.data.dev), size)]
        batches += [(b, 0.0) for b, _ in batches[: (-len(batches)) % world]]
        sums = torch.zeros(2, device=self.acc.device)
        with evaluating(self.model):
            for items, weight in batches[self.acc.process_index :: world]:
                ce, targets = self.model(**self._to_device(self.data.collator(items)), ce_only=True)
                n = torch.tensor(float(len(targets)), device=sums.device)
                sums += weight * torch.stack([ce.float(), n])
        total, count = self.acc.reduce(sums, reduction="sum").tolist()
        return total / max(count, 1.0)

    def dev_chrf(self) -> float:
        """chrF++ (chrF for zh/ja/ko) of greedy translations of the first dev.chrf_segments segments."""
        from stcompress.languages import default_selection_metric
        from stcompress.metrics.text import corpus_score
        from stcompress.translate import Translator

        examples = self.data.dev_examples[: self.cfg.dev.chrf_segments]
        gen = GenerationConfig(max_new_tokens=self.cfg.dev.max_new_tokens, batch_size=self.cfg.dev.batch_size)
        with evaluating(self.model):
            base = self.acc.unwrap_model(self.model).base
            hyps = Translator(base, self.processor, self.cfg.prompt, gen, progress=False).translate(examples)
        total, weight = 0.0, 0
        for lang in sorted({ex.target_lang for ex in examples}):
            idx = [i for i, ex in enumerate(examples) if ex.target_lang == lang]
            score = corpus_score(default_selection_metric(lang), [hyps[i].text for i in idx],
                                 [list(examples[i].references) for i in idx], lang)
            total, weight = total + score.score * len(idx), weight + len(idx)
        return total / weight

    def evaluate(self) -> bool:
        """Dev loss (and chrF); update the best record; True when early stopping should stop."""
        s, dev = self.state, self.cfg.dev
        row: dict[str, Any] = {"kind": "dev", "step": s.step, "epoch": s.epoch, "dev_loss": self.dev_loss()}
        if dev.chrf_segments:
            row["dev_chrf"] = self.dev_chrf()
        s.history.append(row)
        value = row["dev_loss"] if dev.metric == "loss" else row["dev_chrf"]
        better = s.best is None or (value < s.best["value"] if dev.metric == "loss" else value > s.best["value"])
        log.info("step %d: dev loss %.4f%s%s", s.step, row["dev_loss"],
                 f", chrF {row['dev_chrf']:.2f}" if "dev_chrf" in row else "", " (best)" if better else "")
        if better:
            s.best = {"step": s.step, "epoch": s.epoch, "metric": dev.metric, "value": value}
            s.bad_evals = 0
            ckpt.save_best(self.acc, self.model, self.ckpt_dir, s.best)
        else:
            s.bad_evals += 1
        return bool(dev.patience) and s.bad_evals >= dev.patience

    def release(self) -> None:
        """Drop optimizer state and the teacher before saving: a full fine-tune's AdamW state is twice
        the fp32 weights, and the reload check needs room for a second copy of the model."""
        import gc

        self.acc.free_memory()
        self.optimizer = self.scheduler = self.teacher = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- the loop ----------------------------------------------------------------------------

    def _accumulate(self, out: dict[str, float]) -> None:
        s = self.state
        for sums in (s.window, s.epoch_sums):
            for k in ("loss", "ce", "kd", "targets"):
                sums[k] = sums.get(k, 0.0) + out[k]
        s.tokens += int(out["tokens"])
        s.target_tokens += int(out["targets"])

    def _log_row(self, out: dict[str, float]) -> None:
        """A history row per log_every steps: token-mean losses since the previous row."""
        s = self.state
        if s.step % self.cfg.train.log_every == 0 or s.step == self.total:
            n = max(s.window["targets"], 1.0)
            s.history.append({
                "kind": "train", "step": s.step, "epoch": s.epoch, "lr": self.scheduler.get_last_lr()[0],
                "loss": s.window["loss"] / n, "ce": s.window["ce"] / n, "kd": s.window["kd"] / n,
                "grad_norm": out["grad_norm"], "target_tokens": int(s.window["targets"]),
            })
            s.window = {}

    def _end_epoch(self) -> None:
        s = self.state
        s.last_epoch_loss = s.epoch_sums.get("ce", 0.0) / max(s.epoch_sums.get("targets", 0.0), 1.0)
        s.epoch, s.batch_in_epoch, s.epoch_sums = s.epoch + 1, 0, {}

    def _batches(self) -> tuple[DataLoader, int]:
        t, s = self.cfg.train, self.state
        batches = epoch_batches(len(self.data.train), t.batch_size, t.seed, s.epoch, self.acc.num_processes,
                                self.acc.process_index)
        todo = batches[s.batch_in_epoch :]
        # Its own generator: creating the iterator must not draw from the global RNG (dropout uses
        # it), or a resumed run would diverge from the uninterrupted one.
        loader = DataLoader(self.data.train, batch_sampler=todo, collate_fn=self.data.collator,  # type: ignore[arg-type]
                            num_workers=t.num_workers, generator=torch.Generator().manual_seed(t.seed))
        return loader, len(todo)

    def fit(self) -> ckpt.TrainerState:
        # On CPU, once the loss is small, gradients and Adam moments turn subnormal and every step
        # gets ~10x slower (measured on the demo model: 0.3 s -> 5 s a step); flush them to zero.
        on_cpu = self.acc.device.type == "cpu"
        if on_cpu:
            torch.set_flush_denormal(True)
        try:
            return self._fit()
        finally:
            if on_cpu:
                torch.set_flush_denormal(False)

    def _fit(self) -> ckpt.TrainerState:
        s, t, dev = self.state, self.cfg.train, self.cfg.dev
        bar = progress_bar(self.total, "finetune", "steps", progress=self.progress, initial=s.step)
        self.model.train()
        while not s.finished:
            loader, remaining = self._batches()
            batches = iter(loader)
            while remaining > 0 and not s.finished:
                micro = [next(batches) for _ in range(min(t.grad_accum, remaining))]
                start = time.perf_counter()
                out = self.train_step(micro)
                s.train_seconds += time.perf_counter() - start
                remaining -= len(micro)
                s.step, s.batch_in_epoch = s.step + 1, s.batch_in_epoch + len(micro)
                self._accumulate(out)
                epoch_end = remaining == 0
                if epoch_end:
                    self._end_epoch()
                self._log_row(out)
                s.finished = s.step >= self.total or s.epoch >= t.epochs
                evaluate_now = (dev.every and s.step % dev.every == 0) or (not dev.every and epoch_end) or s.finished
                if self.data.dev and evaluate_now and self.evaluate():
                    s.stopped_early = s.finished = True
                    log.info("early stop at step %d: no dev improvement in %d evaluations", s.step, dev.patience)
                if s.finished or epoch_end or (t.save_every and s.step % t.save_every == 0):
                    ckpt.save_checkpoint(self.acc, self.ckpt_dir, s)
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss'] / max(out['targets'], 1.0):.3f}")
                if self.on_step is not None:
                    self.on_step(s)
        bar.close()
        if s.best is not None and s.best["step"] != s.step and not fsdp.sharded(self.acc):  # FSDP: consolidate loads it
            ckpt.load_best(self.acc.unwrap_model(self.model), self.ckpt_dir)
            log.info("loaded the best weights (step %d, dev %s %.4f)", s.best["step"], s.best["metric"], s.best["value"])
        return s
