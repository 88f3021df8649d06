"""The model shipped in the package: it loads offline, is small, is trained, and `mambakit generate` uses it."""

import json
import math
import os
import subprocess
import sys

import torch

from mambakit import MambaLMHeadModel
from mambakit.hub import default_model_path
from mambakit.tokenizer import load_tokenizer

# Not from the training corpus (the standard library): written for this test.
SNIPPET = '''import os


def read_lines(path, encoding="utf-8"):
    """Return the lines of a text file without their line endings."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    with open(path, encoding=encoding) as f:
        return [line.rstrip("\\n") for line in f]


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key, n=1):
        self.counts[key] = self.counts.get(key, 0) + n
        return self.counts[key]
'''


def test_shipped_files_are_small_and_finite():
    path = default_model_path()
    assert {p.name for p in path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert (path / "model.safetensors").stat().st_size <= 15e6
    config = json.loads((path / "config.json").read_text())
    assert config["ssm_cfg"]["layer"] == "Mamba2"
    model = MambaLMHeadModel.from_pretrained(str(path), dtype=torch.float32)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_shipped_model_predicts_unseen_python_code():
    """Mean loss on code it never saw is far below a uniform guess (ln 8192 = 9.0 nats) and below a
    unigram model (about 6.7 nats on held-out stdlib files): the weights are trained, not random."""
    path = str(default_model_path())
    model = MambaLMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    tok = load_tokenizer(path)
    ids = torch.tensor([tok.encode(SNIPPET)])
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert float(nll) < 4.0, f"mean loss {float(nll):.2f} nats/token (uniform {math.log(8192):.2f})"


def test_cli_generate_without_model_runs_offline():
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    prompt = "def read_config(path):"
    out = subprocess.run([sys.executable, "-m", "mambakit", "generate", prompt, "--max-new-tokens", "24",
                          "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(prompt)
    assert len(out.stdout) > len(prompt) + 20  # 24 tokens of continuation
