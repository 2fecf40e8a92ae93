"""Greedy decode steps of the Qwen2 decoder over a preallocated KV cache, CUDA-graphed on GPU.

transformers' decode step costs about 1 ms of Python per layer (38 ms a token for the 7B at
batch 1 on an H200, where reading the weights takes 3.3 ms) and its DynamicCache copies the whole
cache on every step. Here one step is the same arithmetic as Qwen2's layers (RMSNorm, biased
q/k/v, rotary, SDPA, SwiGLU) written against a static cache, so on CUDA the whole step is captured
once as a graph and replayed. Prefill stays with transformers. Equality with transformers'
decoding is a test (tests/test_engine.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from stcompress.model import arch


def supported(model: nn.Module) -> bool:
    """True only for what `_step` computes exactly: Qwen2's decoder layers, full (causal) attention
    in every layer, default rotary, plain nn.Linear projections (no 4-bit, no LoRA wrappers).

    Anything else (Gemma 3's sliding-window layers, q/k norms and sandwich norms, a Qwen2 with
    `use_sliding_window`, scaled rotary) decodes with transformers' own step instead.
    """
    config = arch.text_config(model)
    rotary = getattr(arch.text_model(model), "rotary_emb", None)
    if getattr(config, "model_type", None) != "qwen2" or getattr(config, "use_sliding_window", False):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    if getattr(rotary, "rope_type", None) != "default":
        return False
    for layer in arch.decoder_layers(model):
        if type(layer).__name__ != "Qwen2DecoderLayer" or getattr(layer.self_attn, "sliding_window", None):
            return False
        mods = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
        if any(type(m) is not nn.Linear for m in mods):
            return False
    return type(arch.lm_head(model)) is nn.Linear


def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def layer_kv(cache: object, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of layer `index` in a transformers cache (5.x and 4.5x), or in a list of pairs."""
    if isinstance(cache, (list, tuple)):
        return cache[index]
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[index].keys, layers[index].values
    return cache.key_cache[index], cache.value_cache[index]  # transformers < 4.56


_WARMED: set[tuple] = set()  # step shapes already run once in this process (see `_capture`)


class StaticGreedy:
    """Continue greedy decoding from a transformers prefill (its cache, mask and first token).

    `layers`: the decoder layers to run (default: the model's); `past` then holds their KV in order.
    """

    def __init__(self, model: nn.Module, past: object, mask: torch.Tensor, positions: torch.Tensor, max_new: int,
                 eos: set[int], pad: int, *, cuda_graph: bool | None = None, layers: list[nn.Module] | None = None):
        self.model = model
        self.decoder = arch.text_model(model)
        self.layers = list(arch.decoder_layers(model)) if layers is None else list(layers)
        self.head = arch.lm_head(model)
        attn = self.layers[0].self_attn
        config = arch.text_config(model)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(attn, "head_dim", config.hidden_size // self.heads)
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        batch, prompt = mask.shape
        device = mask.device
        self.max_new = max_new
        length = prompt + max_new
        self.keys, self.values = [], []
        for i in range(len(self.layers)):
            k, v = layer_kv(past, i)
            big_k = k.new_zeros(batch, self.kv_heads, length, self.head_dim)
            big_v = v.new_zeros(batch, self.kv_heads, length, self.head_dim)
            big_k[:, :, :prompt] = k
            big_v[:, :, :prompt] = v
            self.keys.append(big_k)
            self.values.append(big_v)
        self.mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.mask[:, :prompt] = mask.bool()
        self.slot = torch.tensor([prompt], device=device)
        self.position = positions[:, -1:].clone() + 1
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = torch.tensor(sorted(eos), device=device)
        self.pad = pad
        self.out = torch.full((batch, max_new), pad, dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.use_graph = device.type == "cuda" and (cuda_graph is None or cuda_graph)
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.no_grad()
    def _step(self) -> None:
        """Feed self.token at self.slot; write the next token into self.token and self.out."""
        batch = self.token.shape[0]
        x = self.decoder.embed_tokens(self.token)[:, None, :]  # (B, 1, H)
        cos, sin = self.decoder.rotary_emb(x, self.position)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, D)
        self.mask.index_fill_(1, self.slot, True)
        bias = torch.zeros(self.mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~self.mask, float("-inf"))
        bias = bias[:, None, None, :]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = _rms(x, layer.input_layernorm)
            q = attn.q_proj(h).view(batch, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(batch, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            self.keys[i].index_copy_(2, self.slot, k)
            self.values[i].index_copy_(2, self.slot, v)
            a = F.scaled_dot_product_attention(
                q, self.keys[i], self.values[i], attn_mask=bias, scale=self.scaling,
                enable_gqa=self.kv_heads != self.heads,
            )
            x = x + attn.o_proj(a.transpose(1, 2).reshape(batch, 1, self.heads * self.head_dim))
            h = _rms(x, layer.post_attention_layernorm)
            x = x + layer.mlp.down_proj(layer.mlp.act_fn(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
        logits = self.head(_rms(x, self.decoder.norm)[:, 0])
        token = logits.argmax(-1).masked_fill(self.done, self.pad)
        self.done |= torch.isin(token, self.eos)
        self.token.copy_(token)
        self.out.index_copy_(1, self.step_index, token[:, None])
        self.slot += 1
        self.position += 1
        self.step_index += 1

    def _capture(self) -> None:
        """Record one step as a CUDA graph (a warm-up step on a side stream first, then undo it).

        The warm-up (lazy initialisation before capture) runs once per process and step shape:
        the importance search captures one graph per evaluated variant, all of the same shape.
        """
        saved = [t.clone() for t in (self.token, self.done, self.slot, self.position, self.step_index, self.mask)]
        shape = (self.mask.device, tuple(self.keys[0].shape), len(self.layers), self.keys[0].dtype)
        if shape not in _WARMED:
            stream = torch.cuda.Stream(device=self.mask.device)  # the model's GPU, not the current one
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step()
            torch.cuda.current_stream().wait_stream(stream)
            for t, s in zip((self.token, self.done, self.slot, self.position, self.step_index, self.mask), saved):
                t.copy_(s)
            _WARMED.add(shape)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        for t, s in zip((self.token, self.done, self.slot, self.position, self.step_index, self.mask), saved):
            t.copy_(s)  # capture does not run the step, but be exact about the starting state

    @torch.no_grad()
    def run(self, first: torch.Tensor) -> torch.Tensor:
        """Tokens (B, <=max_new) starting with `first`, padded with `pad` after end-of-turn."""
        first = first.masked_fill(self.done, self.pad)
        self.done |= torch.isin(first, self.eos)
        self.token.copy_(first)
        self.out[:, 0] = first
        self.step_index.fill_(1)
        steps = 1
        with torch.cuda.device(self.mask.device) if self.use_graph else contextlib.nullcontext():
            return self._decode(steps)

    def _decode(self, steps: int) -> torch.Tensor:
        if self.use_graph and self.max_new > 1:
            self._capture()
        while steps < self.max_new and not bool(self.done.all()):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            steps += 1
        return self.out[:, :steps].clone()
