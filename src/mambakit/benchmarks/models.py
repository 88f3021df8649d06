"""Model shapes of the benchmarks and their transformers counterparts.

- Mamba sizes are the official checkpoints' shapes (state-spaces/mamba-130m ... mamba-2.8b; Mamba-2 uses the
  same d_model/n_layer with its defaults d_state 128, headdim 64, ngroups 1, chunk 256).
- Transformer sizes are Pythia's (GPTNeoX), the Transformer the Mamba paper compares against at equal size.
- ``hf_twin`` builds transformers' pure-PyTorch ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` holding exactly the
  weights of a mambakit model, so a speed comparison runs the same function on both sides.
"""

from __future__ import annotations

import torch

from ..config import MambaConfig
from ..models.lm import MambaLMHeadModel

# size -> (d_model, n_layer) of the official Mamba checkpoints (vocab 50277, padded to 50280).
MAMBA_SIZES = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48),
               "2.8b": (2560, 64), "tiny": (64, 2)}
# size -> Pythia (hidden, layers, heads, intermediate): 130m~pythia-160m, 370m~410m, 1.4b, 2.8b.
PYTHIA_SIZES = {"130m": (768, 12, 12, 3072), "370m": (1024, 24, 16, 4096), "1.4b": (2048, 24, 16, 8192),
                "2.8b": (2560, 32, 32, 10240), "tiny": (64, 2, 4, 256)}
MAMBA_VOCAB, PYTHIA_VOCAB = 50277, 50304
LAYERS = {"mamba1": "Mamba1", "mamba2": "Mamba2"}


def layer_name(name: str) -> str:
    """'mamba1' / 'Mamba1' -> 'Mamba1' (the config's mixer name)."""
    key = name.strip().lower()
    if key not in LAYERS:
        raise SystemExit(f"layer {name!r} is not one of {sorted(LAYERS)}")
    return LAYERS[key]


def mamba_config(layer: str, d_model: int, n_layer: int, vocab_size: int = MAMBA_VOCAB, **ssm) -> MambaConfig:
    """An official-style config: Mamba-1 or Mamba-2 mixers, no MLP, RMSNorm, fp32 residual, tied embeddings."""
    return MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size,
                       ssm_cfg={"layer": layer_name(layer), **ssm})


def mamba_sized(layer: str, size: str, vocab_size: int = MAMBA_VOCAB) -> MambaConfig:
    if size not in MAMBA_SIZES:
        raise SystemExit(f"size {size!r} is not one of {sorted(MAMBA_SIZES)}")
    d_model, n_layer = MAMBA_SIZES[size]
    ssm = {"headdim": 16, "d_state": 16} if size == "tiny" and layer_name(layer) == "Mamba2" else {}
    return mamba_config(layer, d_model, n_layer, vocab_size, **ssm)


def build_mamba(config: MambaConfig, device: torch.device, dtype: torch.dtype) -> MambaLMHeadModel:
    """Random weights, built directly on the device (a 2.8B model initialised on CPU takes minutes)."""
    return MambaLMHeadModel(config, device=device, dtype=dtype).eval()


def pythia(size: str, device: torch.device, dtype: torch.dtype, max_positions: int = 4096,
           vocab_size: int = PYTHIA_VOCAB):
    """transformers' GPTNeoXForCausalLM with Pythia's shape, random weights, SDPA attention."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if size not in PYTHIA_SIZES:
        raise SystemExit(f"size {size!r} has no Pythia shape; use one of {sorted(PYTHIA_SIZES)}")
    hidden, layers, heads, inter = PYTHIA_SIZES[size]
    config = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=inter, vocab_size=vocab_size, max_position_embeddings=max_positions,
                           rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config._attn_implementation = "sdpa"  # best attention transformers has without extra packages
    with torch.device(device):
        model = GPTNeoXForCausalLM(config).to(dtype=dtype)
    return model.eval()


def hf_twin(model: MambaLMHeadModel):
    """transformers' MambaForCausalLM / Mamba2ForCausalLM holding this model's weights (same device/dtype)."""
    cfg = model.config
    if cfg.d_intermediate or cfg.attn_layer_idx or not cfg.rms_norm:
        raise ValueError("hf_twin handles plain Mamba LMs only (no MLP, no attention layers, RMSNorm)")
    mixer = model.backbone.layers[0].mixer
    weight = model.lm_head.weight
    hf = _hf_mamba2(cfg, mixer) if cfg.layer == "Mamba2" else _hf_mamba1(cfg, mixer)
    hf = hf.to(device=weight.device, dtype=weight.dtype)
    # Official key names except transformers' "embeddings" (its load hook renames too, but only one key).
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise ValueError(f"weights do not map onto transformers' model: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def _hf_mamba1(cfg: MambaConfig, mixer):
    from transformers import MambaConfig as HFConfig, MambaForCausalLM

    config = HFConfig(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, vocab_size=cfg.padded_vocab_size,
                      state_size=mixer.d_state, expand=mixer.expand, conv_kernel=mixer.d_conv,
                      time_step_rank=mixer.dt_rank, use_bias=mixer.in_proj.bias is not None,
                      use_conv_bias=mixer.conv1d.bias is not None, residual_in_fp32=cfg.residual_in_fp32,
                      layer_norm_epsilon=1e-5, tie_word_embeddings=cfg.tie_embeddings,
                      pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return MambaForCausalLM(config)


def _hf_mamba2(cfg: MambaConfig, mixer):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    if mixer.d_ssm != mixer.d_inner or mixer.D_has_hdim or not mixer.rmsnorm or mixer.norm_before_gate:
        raise ValueError("transformers' Mamba2 needs d_ssm = d_inner, D per head, gated RMSNorm after the gate")
    config = Mamba2Config(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, vocab_size=cfg.padded_vocab_size,
                          num_heads=mixer.nheads, head_dim=mixer.headdim, state_size=mixer.d_state,
                          n_groups=mixer.ngroups, expand=mixer.expand, conv_kernel=mixer.d_conv,
                          chunk_size=mixer.chunk_size, time_step_limit=tuple(mixer.dt_limit),
                          use_bias=mixer.in_proj.bias is not None, use_conv_bias=mixer.conv1d.bias is not None,
                          residual_in_fp32=cfg.residual_in_fp32, layer_norm_epsilon=1e-5,
                          tie_word_embeddings=cfg.tie_embeddings, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return Mamba2ForCausalLM(config)


def n_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
