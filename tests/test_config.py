import json

import pytest

from mambakit import Mamba, Mamba2, MambaConfig
from mambakit.config import _MAMBA1_KEYS, _MAMBA2_KEYS, constructor_keys

# config.json of state-spaces/mamba-130m and state-spaces/mamba2-130m, as published
MAMBA1_130M = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
               "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
MAMBA2_130M = {"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
               "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
               "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
               "tie_embeddings": True}


def test_official_defaults():
    c = MambaConfig()
    assert (c.d_model, c.d_intermediate, c.n_layer, c.vocab_size) == (2560, 0, 64, 50277)
    assert c.rms_norm and c.residual_in_fp32 and c.fused_add_norm and c.tie_embeddings
    assert c.pad_vocab_size_multiple == 8 and c.ssm_cfg == {} and c.layer == "Mamba1"


@pytest.mark.parametrize("data,layer,padded", [(MAMBA1_130M, "Mamba1", 50280), (MAMBA2_130M, "Mamba2", 50288)])
def test_official_config_json_loads_unchanged(tmp_path, data, layer, padded):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(data))
    c = MambaConfig.from_json_file(p)
    assert c.layer == layer and c.padded_vocab_size == padded
    out = tmp_path / "out.json"
    c.to_json_file(out)
    assert MambaConfig.from_json_file(out) == c


def test_unknown_key_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown keys \\['hidden_size'"):
        MambaConfig.from_dict({**MAMBA1_130M, "hidden_size": 768})
    with pytest.raises(ValueError, match="does not take"):
        MambaConfig(ssm_cfg={"layer": "Mamba1", "headdim": 64})
    with pytest.raises(ValueError, match="not a known mixer"):
        MambaConfig(ssm_cfg={"layer": "Mamba3"})


def test_impossible_combinations():
    with pytest.raises(ValueError, match="not divisible by headdim"):
        MambaConfig(d_model=100, ssm_cfg={"layer": "Mamba2", "headdim": 64})
    with pytest.raises(ValueError, match="ngroups=3 must divide"):
        MambaConfig(d_model=256, ssm_cfg={"layer": "Mamba2", "headdim": 64, "ngroups": 3})
    with pytest.raises(ValueError, match="n_layer"):
        MambaConfig(n_layer=0)
    with pytest.raises(ValueError, match="attn_layer_idx"):
        MambaConfig(n_layer=4, attn_layer_idx=[7], attn_cfg={"num_heads": 4})


def test_ssm_cfg_keys_match_the_mixer_constructors():
    own = {"d_model", "layer_idx", "device", "dtype"}
    assert _MAMBA1_KEYS == constructor_keys(Mamba) - own
    assert _MAMBA2_KEYS == constructor_keys(Mamba2) - own
