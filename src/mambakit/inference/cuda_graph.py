"""The decode step captured in a CUDA graph (``generate(..., cg=True)``).

At batch 1 a decode step is ~10 small kernels per layer, each a few microseconds of GPU work, so launching
them from Python costs more than running them. A CUDA graph records the whole step once and replays it with
a single launch: the step then costs only its GPU time.

A graph reads and writes fixed addresses, so each captured decoder owns static buffers: the input tokens
(batch, 1), the output logits (batch, padded_vocab) and an ``InferenceParams`` whose state tensors the graph
updates in place. Generation prefills *into those state tensors* and then replays the graph. Graphs are
cached on the model per batch size and rebuilt when the model's dtype, device or parameter storage changes.

Hybrid models (attention layers) also keep a KV cache of ``max_seqlen`` tokens, written at per-row positions
read from ``inference_params.lengths_per_sample`` (a device tensor the caller advances between replays); a
graph is captured again when a generation needs more than its max_seqlen (rounded up to 256 tokens).
"""

from __future__ import annotations

import torch

from ..cache import InferenceParams

__all__ = ["CUDAGraphDecoder", "get_graph_decoder", "clear_graph_cache"]

_CACHE_ATTR = "_mambakit_cuda_graphs"


class CUDAGraphDecoder:
    """``model.decode_step`` for one batch size, captured in a CUDA graph.

    Attributes:
        inference_params: the static cache the graph updates (conv and SSM states of every layer).
        input_ids: (batch, 1) int64 static input; logits: (batch, padded_vocab) static output.
        max_seqlen: tokens the KV caches of attention layers hold (irrelevant for pure Mamba models).
    Calling ``decoder(input_ids)`` copies the tokens in, replays, and returns ``logits`` (overwritten by the
    next call: copy it to keep it).
    """

    def __init__(self, model, batch_size: int, max_seqlen: int = 1, n_warmups: int = 2):
        param = next(model.parameters())
        if param.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, got {param.device}")
        self.batch_size, self.max_seqlen = batch_size, max_seqlen
        self.device = param.device
        self.inference_params = InferenceParams(max_seqlen=max_seqlen, max_batch_size=batch_size)
        self.inference_params.key_value_memory_dict = model.allocate_inference_cache(batch_size, max_seqlen)
        if model.config.attn_layer_idx:  # attention reads its positions from the device, never a baked int
            self.inference_params.lengths_per_sample = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        # decode_step continues from the cache only when seqlen_offset > 0.
        self.inference_params.seqlen_offset = 1
        # Warm up on a side stream (Triton compiles and autotunes, cuBLAS picks its kernels) so that the
        # capture records only kernel launches; this scribbles on the states, which prefill overwrites.
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(n_warmups):
                model.decode_step(self.input_ids, self.inference_params)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # a private memory pool: graphs never write into each other's outputs
            self.logits = model.decode_step(self.input_ids, self.inference_params)  # (batch, padded_vocab)
        self.inference_params.seqlen_offset = 0

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (batch, 1) -> logits (batch, padded_vocab), a static buffer."""
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        return self.logits


def _model_key(model) -> tuple:
    """What a captured graph depends on: dtype, device and the storage of every parameter."""
    params = list(model.parameters())
    return (params[0].dtype, params[0].device, tuple(p.data_ptr() for p in params))


def get_graph_decoder(model, batch_size: int, max_seqlen: int = 1) -> CUDAGraphDecoder:
    """The model's captured decoder for ``batch_size`` holding at least ``max_seqlen`` tokens (KV caches of
    attention layers), capturing it on first use.

    The graphs are dropped together when the model changes (``model.to(...)``, new parameters).
    """
    key = _model_key(model)
    cache = getattr(model, _CACHE_ATTR, None)
    if cache is None or cache["key"] != key:
        cache = {"key": key, "graphs": {}}
        # Stored outside nn.Module's registries: a plain attribute, not a submodule or buffer.
        object.__setattr__(model, _CACHE_ATTR, cache)
    decoder = cache["graphs"].get(batch_size)
    if decoder is None or decoder.max_seqlen < max_seqlen:
        del decoder
        cache["graphs"].pop(batch_size, None)  # free the old buffers before allocating larger ones
        rounded = max_seqlen if max_seqlen <= 1 else -(-max_seqlen // 256) * 256  # fewer recaptures
        decoder = CUDAGraphDecoder(model, batch_size, max_seqlen=rounded)
        cache["graphs"][batch_size] = decoder
    return decoder


def clear_graph_cache(model) -> None:
    """Free the model's captured graphs and their buffers."""
    if hasattr(model, _CACHE_ATTR):
        object.__delattr__(model, _CACHE_ATTR)
