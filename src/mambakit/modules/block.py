"""Block (residual add -> norm -> mixer [-> add -> norm -> MLP]) and the gated MLP, as in the official
`mamba_ssm.modules.block.Block` and `mamba_ssm.modules.mlp.GatedMLP`.

The block takes and returns (hidden_states, residual): the residual stream is kept apart so that the add and
the norm fuse into one kernel (``rms_norm_fn(..., prenorm=True)``), optionally in fp32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import RMSNorm, rms_norm_fn
from ..ops.decode import fused_decode_applies


class GatedMLP(nn.Module):
    """fc1 -> (y, gate) -> y * act(gate) -> fc2. hidden_features rounds up to a multiple of ``multiple_of``."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 activation=F.silu, bias: bool = False, multiple_of: int = 128, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        out_features = in_features if out_features is None else out_features
        hidden_features = int(8 * in_features / 3) if hidden_features is None else hidden_features
        hidden_features = (hidden_features + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(in_features, 2 * hidden_features, bias=bias, **factory)
        self.activation = activation
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)  # each (..., hidden_features)
        return self.fc2(y * self.activation(gate))


def add_norm(hidden_states: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module,
             residual_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += hidden_states; return (norm(residual) in the norm's dtype, residual)."""
    if isinstance(norm, RMSNorm):
        return rms_norm_fn(hidden_states, norm.weight, None, residual=residual, prenorm=True,
                           residual_in_fp32=residual_in_fp32, eps=norm.eps)
    residual = hidden_states if residual is None else hidden_states + residual
    out = norm(residual.to(dtype=norm.weight.dtype))
    return out, residual.float() if residual_in_fp32 else residual


class Block(nn.Module):
    """Pre-norm residual block around a mixer (Mamba, Mamba2 or attention) and an optional MLP.

    ``fused_add_norm`` is kept for compatibility: mambakit always fuses the add and the norm where its
    norm op can (RMSNorm), and the result is the same either way.
    """

    def __init__(self, dim: int, mixer_cls, mlp_cls=nn.Identity, norm_cls=nn.LayerNorm,
                 fused_add_norm: bool = False, residual_in_fp32: bool = False):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.norm = norm_cls(dim)
        self.mixer = mixer_cls(dim)
        if mlp_cls is not nn.Identity:
            self.norm2 = norm_cls(dim)
            self.mlp = mlp_cls(dim)
        else:
            self.mlp = None

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None,
                inference_params=None, **mixer_kwargs):
        """hidden_states, residual: (batch, seqlen, dim) -> (mixer output, updated residual)."""
        fused = self._fused_decode(hidden_states, residual, inference_params, mixer_kwargs)
        if fused is not None:
            hidden_states, residual = fused
        else:
            hidden_states, residual = add_norm(hidden_states, residual, self.norm, self.residual_in_fp32)
            hidden_states = self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
        if self.mlp is not None:
            hidden_states, residual = add_norm(hidden_states, residual, self.norm2, self.residual_in_fp32)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual

    def _fused_decode(self, hidden_states, residual, inference_params, mixer_kwargs):
        """(mixer output, residual) from the mixer's fused decode step (add + norm + mixer in 3-4 kernels) when
        it applies: one token after a cached prefix, an RMSNorm, a small batch on the GPU (``ops.decode``);
        else None."""
        # cheapest tests first: on a CPU this runs every layer and token and must cost next to nothing
        if (inference_params is None or inference_params.seqlen_offset == 0 or mixer_kwargs
                or hidden_states.dim() != 3 or hidden_states.shape[1] != 1 or not fused_decode_applies(hidden_states)):
            return None
        step = getattr(self.mixer, "fused_step", None)
        if step is None or type(self.norm) is not RMSNorm:
            return None  # the mixer's step checks the rest (its layer size and module types)
        return step(hidden_states, residual, self.norm, self.residual_in_fp32, inference_params)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
