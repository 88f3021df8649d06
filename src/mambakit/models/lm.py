"""MixerModel and MambaLMHeadModel: embedding -> blocks -> norm_f -> tied lm_head, as in the official
`mamba_ssm.models.mixer_seq_simple` (same parameter names: ``backbone.embedding``, ``backbone.layers.{i}``,
``backbone.norm_f``, ``lm_head``), so official state dicts load as they are.

Loading/saving (``mambakit.hub``) and generation (``mambakit.inference``) sit above this module; the model's
convenience methods import them when called, so the import graph stays one-way.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..cache import InferenceParams
from ..config import MambaConfig
from ..modules.block import Block, GatedMLP, add_norm
from ..modules.mamba1 import Mamba
from ..modules.mamba2 import Mamba2
from ..ops import RMSNorm


class CausalLMOutput(NamedTuple):
    """``logits`` (batch, seqlen, padded_vocab); ``loss`` (scalar) when labels were given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


def _init_weights(module: nn.Module, n_layer: int, initializer_range: float = 0.02,
                  rescale_prenorm_residual: bool = True, n_residuals_per_layer: int = 1) -> None:
    """GPT-2 style init used by the official models: zero biases, N(0, 0.02) embeddings, and the output
    projections of each residual branch scaled by 1/sqrt(number of residual additions)."""
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        for name, p in module.named_parameters(recurse=False):
            if name == "weight" and isinstance(module, nn.Linear) and getattr(module, "_is_residual_out", False):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)


def create_block(config: MambaConfig, layer_idx: int, device=None, dtype=None) -> Block:
    factory = {"device": device, "dtype": dtype}
    if layer_idx in config.attn_layer_idx:
        from ..modules.attention import MHA  # hybrid models only

        mixer_cls = partial(MHA, layer_idx=layer_idx, **{"causal": True, **config.attn_cfg}, **factory)
    else:
        mixer = Mamba2 if config.layer == "Mamba2" else Mamba
        mixer_cls = partial(mixer, layer_idx=layer_idx, **config.mixer_kwargs(), **factory)
    norm_cls = partial(RMSNorm if config.rms_norm else nn.LayerNorm, eps=1e-5, **factory)
    if config.d_intermediate > 0:
        mlp_cls = partial(GatedMLP, hidden_features=config.d_intermediate, out_features=config.d_model, **factory)
    else:
        mlp_cls = nn.Identity
    block = Block(config.d_model, mixer_cls, mlp_cls, norm_cls=norm_cls, fused_add_norm=config.fused_add_norm,
                  residual_in_fp32=config.residual_in_fp32)
    block.layer_idx = layer_idx
    # Mark the residual-branch output projections for the rescaled init (official: out_proj, fc2).
    for name in ("out_proj", "fc2"):
        for sub in (block.mixer, block.mlp):
            layer = getattr(sub, name, None) if sub is not None else None
            if isinstance(layer, nn.Linear):
                layer._is_residual_out = True
    return block


class MixerModel(nn.Module):
    """Embedding, ``n_layer`` blocks and the final norm. forward: input_ids (b, l) -> hidden (b, l, d_model)."""

    def __init__(self, config: MambaConfig, initializer_cfg: dict | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.config = config
        self.residual_in_fp32 = config.residual_in_fp32
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, **factory)
        self.layers = nn.ModuleList(create_block(config, i, **factory) for i in range(config.n_layer))
        self.norm_f = (RMSNorm if config.rms_norm else nn.LayerNorm)(config.d_model, eps=1e-5, **factory)
        self.gradient_checkpointing = False
        n_res = 1 if config.d_intermediate == 0 else 2
        self.apply(partial(_init_weights, n_layer=config.n_layer, **(initializer_cfg or {}),
                           n_residuals_per_layer=n_res))

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs) -> dict:
        return {i: layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
                for i, layer in enumerate(self.layers)}

    def forward(self, input_ids: torch.Tensor, inference_params: InferenceParams | None = None,
                **mixer_kwargs) -> torch.Tensor:
        hidden_states = self.embedding(input_ids)  # (b, l, d_model)
        residual = None
        use_ckpt = self.gradient_checkpointing and self.training and inference_params is None
        for layer in self.layers:
            if use_ckpt and torch.is_grad_enabled():
                hidden_states, residual = checkpoint(layer, hidden_states, residual, use_reentrant=False,
                                                     **mixer_kwargs)
            else:
                hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params,
                                                **mixer_kwargs)
        hidden_states, _ = add_norm(hidden_states, residual, self.norm_f, self.residual_in_fp32)
        return hidden_states


class MambaLMHeadModel(nn.Module):
    """A Mamba language model: ``forward(input_ids) -> CausalLMOutput(logits, loss)``."""

    def __init__(self, config: MambaConfig, initializer_cfg: dict | None = None, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, MambaConfig):
            raise TypeError(f"MambaLMHeadModel takes a MambaConfig, got {type(config).__name__}; "
                            "use MambaConfig(**d) or MambaConfig.from_json_file(path)")
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.backbone = MixerModel(config, initializer_cfg=initializer_cfg, **factory)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, **factory)
        # The official model applies the init a second time at this level (one residual per layer counted).
        self.apply(partial(_init_weights, n_layer=config.n_layer, **(initializer_cfg or {})))
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs) -> dict:
        return self.backbone.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def forward(self, input_ids: torch.Tensor, position_ids=None, inference_params: InferenceParams | None = None,
                num_last_tokens: int = 0, labels: torch.Tensor | None = None, **mixer_kwargs) -> CausalLMOutput:
        """input_ids: (batch, seqlen) int -> logits (batch, seqlen or num_last_tokens, padded_vocab).

        labels (batch, seqlen): the loss is the mean cross-entropy of logits[:, :-1] against labels[:, 1:]
        (positions labelled -100 are ignored). position_ids is accepted for compatibility and unused.
        """
        self._check_ids(input_ids)
        hidden_states = self.backbone(input_ids, inference_params=inference_params, **mixer_kwargs)
        if num_last_tokens > 0:
            hidden_states = hidden_states[:, -num_last_tokens:]
        logits = self.lm_head(hidden_states)  # (b, l, padded_vocab)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels has shape {tuple(labels.shape)}, expected input_ids' {tuple(input_ids.shape)}")
            if num_last_tokens > 0:
                raise ValueError("labels cannot be combined with num_last_tokens > 0")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    def decode_step(self, input_ids: torch.Tensor, inference_params: InferenceParams) -> torch.Tensor:
        """One decoding step without input checks or host syncs (so it can be captured in a CUDA graph).

        input_ids: (batch, 1) -> logits (batch, padded_vocab); the cache must already hold a prefix
        (inference_params.seqlen_offset > 0). The caller advances seqlen_offset.
        """
        hidden_states = self.backbone(input_ids, inference_params=inference_params)  # (b, 1, d_model)
        return self.lm_head(hidden_states[:, -1])

    def _check_ids(self, input_ids) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, seqlen) integer tensor, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); give at least one token")
        if input_ids.is_cuda and self.training and torch.is_grad_enabled():
            # Reading the range back is a host sync that would stall every GPU training step; an id out of
            # range still fails loudly there (the embedding's device-side index check).
            return
        hi, lo = int(input_ids.max()), int(input_ids.min())
        if hi >= self.config.padded_vocab_size or lo < 0:
            bad = hi if hi >= self.config.padded_vocab_size else lo
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.padded_vocab_size})")

    # ---- training conveniences -----------------------------------------------------------------------
    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.backbone.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.backbone.gradient_checkpointing = False

    # ---- methods that live in higher layers ----------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name: str, device=None, dtype=None, **kwargs) -> "MambaLMHeadModel":
        """Load a state-spaces or transformers checkpoint (directory or Hub id); see ``mambakit.hub``."""
        from ..hub import load_pretrained

        return load_pretrained(cls, pretrained_model_name, device=device, dtype=dtype, **kwargs)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write config.json + model.safetensors (state-spaces layout); see ``mambakit.hub``."""
        from ..hub import save_pretrained

        save_pretrained(self, save_directory, **kwargs)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_length: int | None = None, **kwargs):
        """Decode from a prompt with the official options; see ``mambakit.inference.generate``."""
        from ..inference.generate import generate

        return generate(self, input_ids, max_length=max_length, **kwargs)
