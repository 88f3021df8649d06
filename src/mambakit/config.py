"""MambaConfig: the official `mamba_ssm` configuration, field for field, so any official config.json loads as is.

Derived sizes are properties (``padded_vocab_size``, ``layer``, ``d_inner``...). Unknown keys and impossible
combinations raise ``ValueError`` with the fix in the message, at construction time rather than deep in a layer.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

MIXERS = ("Mamba1", "Mamba2")

# Constructor arguments of each mixer that a config's ssm_cfg may set (layer_idx/device/dtype are set by the model).
_MAMBA1_KEYS = {
    "d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor",
    "conv_bias", "bias", "use_fast_path",
}
_MAMBA2_KEYS = {
    "d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range", "D_has_hdim",
    "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit", "bias", "conv_bias",
    "chunk_size", "use_mem_eff_path", "process_group", "sequence_parallel", "recompute_mixer",  # the last: mambakit
}
_ATTN_KEYS = {
    "num_heads", "num_heads_kv", "head_dim", "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved",
    "causal", "qkv_proj_bias", "out_proj_bias", "d_conv", "mlp_dim", "softmax_scale",
}


@dataclass
class MambaConfig:
    """Configuration of a Mamba language model (official `mamba_ssm.models.config_mamba.MambaConfig`)."""

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        self.ssm_cfg = dict(self.ssm_cfg or {})
        self.attn_cfg = dict(self.attn_cfg or {})
        self.attn_layer_idx = list(self.attn_layer_idx or [])
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def layer(self) -> str:
        """Which mixer the SSM layers use: 'Mamba1' (the default) or 'Mamba2'."""
        return self.ssm_cfg.get("layer", "Mamba1")

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to pad_vocab_size_multiple (the embedding's and lm_head's row count)."""
        m = self.pad_vocab_size_multiple
        return self.vocab_size if self.vocab_size % m == 0 else self.vocab_size + m - self.vocab_size % m

    @property
    def d_inner(self) -> int:
        return int(self.ssm_cfg.get("expand", 2) * self.d_model)

    # ---- validation --------------------------------------------------------------------------------
    def validate(self) -> None:
        def positive_int(name: str, v: Any, allow_zero: bool = False) -> None:
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                kind = "a non-negative" if allow_zero else "a positive"
                raise ValueError(f"MambaConfig.{name} must be {kind} integer, got {v!r}")

        positive_int("d_model", self.d_model)
        positive_int("n_layer", self.n_layer)
        positive_int("vocab_size", self.vocab_size)
        positive_int("pad_vocab_size_multiple", self.pad_vocab_size_multiple)
        positive_int("d_intermediate", self.d_intermediate, allow_zero=True)
        layer = self.layer
        if layer not in MIXERS:
            raise ValueError(f"ssm_cfg['layer'] = {layer!r} is not a known mixer; use one of {MIXERS}")
        allowed = _MAMBA1_KEYS if layer == "Mamba1" else _MAMBA2_KEYS
        unknown = sorted(set(self.ssm_cfg) - allowed - {"layer"})
        if unknown:
            raise ValueError(f"ssm_cfg has keys {unknown} that {layer} does not take; valid keys: {sorted(allowed)}")
        expand = self.ssm_cfg.get("expand", 2)
        if expand * self.d_model != int(expand * self.d_model):
            raise ValueError(f"ssm_cfg expand={expand} x d_model={self.d_model} is not a whole number of channels")
        if layer == "Mamba2":
            self._validate_mamba2()
        bad_idx = [i for i in self.attn_layer_idx if not isinstance(i, int) or not 0 <= i < self.n_layer]
        if bad_idx:
            raise ValueError(f"attn_layer_idx {bad_idx} outside the layers 0..{self.n_layer - 1}")
        unknown = sorted(set(self.attn_cfg) - _ATTN_KEYS)
        if unknown:
            raise ValueError(f"attn_cfg has keys {unknown} that the attention layer does not take; "
                             f"valid keys: {sorted(_ATTN_KEYS)}")
        if self.attn_layer_idx and "num_heads" not in self.attn_cfg:
            raise ValueError("attn_layer_idx is set but attn_cfg has no 'num_heads'")

    def _validate_mamba2(self) -> None:
        cfg = self.ssm_cfg
        d_inner = self.d_inner
        d_ssm = cfg.get("d_ssm") or d_inner
        headdim = cfg.get("headdim", 64)
        ngroups = cfg.get("ngroups", 1)
        if d_ssm > d_inner:
            raise ValueError(f"ssm_cfg d_ssm={d_ssm} exceeds d_inner = expand x d_model = {d_inner}")
        if d_ssm % headdim:
            raise ValueError(
                f"Mamba2 d_ssm={d_ssm} (expand x d_model unless d_ssm is set) is not divisible by headdim={headdim}; "
                f"choose headdim dividing {d_ssm} (e.g. {math.gcd(d_ssm, 64)}) or change d_model/expand")
        nheads = d_ssm // headdim
        if ngroups < 1 or nheads % ngroups:
            raise ValueError(f"Mamba2 ngroups={ngroups} must divide the number of heads {nheads} (= d_ssm / headdim)")

    # ---- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MambaConfig":
        """Build from an official config.json's dict; unknown keys are an error that lists the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            hint = ""
            if "model_type" in data or "hidden_size" in data:
                hint = " (this looks like a transformers config: use MambaLMHeadModel.from_pretrained, which converts it)"
            raise ValueError(f"config has unknown keys {unknown}{hint}; MambaConfig fields are {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "MambaConfig":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def mixer_kwargs(self) -> dict:
        """ssm_cfg without 'layer': the keyword arguments for the Mamba/Mamba2 constructor."""
        return {k: v for k, v in self.ssm_cfg.items() if k != "layer"}


# Training scripts (the usage guide's among them) store the config object inside torch.save checkpoints;
# PyTorch >= 2.6 loads with weights_only=True, which accepts only allow-listed classes. MambaConfig is plain data.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([MambaConfig])


def constructor_keys(cls: type) -> set[str]:
    """Names of a class's constructor keyword arguments (used to check ssm_cfg against the mixers)."""
    return set(inspect.signature(cls.__init__).parameters) - {"self"}
