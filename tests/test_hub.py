"""Checkpoints: every layout round-trips with identical logits; transformers (as an independent writer and reader)
agrees with mambakit; unsafe or inconsistent files are refused with messages that say what is wrong."""
import fnmatch
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit import hub
from numerics import DEVICE

VOCAB = 100


def tiny_config(layer="Mamba1", tie=True, vocab=VOCAB, **kw) -> MambaConfig:
    ssm = {"d_state": 8, "d_conv": 4, "expand": 2}
    if layer in ("Mamba2", "hybrid"):
        ssm.update(layer="Mamba2", headdim=8, ngroups=2, chunk_size=16)
    if layer == "hybrid":  # attention at layer 1 and an MLP after every mixer
        kw = dict(attn_layer_idx=[1], attn_cfg={"num_heads": 4, "rotary_emb_dim": 8}, d_intermediate=64, **kw)
    return MambaConfig(d_model=32, n_layer=2, vocab_size=vocab, ssm_cfg=ssm, tie_embeddings=tie, **kw)


def perturb_(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter off its (often constant) init so that a wrongly mapped tensor shows in the logits."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def tiny_model(layer="Mamba1", tie=True, **kw) -> MambaLMHeadModel:
    return perturb_(MambaLMHeadModel(tiny_config(layer, tie, **kw))).eval()


def ids(vocab=VOCAB, b=2, length=19) -> torch.Tensor:
    return torch.randint(0, vocab, (b, length))


@torch.no_grad()
def logits_of(model, x) -> torch.Tensor:
    out = model(x)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


@torch.no_grad()
def greedy(model, x, steps=3) -> torch.Tensor:
    for _ in range(steps):
        nxt = logits_of(model, x)[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], dim=1)
    return x


def assert_same_model(a, b, x) -> None:
    """Bit-identical weights, hence identical logits and greedy continuations (checked on the logits)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)
    torch.testing.assert_close(logits_of(b, x), logits_of(a, x), rtol=0, atol=0)


# ---- state-spaces layout -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer, tie", [("Mamba1", True), ("Mamba1", False), ("Mamba2", True), ("Mamba2", False),
                                        ("hybrid", True)])
def test_state_spaces_roundtrip(tmp_path, layer, tie):
    model = tiny_model(layer, tie)
    hub.save_pretrained(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    stored = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in stored) == (not tie)  # a tied head is not stored twice
    assert json.loads((tmp_path / "config.json").read_text()) == model.config.to_dict()

    loaded = MambaLMHeadModel.from_pretrained(tmp_path)
    assert_same_model(model, loaded, ids())
    assert (loaded.lm_head.weight is loaded.backbone.embedding.weight) == tie
    assert not any(p.is_meta for p in loaded.parameters())
    # markers that optimizers read survive the meta-device build
    assert getattr(loaded.backbone.layers[0].mixer.A_log, "_no_weight_decay", False)


def test_loading_builds_on_meta(tmp_path, monkeypatch):
    """No random init on real memory: the model is built on the meta device, then the tensors are assigned."""
    hub.save_pretrained(tiny_model("Mamba1"), tmp_path)
    seen = []
    real = torch.nn.init.normal_

    def spy(tensor, *args, **kwargs):
        seen.append(tensor.device.type)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", spy)
    MambaLMHeadModel.from_pretrained(tmp_path)
    assert seen and set(seen) == {"meta"}


@pytest.mark.parametrize("legacy", [False, True])
def test_official_bin_layout(tmp_path, legacy):
    """mamba_ssm's own files: config.json + pytorch_model.bin holding the tied lm_head too."""
    model = tiny_model("Mamba2")
    model.config.to_json_file(tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    assert_same_model(model, MambaLMHeadModel.from_pretrained(str(tmp_path)), ids())


def test_bin_file_for_mamba_ssm(tmp_path):
    """safe_serialization=False writes what mamba_ssm's strict loader expects: the tied head's key, stored once."""
    model = tiny_model("Mamba1")
    hub.save_pretrained(model, tmp_path, safe_serialization=False)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert state.keys() == model.state_dict().keys()
    assert state["lm_head.weight"].data_ptr() == state["backbone.embedding.weight"].data_ptr()
    fresh = MambaLMHeadModel(model.config)
    fresh.load_state_dict(state, strict=True)  # what mamba_ssm's from_pretrained does
    assert_same_model(model, fresh.eval(), ids())


@pytest.mark.parametrize("safe", [True, False])
def test_sharded_roundtrip_and_overwrite(tmp_path, safe):
    model = tiny_model("Mamba1")
    hub.save_pretrained(model, tmp_path, safe_serialization=safe, max_shard_size="20KB")
    index = json.loads((tmp_path / ("model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"))
                       .read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert_same_model(model, MambaLMHeadModel.from_pretrained(tmp_path), ids())

    # replacing it with a single-file checkpoint removes the stale shards
    hub.save_pretrained(model, tmp_path, safe_serialization=safe, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors" if safe else "pytorch_model.bin"]
    assert_same_model(model, MambaLMHeadModel.from_pretrained(tmp_path), ids())


def test_overwrite_refused(tmp_path):
    a, b = tiny_model("Mamba1"), tiny_model("Mamba1")
    hub.save_pretrained(a, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="already holds a checkpoint.*overwrite=True"):
        b.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched
    # files that are not a checkpoint (notes, a tokenizer) are no reason to refuse, and are kept
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    hub.save_pretrained(b, other)
    assert (other / "notes.txt").read_text() == "mine"


def test_dtype_and_device(tmp_path):
    model = tiny_model("Mamba1")
    hub.save_pretrained(model, tmp_path)
    loaded = MambaLMHeadModel.from_pretrained(tmp_path, device=DEVICE, dtype=torch.bfloat16)
    mixer = loaded.backbone.layers[0].mixer
    assert loaded.backbone.embedding.weight.dtype == torch.bfloat16
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    # as in mamba_ssm: the values are cast to dtype, the module keeps A_log and D as fp32 parameters
    assert mixer.A_log.dtype == torch.float32
    ref = model.backbone.layers[0].mixer.A_log.detach().to(torch.bfloat16).float()
    assert torch.equal(mixer.A_log.detach().cpu(), ref)
    assert all(p.device.type == DEVICE for p in loaded.parameters())
    x = ids()
    torch.testing.assert_close(logits_of(loaded, x.to(DEVICE)).cpu(), logits_of(model, x), rtol=0.1, atol=0.1)


def test_convert_keeps_stored_dtypes(tmp_path):
    """Without --dtype a conversion is lossless, mixed dtypes included (bf16 weights, fp32 A_log and D)."""
    model = MambaLMHeadModel(tiny_config("Mamba1"), dtype=torch.bfloat16)
    assert model.backbone.layers[0].mixer.A_log.dtype == torch.float32
    hub.save_pretrained(model, tmp_path / "src")
    assert hub.main([str(tmp_path / "src"), str(tmp_path / "hf"), "--to", "transformers"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert hub.main([str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "state-spaces"]) == 0
    assert load_file(tmp_path / "back" / "model.safetensors").keys() == load_file(tmp_path / "src" /
                                                                                   "model.safetensors").keys()
    assert_same_model(model, hub._load_directory(MambaLMHeadModel, tmp_path / "back", {}, None, None, True,
                                                 keep_file_dtype=True), ids())
    assert hub.main([str(tmp_path / "src"), str(tmp_path / "f32"), "--to", "state-spaces", "--dtype", "float32"]) == 0
    assert load_file(tmp_path / "f32" / "model.safetensors")["backbone.embedding.weight"].dtype == torch.float32


def test_hf_cache_and_offline(tmp_path, monkeypatch):
    """Hub ids resolve through huggingface_hub's cache: offline works when cached, and says what to do when not."""
    model = tiny_model("Mamba2")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--org--tiny-mamba"
    hub.save_pretrained(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    cache = tmp_path / "cache"
    x = ids()
    loaded = MambaLMHeadModel.from_pretrained("org/tiny-mamba", cache_dir=cache, local_files_only=True)
    assert_same_model(model, loaded, x)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = MambaLMHeadModel.from_pretrained("org/tiny-mamba", cache_dir=cache, revision=commit)
    torch.testing.assert_close(logits_of(loaded, x), logits_of(model, x), rtol=0, atol=0)
    (repo / "snapshots" / commit / "model.safetensors").unlink()  # a partial download
    with pytest.raises(FileNotFoundError, match=r"cached copy of 'org/tiny-mamba' .* has no model.safetensors.*"
                                                r"hf download org/tiny-mamba"):
        MambaLMHeadModel.from_pretrained("org/tiny-mamba", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"(?s)not in the Hugging Face cache.*HF_HUB_OFFLINE.*"
                                                r"hf download org/absent.*directory holding config.json"):
        MambaLMHeadModel.from_pretrained("org/absent", cache_dir=cache)


def test_hub_download_prefers_safetensors(tmp_path, monkeypatch):
    """With network: safetensors-only download first; the .bin only when the repo has no safetensors."""
    import huggingface_hub

    model = tiny_model("Mamba1")
    remote = tmp_path / "remote"
    remote.mkdir()
    model.config.to_json_file(remote / "config.json")
    torch.save(model.state_dict(), remote / "pytorch_model.bin")  # like the official repos
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append(allow_patterns)
        local = tmp_path / "local"
        local.mkdir(exist_ok=True)
        for f in remote.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, local / f.name)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert_same_model(model, MambaLMHeadModel.from_pretrained("state-spaces/tiny"), ids())
    assert len(calls) == 2 and "model*.safetensors" in calls[0] and "pytorch_model*.bin" in calls[1]


def test_default_model(tmp_path, monkeypatch):
    assert hub.default_model_path().parts[-2:] == ("assets", "default")
    monkeypatch.setattr(hub, "default_model_path", lambda: tmp_path / "default")
    with pytest.raises(FileNotFoundError, match="default mambakit model is not installed"):
        hub.load_pretrained(MambaLMHeadModel, None)
    model = tiny_model("Mamba1")
    hub.save_pretrained(model, tmp_path / "default")
    assert_same_model(model, hub.load_pretrained(MambaLMHeadModel, None), ids())
    assert_same_model(model, MambaLMHeadModel.from_pretrained("default"), ids())


# ---- safety ------------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this calls open(path, 'w'): stands in for arbitrary code in a hostile checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_refused(tmp_path):
    model = tiny_model("Mamba1")
    model.config.to_json_file(tmp_path / "config.json")
    sentinel = tmp_path / "code_ran"
    state = dict(model.state_dict(), evil=_Payload(str(sentinel)))
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"refusing to load .*pytorch_model.bin.*arbitrary code"):
        MambaLMHeadModel.from_pretrained(tmp_path)
    assert not sentinel.exists()
    # control: the payload is real, an unsafe load would have run it
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)
    assert sentinel.exists()


def test_nonfinite_weights_reported(tmp_path):
    hub.save_pretrained(tiny_model("Mamba2"), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["backbone.layers.1.mixer.D"][0] = float("nan")
    state["backbone.norm_f.weight"][3] = float("inf")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"NaN or Inf.*backbone\.layers\.1\.mixer\.D, backbone\.norm_f\.weight"):
        MambaLMHeadModel.from_pretrained(tmp_path)
    assert MambaLMHeadModel.from_pretrained(tmp_path, check_finite=False) is not None


# ---- errors that say what is wrong -------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    hub.save_pretrained(tiny_model("Mamba1"), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_config_weight_disagreements(saved):
    with pytest.raises(ValueError, match="checkpoint has 2 layers, config says 3"):
        MambaLMHeadModel.from_pretrained(saved, n_layer=3)
    with pytest.raises(ValueError, match=r"size mismatch for backbone\.layers\.0\.mixer\.A_log: checkpoint "
                                         r"\(64, 8\), model \(64, 4\)"):
        MambaLMHeadModel.from_pretrained(saved, ssm_cfg={"d_state": 4})
    with pytest.raises(ValueError, match=r"embedding has 104 rows; the config's vocab_size=200"):
        MambaLMHeadModel.from_pretrained(saved, vocab_size=200)
    with pytest.raises(TypeError, match=r"unknown arguments \['n_layers'\]"):
        MambaLMHeadModel.from_pretrained(saved, n_layers=2)


def test_missing_and_unexpected_keys(saved):
    state = load_file(saved / "model.safetensors")
    del state["backbone.layers.1.mixer.dt_proj.bias"]
    state["backbone.layers.1.mixer.extra"] = torch.ones(3)
    save_file(state, saved / "model.safetensors")
    with pytest.raises(ValueError, match=r"(?s)missing keys \(1\): backbone\.layers\.1\.mixer\.dt_proj\.bias.*"
                                         r"unexpected keys \(1\): backbone\.layers\.1\.mixer\.extra"):
        MambaLMHeadModel.from_pretrained(saved)


def test_tied_head_that_differs_is_refused(saved):
    state = load_file(saved / "model.safetensors")
    state["lm_head.weight"] = torch.randn_like(state["backbone.embedding.weight"])
    save_file(state, saved / "model.safetensors")
    with pytest.raises(ValueError, match="tie_embeddings=True but the checkpoint's lm_head.weight differs"):
        MambaLMHeadModel.from_pretrained(saved)
    loaded = MambaLMHeadModel.from_pretrained(saved, tie_embeddings=False)
    assert torch.equal(loaded.lm_head.weight, state["lm_head.weight"])


def test_bad_paths_and_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MambaLMHeadModel.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="is a file; pass the directory"):
        MambaLMHeadModel.from_pretrained(saved / "config.json")
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        MambaLMHeadModel.from_pretrained(saved)
    (saved / "config.json").write_text('{"hidden_size": 3}')
    with pytest.raises(ValueError, match="neither a state-spaces config"):
        MambaLMHeadModel.from_pretrained(saved)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "falcon_mamba"}, "unknown model_type 'falcon_mamba'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
    ({"num_heads": 3}, "num_heads x head_dim = 24 != expand x hidden_size = 64"),
])
def test_unsupported_transformers_configs_refused(tmp_path, change, message):
    hub.save_pretrained(tiny_model("Mamba2"), tmp_path, layout="transformers")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=message):
        MambaLMHeadModel.from_pretrained(tmp_path)


def test_transformers_layout_refuses_what_it_cannot_express(tmp_path):
    model = MambaLMHeadModel(tiny_config("Mamba2", d_intermediate=64))
    with pytest.raises(ValueError, match="cannot express this model: d_intermediate=64"):
        hub.save_pretrained(model, tmp_path, layout="transformers")
    assert not (tmp_path / "config.json").exists()


# ---- transformers as an independent writer and reader -----------------------------------------------------------
@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")  # a test dependency; the library never imports it


def hf_model(transformers, kind: str):
    if kind == "mamba":
        cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
                                       use_bias=True, time_step_rank=3)
        return perturb_(transformers.MambaForCausalLM(cfg)).eval()
    cfg = transformers.Mamba2Config(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=8,
                                    head_dim=8, n_groups=2, chunk_size=8, use_conv_bias=False,
                                    time_step_limit=(0.01, 0.5))
    return perturb_(transformers.Mamba2ForCausalLM(cfg)).eval()


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_load_transformers_checkpoint(tmp_path, kind, transformers):
    ref = hf_model(transformers, kind)
    ref.save_pretrained(tmp_path)
    ours = MambaLMHeadModel.from_pretrained(tmp_path)
    x = ids(vocab=ref.config.vocab_size)
    torch.testing.assert_close(logits_of(ours, x), logits_of(ref, x), rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy(ours, x), greedy(ref, x))
    # and back: the state-spaces copy gives the same model
    assert hub.main([str(tmp_path), str(tmp_path / "ss"), "--to", "state-spaces"]) == 0
    assert_same_model(ours, MambaLMHeadModel.from_pretrained(tmp_path / "ss"), x)


def test_load_bare_transformers_backbone(tmp_path, transformers):
    """A saved MambaModel (no LM head, keys without 'backbone.') loads with the head tied to the embedding."""
    ref = transformers.MambaModel(transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8,
                                                           num_hidden_layers=2))
    ref.save_pretrained(tmp_path)
    ours = MambaLMHeadModel.from_pretrained(tmp_path)
    assert torch.equal(ours.backbone.embedding.weight, ref.embeddings.weight)
    assert torch.equal(ours.backbone.layers[1].mixer.x_proj.weight, ref.layers[1].mixer.x_proj.weight)
    assert ours.lm_head.weight is ours.backbone.embedding.weight


@pytest.mark.parametrize("layer, tie", [("Mamba1", True), ("Mamba2", True), ("Mamba2", False)])
def test_convert_for_transformers(tmp_path, layer, tie, capsys, transformers):
    model = tiny_model(layer, tie)
    hub.save_pretrained(model, tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    assert hub.main([str(tmp_path / "src"), str(tmp_path / "hf"), "--to", "transformers"]) == 0
    assert "AutoModelForCausalLM" in capsys.readouterr().out
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # tokenizer files travel along
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = ids()
    torch.testing.assert_close(logits_of(ref, x), logits_of(model, x), rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy(ref, x), greedy(model, x))
    # converting into an existing checkpoint is refused; --overwrite replaces it
    assert hub.main([str(tmp_path / "src"), str(tmp_path / "hf"), "--to", "transformers"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert hub.main([str(tmp_path / "src"), str(tmp_path / "hf"), "--to", "transformers", "--overwrite"]) == 0


def test_convert_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        hub.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--to", "--dtype", "--max-shard-size", "--overwrite", "--revision", "--cache-dir",
                 "--local-files-only"):
        assert flag in out
