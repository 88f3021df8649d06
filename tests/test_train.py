"""mambakit train: a tiny CPU run learns, resumes exactly, survives Ctrl-C, runs under torchrun (gloo), and
refuses bad input with clear errors."""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit import data as D
from mambakit import train as T

STDLIB_FILES = ["textwrap.py", "shlex.py", "csv.py", "json/decoder.py", "json/encoder.py", "bisect.py"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: identical reductions in every run (exact resume) and no oversubscription on CI."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few small standard-library modules: real Python code, present on every machine."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_FILES:
        shutil.copy(stdlib / name, root / name.replace("/", "_"))
    return root


def targs(corpus, out, *extra, steps=20):
    length = ["--max-steps", str(steps)] if steps else []
    return [str(corpus), "--out", str(out), "--preset", "tiny", "--d-model", "32", "--n-layer", "2",
            "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", *length, "--log-every", "1",
            "--eval-every", "0", "--save-every", "0", "--val-fraction", "0.05",
            "--val-tokens", "512", "--lr", "3e-3", "--device", "cpu", *extra]


def read_log(out):
    with open(Path(out) / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def train_losses(out):
    return {int(r["step"]): r["loss"] for r in read_log(out) if r["loss"]}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert T.main(targs(corpus, out, "--eval-every", "20", steps=40)) == 0
    return out


# ---- training ------------------------------------------------------------------------------------------------

def test_tiny_run_decreases_loss_and_exports(trained):
    from mambakit.hub import load_pretrained
    from mambakit.tokenizer import load_tokenizer

    losses = [float(v) for _, v in sorted(train_losses(trained).items())]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "log.csv", "run.json"):
        assert (trained / name).is_file(), name
    metrics = json.loads((trained / "metrics.json").read_text())
    assert math.isfinite(metrics["val_ppl"]) and metrics["unigram_val_ppl"] > 1
    assert metrics["steps"] == 40 and metrics["tokens"] == 40 * 4 * 32
    assert [int(r["step"]) for r in read_log(trained) if r["val_loss"]] == [20, 40]
    try:
        import matplotlib  # noqa: F401  (optional: the plot is skipped with a note without it)

        assert (trained / "loss.png").stat().st_size > 1000
    except ImportError:
        assert not (trained / "loss.png").exists()
    # The export is a normal checkpoint: mambakit generate --model OUT loads it
    model = load_pretrained(MambaLMHeadModel, trained)
    tok = load_tokenizer(trained)
    ids = torch.tensor([tok.encode("def read_config(path):")])
    assert model(ids).logits.shape[:2] == ids.shape


def test_resume_is_exact_and_ctrl_c_saves(corpus, tmp_path, monkeypatch):
    """An uninterrupted run and one stopped by Ctrl-C after step 3 then resumed give the same losses and weights."""
    from safetensors.torch import load_file

    extra = ("--save-every", "4", "--grad-accum", "2", "--layer", "Mamba2", "--headdim", "16")
    assert T.main(targs(corpus, tmp_path / "a", *extra, steps=8)) == 0

    real = D.sample_windows

    def interrupt_at_step_3(tokens, end, seq_len, batch_size, seed, step, micro=0, rank=0):
        if (step, micro) == (2, 0):
            signal.raise_signal(signal.SIGINT)  # delivered mid-step, as a real Ctrl-C would be
        return real(tokens, end, seq_len, batch_size, seed, step, micro, rank)

    monkeypatch.setattr(D, "sample_windows", interrupt_at_step_3)
    assert T.main(targs(corpus, tmp_path / "b", *extra, steps=8)) == 130
    monkeypatch.setattr(D, "sample_windows", real)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_00000003"]
    assert (tmp_path / "b" / "model.safetensors").is_file()  # the interrupted run's weights are usable too
    assert T.main(targs(corpus, tmp_path / "b", *extra, "--resume", steps=8)) == 0

    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 9))  # the log reads as one run
    assert a == b  # same next loss after resuming, exactly (5 decimals in the log)
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical weights
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma["val_loss"] == mb["val_loss"]


def test_init_from_fine_tunes_the_checkpoint(trained, corpus, tmp_path):
    out = tmp_path / "ft"
    argv = [str(corpus), "--out", str(out), "--init-from", str(trained), "--seq-len", "32", "--batch-size", "4",
            "--max-steps", "2", "--log-every", "1", "--val-fraction", "0.05", "--lr", "1e-4", "--device", "cpu",
            "--save-dtype", "bfloat16"]
    assert T.main(argv) == 0
    first = float(train_losses(out)[1])
    final_before = float(train_losses(trained)[40])
    assert first < final_before + 0.5 < math.log(300)  # starts from the trained weights, not from scratch
    assert (out / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("backbone.embedding.weight").dtype == torch.bfloat16


def test_time_limit_ends_cleanly_with_a_fitted_schedule(corpus, tmp_path):
    out = tmp_path / "timed"
    assert T.main(targs(corpus, out, "--max-time-minutes", "0.04", "--warmup-steps", "2", steps=None)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped"] in ("time limit", "done") and metrics["train_time_s"] < 0.04 * 60 + 2
    lrs = [float(r["lr"]) for r in read_log(out) if r["lr"]]
    assert lrs[-1] < 0.6 * 3e-3  # the cosine was fitted to the budget, not left at its peak
    assert (out / "model.safetensors").is_file() and (out / "checkpoints").is_dir()


def _torchrun(corpus, out, *flags):
    """python -m torch.distributed.run --nproc-per-node 2 -m mambakit train ... on CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MAMBAKIT_BACKEND": "torch"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mambakit",
           "train", *targs(corpus, out, "--save-every", "2", "--eval-every", "2", "--export", "best", *flags, steps=4)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ddp_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "out"
    return out, _torchrun(corpus, out, "--data-cache", str(out.parent / "tokens"))


def test_torchrun_two_cpu_processes(ddp_run):
    out, proc = ddp_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["tokens"] == 4 * 2 * 4 * 32
    assert math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["final_train_loss"])
    ckpt = out / "checkpoints" / "step_00000004"
    assert (ckpt / "rng_rank0.safetensors").is_file() and (ckpt / "rng_rank1.safetensors").is_file()
    assert proc.stdout.count("training ended") == 1  # only rank 0 prints
    assert metrics["exported"] == "best" and (out / "checkpoints" / "best.safetensors").is_file()


@pytest.mark.slow
def test_torchrun_fsdp_matches_ddp(ddp_run, corpus, tmp_path):
    """FSDP2 (--fsdp) trains the same model as DDP: same losses, same validation, to the logged digits."""
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("FSDP2 (fully_shard) needs PyTorch >= 2.6")
    ddp_out, _ = ddp_run
    out = tmp_path / "fsdp"
    _torchrun(corpus, out, "--fsdp", "--data-cache", str(ddp_out.parent / "tokens"))
    ddp, fsdp_ = read_log(ddp_out), read_log(out)
    assert [(r["loss"], r["val_loss"]) for r in fsdp_] == [(r["loss"], r["val_loss"]) for r in ddp]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_training_learns_and_resumes(corpus, tmp_path):
    """On a GPU: bf16 autocast with fp32 parameters, fused AdamW, Triton kernels; Mamba-2; resume continues."""
    gpu = ["--device", "cuda", "--layer", "Mamba2", "--headdim", "16", "--batch-size", "16", "--seq-len", "128",
           "--save-every", "30"]
    out = tmp_path / "gpu"
    assert T.main(targs(corpus, out, *gpu, steps=60)) == 0
    losses = [float(v) for _, v in sorted(train_losses(out).items())]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == "bf16" and metrics["val_ppl"] < metrics["unigram_val_ppl"] * 2
    shutil.rmtree(out / "checkpoints" / "step_00000060")
    assert T.main(targs(corpus, out, *gpu, "--resume", steps=60)) == 0
    resumed = [float(v) for _, v in sorted(train_losses(out).items())]
    assert len(resumed) == 60 and max(abs(a - b) for a, b in zip(losses[30:], resumed[30:])) < 0.05


# ---- bad input ------------------------------------------------------------------------------------------------

def _fails(argv, capsys, message):
    assert T.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    return err


def test_bad_data(corpus, tmp_path, capsys):
    _fails(targs(tmp_path / "missing", tmp_path / "o1"), capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text("")
    _fails(targs(tmp_path / "empty", tmp_path / "o2", "--tokenizer", str(_tokenizer(corpus, tmp_path))), capsys,
           "empty or not UTF-8")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("x = 1\n")
    _fails(targs(tmp_path / "short", tmp_path / "o3"), capsys, "fewer than one window of --seq-len 32")
    _fails(targs(corpus, tmp_path / "o4", "--seq-len", "1000000"), capsys, "fewer than one window")


def _tokenizer(corpus, tmp_path):
    return D.train_bpe(D.find_files([corpus]), 300, tmp_path / "tok" / "tokenizer.json")


def test_out_dir_with_a_run_is_never_overwritten_silently(trained, corpus, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    before = (out / "model.safetensors").read_bytes()
    _fails(targs(corpus, out), capsys, "already holds a run")
    assert (out / "model.safetensors").read_bytes() == before
    _fails(targs(corpus, out, "--resume", "--overwrite"), capsys, "pass one of them")
    assert T.main(targs(corpus, out, "--overwrite", steps=2)) == 0
    assert not (out / "checkpoints" / "step_00000040").exists()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_prepare_only_then_train_in_the_same_directory(corpus, tmp_path, capsys):
    out = tmp_path / "prep"
    assert T.main(targs(corpus, out, "--prepare-only")) == 0
    assert (out / "tokens" / "tokens.bin").is_file() and not (out / "run.json").exists()
    capsys.readouterr()
    assert T.main(targs(corpus, out, steps=1)) == 0
    printed = capsys.readouterr().out
    assert "using the tokenizer already in" in printed and "reusing token file" in printed


def test_config_contradicting_the_checkpoint(trained, corpus, tmp_path, capsys):
    cfg = MambaConfig.from_json_file(trained / "config.json")
    other = MambaConfig(**{**cfg.to_dict(), "d_model": 48})
    other.to_json_file(tmp_path / "other.json")
    base = [str(corpus), "--device", "cpu", "--seq-len", "32", "--max-steps", "1"]
    _fails([*base, "--out", str(tmp_path / "x1"), "--init-from", str(trained),
            "--config", str(tmp_path / "other.json")], capsys, "--config contradicts the checkpoint --init-from")
    assert "d_model: 48 vs 32" in T.config_differences(other, cfg)[0]
    err = _fails([*base, "--out", str(tmp_path / "x2"), "--init-from", str(trained), "--d-model", "64"], capsys,
                 "the model flags contradict the checkpoint --init-from")
    assert "--d-model 64 vs 32" in err
    # resuming a run with model flags that differ from its checkpoint
    _fails(targs(corpus, trained, "--resume", "--d-model", "64"), capsys, "--d-model 64 vs 32")
    small_vocab = MambaConfig(**{**cfg.to_dict(), "vocab_size": 100})
    small_vocab.to_json_file(tmp_path / "small.json")
    _fails([*base, "--out", str(tmp_path / "x3"), "--config", str(tmp_path / "small.json"), "--vocab-size", "300"],
           capsys, "but the model's vocab_size is 100")
    _fails(targs(corpus, tmp_path / "x4", "--fsdp"), capsys, "launch with torchrun")
    _fails(targs(corpus, tmp_path / "x5", "--layer", "Mamba3"), capsys, "use Mamba1 or Mamba2")


# ---- pieces -----------------------------------------------------------------------------------------------------

def test_lr_schedule():
    lrs = [T.lr_at(s, 100, 10, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and T.lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decays monotonically
    assert T.lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)  # half-way: the mean of lr and min_lr


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_no_weight_decay_groups(layer):
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={"layer": layer} if layer == "Mamba2" else {})
    model = MambaLMHeadModel(cfg)
    names = T.no_decay_names(model)
    expect = {"backbone.embedding.weight", "backbone.norm_f.weight", "backbone.layers.0.norm.weight",
              "backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.D", "backbone.layers.0.mixer.conv1d.bias"}
    expect.add("backbone.layers.0.mixer.dt_bias" if layer == "Mamba2" else "backbone.layers.0.mixer.dt_proj.bias")
    assert expect <= names
    assert "backbone.layers.0.mixer.in_proj.weight" not in names
    assert "backbone.layers.1.mixer.out_proj.weight" not in names
    args = T.build_parser().parse_args(["x", "--out", "y"])
    opt = T.make_optimizer(model, names, args, torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len({id(p) for p in model.parameters()})


def test_presets_are_valid_configs():
    for name in [*T.PRESETS, "780m", "2.7b"]:
        for layer in ("Mamba1", "Mamba2"):
            args = T.build_parser().parse_args(["x", "--out", "y", "--preset", name, "--layer", layer])
            cfg = T.preset_config(args, 50277)
            assert cfg.layer == layer and cfg.padded_vocab_size % 8 == 0
    args = T.build_parser().parse_args(["x", "--out", "y", "--preset", "130m"])
    assert (T.preset_config(args, 50277).d_model, T.preset_config(args, 50277).n_layer) == (768, 24)


def test_optimizer_state_roundtrip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, opt)
    tensors, structure = T._flatten_optimizer(state)
    json.dumps(structure)  # the structure is plain JSON
    back = T._unflatten_optimizer(tensors, json.loads(json.dumps(structure)))
    assert back["param_groups"][0]["betas"] == (0.8, 0.9)
    for name, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(back["state"][name][key], value)
