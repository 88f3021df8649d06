"""Tensor parallelism on CPU: two Gloo processes (set up like torchrun would, through its environment
variables) must give the logits, loss and gathered gradients of one process, decode like their forward pass,
and round-trip a full checkpoint (load shards -> gather -> identical official state dict). Three models: a
hybrid whose groups split (ngroups=2), and with ngroups=1 (B/C replicated, the gated RMSNorm's group spanning
both ranks, as in the released checkpoints) a pure Mamba-2 and a mamba2attn-like hybrid.

The worker also runs under torchrun: `torchrun --nproc-per-node 2 tests/test_tensor_parallel.py WORKDIR`
(WORKDIR holding the inputs.pt that the fixture writes).
"""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from mambakit import InferenceParams, MambaConfig, MambaLMHeadModel
from mambakit.distributed.layers import ShardSpec
from mambakit.distributed.tensor_parallel import check_parallelizable, parallelize

WORLD = 2


def tp_config(**kw) -> MambaConfig:
    """A hybrid Mamba-2 model exercising every split: MLP part in in_proj (d_ssm < d_inner), several groups,
    biases, an attention layer with GQA, conv and an MLP branch, and gated MLPs."""
    ssm = {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "d_ssm": 96, "chunk_size": 16, "bias": True}
    attn = {"num_heads": 4, "num_heads_kv": 2, "head_dim": 16, "rotary_emb_dim": 8, "d_conv": 4, "mlp_dim": 64}
    base = dict(d_model=64, n_layer=3, vocab_size=100, ssm_cfg=ssm, attn_layer_idx=[1], attn_cfg=attn,
                d_intermediate=48)
    return MambaConfig(**{**base, **kw})


G1_SSM = {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 1, "chunk_size": 16}
CONFIGS = {
    "split_groups": tp_config(),
    # ngroups=1: B/C replicated, one RMSNorm group over both ranks; d_ssm < d_inner and biases for coverage
    "mamba2_g1": tp_config(attn_layer_idx=None, attn_cfg=None, d_intermediate=0, n_layer=2,
                           ssm_cfg={**G1_SSM, "d_ssm": 96, "bias": True, "conv_bias": True}),
    # mamba2attn-like: ngroups=1 Mamba-2 layers, MHA with conv and rotary, no MLPs
    "hybrid_g1": tp_config(d_intermediate=0, ssm_cfg=G1_SSM,
                           attn_cfg={"num_heads": 4, "num_heads_kv": 4, "head_dim": 16, "rotary_emb_dim": 8,
                                     "d_conv": 4, "causal": True}),
}


def _single_process(full, ids, config):
    model = MambaLMHeadModel(config)
    model.load_state_dict(full)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out, {k: p.grad for k, p in model.named_parameters()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, work: str, port: int) -> None:
    """A forked rank: torchrun's variables, then the worker (forking skips re-importing torch, ~8 s here)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # OpenMP pools do not survive fork; one thread per rank on a 2-core machine anyway
    _worker(work)


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """Run the 2-process worker once (all CONFIGS); every test below reads its results."""
    work = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    inputs = {name: {"full": MambaLMHeadModel(cfg).state_dict(), "ids": torch.randint(0, 100, (2, 21))}
              for name, cfg in CONFIGS.items()}
    torch.save(inputs, work / "inputs.pt")
    ctx = mp.start_processes(_entry, args=(str(work), _free_port()), nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):  # raises ProcessRaisedException with the rank's traceback if one failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("tensor-parallel workers did not finish within 180 s")
    return inputs, torch.load(work / "result.pt")


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_loss_and_gradients_equal_one_process(tp_run, name):
    inputs, results = tp_run
    full, ids, res = inputs[name]["full"], inputs[name]["ids"], results[name]
    ref, ref_grads = _single_process(full, ids, CONFIGS[name])
    torch.testing.assert_close(res["logits"], ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res["loss"], ref.loss, rtol=1e-5, atol=1e-6)
    assert set(res["grads"]) == set(ref_grads)
    for k, g in ref_grads.items():
        torch.testing.assert_close(res["grads"][k], g, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", ["mamba2_g1", "hybrid_g1"])
def test_replicated_parameters_stay_identical_on_every_rank(tp_run, name):
    """B/C rows and conv channels are replicated with ngroups=1: their gradients must be summed over the ranks
    (the full gradient, not this rank's heads' part) and agree bit for bit, so optimizers keep them equal."""
    _, results = tp_run
    replicated = results[name]["replicated"]
    assert replicated and all(replicated.values()), replicated


def test_shards_are_a_real_split(tp_run):
    _, results = tp_run
    shapes = results["split_groups"]["local_shapes"]
    assert shapes["backbone.layers.0.mixer.in_proj.weight"] == ((2 * 128 + 2 * 2 * 8 + 6) // WORLD, 64)
    assert shapes["backbone.layers.0.mixer.out_proj.weight"] == (64, 128 // WORLD)
    assert shapes["backbone.layers.0.mixer.norm.weight"] == (96 // WORLD,)
    assert shapes["backbone.layers.1.mixer.in_proj.weight"] == ((16 * (4 + 2 * 2) + 256) // WORLD, 64)
    assert shapes["backbone.embedding.weight"] == (104 // WORLD, 64)
    assert shapes["backbone.norm_f.weight"] == (64,)
    g1 = results["hybrid_g1"]["local_shapes"]  # heads split, B and C (d_state rows each) replicated
    assert g1["backbone.layers.0.mixer.in_proj.weight"] == (2 * 128 // WORLD + 2 * 8 + 8 // WORLD, 64)
    assert g1["backbone.layers.0.mixer.conv1d.weight"] == (128 // WORLD + 2 * 8, 1, 4)
    assert g1["backbone.layers.0.mixer.norm.weight"] == (128 // WORLD,)


@pytest.mark.parametrize("name", CONFIGS)
def test_gathered_state_dict_is_the_official_one(tp_run, name):
    inputs, results = tp_run
    full = inputs[name]["full"]
    for what in ("gathered", "reloaded"):
        assert set(results[name][what]) == set(full)
        for k, v in full.items():
            assert torch.equal(results[name][what][k], v), f"{what}: {k} differs"


@pytest.mark.parametrize("name", CONFIGS)
def test_save_pretrained_of_a_split_model_writes_the_full_checkpoint(tp_run, name):
    from mambakit.hub import load_pretrained

    inputs, results = tp_run
    assert results[name]["saved_complete"]
    model = load_pretrained(MambaLMHeadModel, results[name]["saved_dir"])
    assert model.config == CONFIGS[name]
    for k, v in inputs[name]["full"].items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("name", CONFIGS)
def test_tp_decoding_equals_tp_forward(tp_run, name):
    _, results = tp_run
    torch.testing.assert_close(results[name]["decoded"], results[name]["logits"], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def cli_model_dir(tmp_path_factory):
    """A tiny ngroups=1 Mamba-2 checkpoint with a word-level tokenizer (w0..w99)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    path = tmp_path_factory.mktemp("tp_cli_model")
    torch.manual_seed(0)
    model = MambaLMHeadModel(CONFIGS["mamba2_g1"])
    with torch.no_grad():
        model.backbone.embedding.weight.mul_(3.0)  # varied greedy text, top-2 logit gaps >= 0.03 (TP error ~1e-6)
    model.save_pretrained(path)
    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


def test_cli_generate_with_tp_prints_the_single_process_text(cli_model_dir, capsys):
    from mambakit.inference import cli

    args = ["w3 w7 w1 w42", "--model", str(cli_model_dir), "--max-new-tokens", "8"]
    assert cli.main(args + ["--device", "cpu"]) == 0
    want = capsys.readouterr().out
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "mambakit", "generate", "--tp", *args], capture_output=True, text=True, env=env,
                         timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == want  # rank 0 alone prints, the same greedy text


@pytest.mark.parametrize("cfg, msg", [
    (dict(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 3, "d_ssm": 96}), "ngroups=3"),
    (dict(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 1, "d_ssm": 80}), "nheads=5"),
    (dict(ssm_cfg={"layer": "Mamba1", "d_state": 8}), "Mamba layers have no tensor-parallel"),
    (dict(attn_cfg={"num_heads": 3, "head_dim": 16}), "num_heads=3"),
    (dict(vocab_size=99, pad_vocab_size_multiple=3), "padded vocabulary 99"),
])
def test_unsplittable_models_give_clear_errors(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        check_parallelizable(MambaLMHeadModel(tp_config(**cfg)), WORLD)


def test_parallelize_needs_a_process_group():
    with pytest.raises(RuntimeError, match="torchrun"):
        parallelize(MambaLMHeadModel(tp_config()))


def test_shard_spec_round_trip():
    spec = ShardSpec(0, (4, 0, 6, 2))
    full = torch.randn(12, 3)
    shards = [spec.shard(full, r, 2) for r in range(2)]
    assert torch.equal(shards[0], torch.cat([full[0:2], full[4:7], full[10:11]]))
    assert torch.equal(spec.unshard(shards), full)


def test_shard_spec_with_replicated_pieces():
    """4 ranks, segments [x (split 4 ways), B (2 pieces: ranks 0-1 hold piece 0, ranks 2-3 piece 1)]."""
    spec = ShardSpec(0, (8, 4), (None, 2))
    full = torch.randn(12, 3)
    shards = [spec.shard(full, r, 4) for r in range(4)]
    assert torch.equal(shards[1], torch.cat([full[2:4], full[8:10]]))
    assert torch.equal(shards[2], torch.cat([full[4:6], full[10:12]]))
    assert torch.equal(spec.unshard(shards), full)
    assert spec.replicated_ranges(3, 4) == [(2, 2, 1, 2)]
    assert ShardSpec(0, (8, 2, 2), (None, 1, 1)).replicated_ranges(0, 2) == [(4, 4, 0, 1)]  # B, C: one run
    with pytest.raises(ValueError, match="divisible"):
        ShardSpec(0, (8, 3), (None, 2)).check(4, "x")


# ---- the worker ------------------------------------------------------------------------------------------
def _worker(work: str) -> None:
    import torch.distributed as dist

    from mambakit.distributed import setup_from_env

    env = setup_from_env(backend="gloo")
    inputs = torch.load(os.path.join(work, "inputs.pt"))
    res = {name: _run_config(CONFIGS[name], inp["full"], inp["ids"], env, os.path.join(work, f"saved_{name}"))
           for name, inp in inputs.items()}
    if env.rank == 0:
        torch.save(res, os.path.join(work, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _replicated_grads_agree(model, group) -> dict[str, bool]:
    """For each replicated slice (ShardSpec.replicated_ranges), whether its local grad is identical on all ranks."""
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    out = {}
    for name, p in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        spec = getattr(model.get_submodule(prefix), "_tp_specs", {}).get(leaf)
        for start, length, _, _ in (spec.replicated_ranges(rank, world) if spec else []):
            part = p.grad.narrow(spec.dim, start, length).contiguous()
            parts = [torch.empty_like(part) for _ in range(world)]
            dist.all_gather(parts, part, group=group)
            out[name] = all(torch.equal(q, parts[0]) for q in parts)
    return out


def _run_config(config, full, ids, env, save_dir: str) -> dict:
    import torch.distributed as dist

    from mambakit.distributed import gather_grads, gather_state_dict, load_full_state_dict

    model = MambaLMHeadModel(config)
    model.load_state_dict(full)
    parallelize(model, env.group)
    out = model(ids, labels=ids)
    out.loss.backward()
    res = {"logits": out.logits.detach(), "loss": out.loss.detach(), "grads": gather_grads(model),
           "gathered": gather_state_dict(model), "replicated": _replicated_grads_agree(model, env.group),
           "local_shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()}}
    with torch.no_grad():  # prefill 6, a chunk of 5, then one token at a time
        params = InferenceParams(max_seqlen=32, max_batch_size=2)
        steps = [model(ids[:, :6], inference_params=params).logits, None]
        params.seqlen_offset = 6
        steps[1] = model(ids[:, 6:11], inference_params=params).logits
        params.seqlen_offset = 11
        for t in range(11, ids.shape[1]):
            steps.append(model.decode_step(ids[:, t:t + 1], params).unsqueeze(1))
            params.seqlen_offset += 1
    res["decoded"] = torch.cat(steps, 1)
    torch.manual_seed(123)  # different weights, then the checkpoint loaded into the sharded model
    fresh = parallelize(MambaLMHeadModel(config), env.group)
    load_full_state_dict(fresh, full)
    res["reloaded"] = gather_state_dict(fresh)
    fresh.save_pretrained(save_dir)  # every rank calls it; rank 0 writes the full checkpoint
    res["saved_dir"] = save_dir
    done = torch.tensor([int(os.path.exists(os.path.join(save_dir, "config.json")))])
    dist.all_reduce(done, op=dist.ReduceOp.MIN)  # complete when save_pretrained returns, on every rank
    res["saved_complete"] = bool(done)
    return res


if __name__ == "__main__":
    _worker(sys.argv[1])
