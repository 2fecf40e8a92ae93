"""Fine-tuning internals used by `stcompress finetune`.

collate.py (token ids, masked labels, padded batches with audio features), forward.py (the training
forward pass), losses.py (CE, word-level KD and their mix), lora.py (what trains), checkpoint.py
(resumable checkpoints), loop.py (the accelerate training loop).
"""
