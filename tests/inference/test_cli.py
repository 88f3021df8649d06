"""`mambakit generate` end to end on a tiny model directory (config.json, model.safetensors, tokenizer.json)."""
import os
import subprocess
import sys

import pytest
import torch
from gen_helpers import build

from mambakit.hub import load_pretrained
from mambakit.inference import cli
from mambakit.inference.generate import generate
from mambakit.models.lm import MambaLMHeadModel
from mambakit.tokenizer import load_tokenizer

TOKENIZER_VOCAB = 50  # smaller than the model's 60 (+4 padding rows): ids 50..63 must never come out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    path = tmp_path_factory.mktemp("tiny_model")
    model = build("mamba2", dtype=torch.float32)
    with torch.no_grad():  # ids the tokenizer lacks get the largest logits: only the vocabulary mask stops them
        model.lm_head.weight[TOKENIZER_VOCAB:] = model.lm_head.weight[:TOKENIZER_VOCAB].mean(0) * 1e3
    model.save_pretrained(path)
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, TOKENIZER_VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


def expected_text(model_dir, prompt: str, n: int) -> str:
    model = load_pretrained(MambaLMHeadModel, str(model_dir), device="cpu", dtype=torch.float32)
    tok = load_tokenizer(str(model_dir))
    ids = generate(model, torch.tensor([tok.encode(prompt)]), max_new_tokens=n, eos_token_id=tok.eos_token_id,
                   vocab_size=tok.vocab_size)
    assert int(ids.max()) < TOKENIZER_VOCAB
    return tok.decode(ids[0])


def test_cli_streams_the_greedy_continuation(model_dir, capsys):
    assert cli.main(["w3 w7 w1", "--model", str(model_dir), "--max-new-tokens", "6", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out == expected_text(model_dir, "w3 w7 w1", 6) + "\n"


def test_cli_sampling_is_seeded(model_dir, capsys):
    args = ["w2 w2", "--model", str(model_dir), "--max-new-tokens", "8", "--device", "cpu", "--top-p", "0.9",
            "--temperature", "1.5", "--seed", "3", "--no-echo", "--prefill-chunk-size", "1"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first and first.strip()


def test_cli_as_a_command(model_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "mambakit", "generate", "w5 w6", "--model", str(model_dir),
                          "--max-new-tokens", "4", "--device", "cpu"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected_text(model_dir, "w5 w6", 4) + "\n"


@pytest.mark.parametrize("argv, message", [
    (["", "--max-new-tokens", "3"], "empty prompt"),
    (["w1", "--top-p", "2"], "top_p must be"),
    (["w1", "--temperature", "0"], "temperature must be > 0"),
    (["w1", "--top-k", "-3"], "top_k must be"),
    (["w1", "--min-p", "1.5"], "min_p must be"),
])
def test_cli_bad_input_is_a_clear_error(model_dir, capsys, argv, message):
    assert cli.main(argv + ["--model", str(model_dir), "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_every_flag_has_help(capsys):
    parser = cli.build_parser()
    assert all(a.help for a in parser._actions)
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--min-p",
                 "--repetition-penalty", "--seed", "--device", "--dtype", "--prefill-chunk-size", "--cg"):
        assert flag in text
