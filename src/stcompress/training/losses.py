"""Training losses over target tokens: cross-entropy, word-level KD, and their mix.

Every loss here returns a SUM over tokens. The training loop divides by the number of target
tokens in the whole optimizer step (all micro-batches, all processes), so gradient accumulation
and multi-GPU give the same update as one big batch, whatever the padding or target lengths.

Word-level KD follows Hinton et al. (2015, "Distilling the Knowledge in a Neural Network"):
KL(teacher || student) between temperature-softened distributions, scaled by T^2 so its gradients
keep their size as T changes; mixed with cross-entropy as torchtune's KD recipe does,
loss = (1 - ratio) * CE + ratio * KD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy; logits (N, vocab), targets (N,). Computed in fp32."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """cross_entropy_sum(head(hidden), targets) without holding all N x vocab logits at once.

    Each chunk of `chunk` positions runs the LM head and an fp32 CE under torch.utils.checkpoint, so
    only the hidden states are kept for backward and the chunk's logits are recomputed there: peak
    logit memory is chunk x vocab instead of N x vocab (bf16 logits, their fp32 copy and its gradient).
    """
    from torch.utils.checkpoint import checkpoint

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(piece, hidden[start : start + chunk], targets[start : start + chunk], use_reentrant=False)
    return total


def kd_kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Summed T^2 * KL(softmax(teacher / T) || softmax(student / T)) over N token positions.

    Zero when the student's logits equal the teacher's. With a one-hot teacher (logits scaled up
    towards infinity) it tends to the cross-entropy against that one-hot label at T = 1. Unlike
    torchtune's ForwardKLLoss this keeps the teacher-entropy term, so the value is a true KL (a
    constant offset for the student's gradients, but an interpretable number in the logs).
    """
    t = float(temperature)
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    probs = teacher.exp()
    # 0 * log 0 = 0: tokens the teacher rules out contribute nothing (and no NaN from -inf).
    per_token = torch.where(probs > 0, probs * (teacher - student), torch.zeros_like(probs)).sum(-1)
    return per_token.sum() * (t * t)


def mix_losses(ce: torch.Tensor, kd: torch.Tensor | None, ratio: float) -> torch.Tensor:
    """(1 - ratio) * ce + ratio * kd; plain ce when KD is off (kd None or ratio 0)."""
    if kd is None or ratio == 0:
        return ce
    return (1.0 - ratio) * ce + ratio * kd
