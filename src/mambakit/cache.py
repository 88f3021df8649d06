"""Per-layer inference state: mixers write it during prefill and update it in place at each decoding step.

``InferenceParams`` keeps the official field names (``mamba_ssm.utils.generation.InferenceParams``) so code
written for mamba-ssm that reads ``key_value_memory_dict[layer_idx]`` keeps working: for a Mamba layer the
entry is ``(conv_state, ssm_state)``:

- Mamba-1: conv_state (batch, d_inner, d_conv), ssm_state (batch, d_inner, d_state)
- Mamba-2: conv_state (batch, conv_dim, d_conv), ssm_state (batch, nheads, headdim, d_state)

conv_state holds the last d_conv inputs of the causal convolution (oldest first); ssm_state is h_t.
``seqlen_offset`` counts the tokens already folded into the state: when it is > 0 a forward pass continues
from the stored state (one token: the decode step; several: a chunk of a chunked prefill).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class InferenceParams:
    """Inference state of a whole model (official name and fields)."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[torch.Tensor] = None

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        """Start over (states are zeroed lazily: the next forward with seqlen_offset 0 overwrites them)."""
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()

    def clone(self) -> "InferenceParams":
        """A deep copy: continue two conversations from one prefix without reprocessing it."""
        return InferenceParams(
            max_seqlen=self.max_seqlen,
            max_batch_size=self.max_batch_size,
            seqlen_offset=self.seqlen_offset,
            batch_size_offset=self.batch_size_offset,
            key_value_memory_dict={k: _clone(v) for k, v in self.key_value_memory_dict.items()},
            lengths_per_sample=None if self.lengths_per_sample is None else self.lengths_per_sample.clone(),
        )

    def select(self, index: torch.Tensor | list[int]) -> "InferenceParams":
        """Keep only the batch rows in ``index`` (e.g. drop finished sequences)."""
        index = torch.as_tensor(index, dtype=torch.long)
        out = self.clone()
        out.key_value_memory_dict = {k: _index(v, index) for k, v in self.key_value_memory_dict.items()}
        out.max_batch_size = int(index.numel())
        if out.lengths_per_sample is not None:
            out.lengths_per_sample = out.lengths_per_sample[index.to(out.lengths_per_sample.device)]
        return out

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Flat tensors, safe to store with safetensors (see save/load)."""
        flat: dict = {"seqlen_offset": self.seqlen_offset, "max_seqlen": self.max_seqlen,
                      "max_batch_size": self.max_batch_size, "batch_size_offset": self.batch_size_offset}
        if self.lengths_per_sample is not None:  # attention layers' per-row positions (ragged batches)
            flat["lengths_per_sample"] = self.lengths_per_sample
        for layer, states in self.key_value_memory_dict.items():
            for i, t in enumerate(states):
                flat[f"layer.{layer}.{i}"] = t
        return flat

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to a .safetensors file (no pickle): a chat can resume from it later."""
        from safetensors.torch import save_file

        flat = self.state_dict()
        tensors = {k: v.contiguous() for k, v in flat.items() if isinstance(v, torch.Tensor)}
        meta = {k: str(v) for k, v in flat.items() if not isinstance(v, torch.Tensor)}
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "InferenceParams":
        from safetensors import safe_open

        states: dict[int, dict[int, torch.Tensor]] = {}
        lengths = None
        with safe_open(os.fspath(path), framework="pt", device=str(device or "cpu")) as f:
            meta = f.metadata() or {}
            missing = {"seqlen_offset", "max_seqlen", "max_batch_size"} - set(meta)
            if missing:
                raise ValueError(f"{path} is not a mambakit inference state file (metadata lacks {sorted(missing)})")
            for key in f.keys():
                if key == "lengths_per_sample":
                    lengths = f.get_tensor(key)
                    continue
                _, layer, i = key.split(".")
                states.setdefault(int(layer), {})[int(i)] = f.get_tensor(key)
        return cls(
            max_seqlen=int(meta["max_seqlen"]),
            max_batch_size=int(meta["max_batch_size"]),
            seqlen_offset=int(meta["seqlen_offset"]),
            batch_size_offset=int(meta.get("batch_size_offset", 0)),  # absent in files written before it was kept
            key_value_memory_dict={k: tuple(v[i] for i in sorted(v)) for k, v in states.items()},
            lengths_per_sample=lengths,
        )


def _clone(states):
    return tuple(t.clone() for t in states) if isinstance(states, tuple) else states.clone()


def _index(states, index):
    if isinstance(states, tuple):
        return tuple(t[index.to(t.device)].clone() for t in states)
    return states[index.to(states.device)].clone()
