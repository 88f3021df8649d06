"""Tiny random language models (Mamba-1 and Mamba-2) shared by the generation tests."""
import torch

from mambakit import MambaConfig, MambaLMHeadModel

VOCAB = 60  # padded to 64 rows: the last 4 logits are vocabulary padding that must never be generated

MIXER_CFG = {
    "mamba1": {"d_state": 8},
    "mamba2": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8},
    "hybrid": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8},
}
# The hybrid's middle layer is attention (GQA, rotary, conv on q/k/v, as in state-spaces/mamba2attn-2.7b).
ATTN_CFG = {"num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "rotary_emb_dim": 4, "d_conv": 4}


def tiny_config(layer: str) -> MambaConfig:
    hybrid = layer == "hybrid"
    return MambaConfig(d_model=32, n_layer=3 if hybrid else 2, vocab_size=VOCAB, ssm_cfg=dict(MIXER_CFG[layer]),
                       pad_vocab_size_multiple=16, attn_layer_idx=[1] if hybrid else [],
                       attn_cfg=ATTN_CFG if hybrid else {})


def build(layer: str, dtype=torch.float64, seed: int = 0) -> MambaLMHeadModel:
    """A random tiny LM whose logits are spread enough that greedy choices are not near-ties."""
    torch.manual_seed(seed)
    model = MambaLMHeadModel(tiny_config(layer), dtype=dtype)
    with torch.no_grad():
        model.backbone.embedding.weight.mul_(20.0)  # tied with lm_head: larger, better separated logits
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)
