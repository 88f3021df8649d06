"""`mambakit bench`: every sub-command runs end to end on CPU with --small and writes valid JSON; the
cpu-vs-hf comparison really runs the same weights on both sides."""

import json
import os

import pytest
import torch

from mambakit import bench
from mambakit.benchmarks.common import Record
from mambakit.benchmarks.models import build_mamba, hf_twin, mamba_config

SUBCOMMANDS = ["cpu-vs-hf", "kernels", "generate", "scaling", "train"]
NEEDS_TRANSFORMERS = {"cpu-vs-hf", "generate", "scaling"}


def _has_generate() -> bool:
    try:
        import mambakit.inference.generate  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench"))


@pytest.mark.parametrize("what", SUBCOMMANDS)
def test_subcommand_writes_json(what, out_dir, capsys):
    if what in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    assert bench.main([what, "--small", "--threads", "1", "--no-plots", "--out", out_dir]) == 0
    name = what.replace("-", "_")
    with open(os.path.join(out_dir, f"{name}.json"), encoding="utf-8") as f:
        payload = json.load(f)
    assert payload["benchmark"] == name
    for key in ("device", "torch", "triton", "transformers", "mambakit"):
        assert key in payload["env"]
    assert payload["settings"]["small"] is True
    assert payload["results"], payload["errors"]
    # Measurements that need generation may fail only while generation is not written yet.
    allowed = not _has_generate() and what in ("cpu-vs-hf", "generate")
    assert allowed or not payload["errors"], payload["errors"]
    printed = capsys.readouterr().out
    assert "results:" in printed


def test_cpu_vs_hf_same_weights_and_ratios(out_dir):
    pytest.importorskip("transformers")
    path = os.path.join(out_dir, "cpu_vs_hf.json")
    if not os.path.exists(path):
        bench.main(["cpu-vs-hf", "--small", "--threads", "1", "--no-plots", "--out", out_dir])
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)["results"]
    forward = [r for r in rows if r["measure"].startswith("forward")]
    assert {r["layer"] for r in forward} == {"Mamba1", "Mamba2"}
    for r in forward:
        assert r["logits_rel_err"] <= 1e-4
        assert r["speedup"] == pytest.approx(r["transformers_ms"] / r["mambakit_ms"])
    for r in rows:
        if "same_tokens" in r:
            assert r["same_tokens"], "greedy decoding of the same weights must give the same tokens"


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_hf_twin_holds_the_same_weights(layer):
    pytest.importorskip("transformers")
    ssm = {"headdim": 16, "d_state": 8, "chunk_size": 16} if layer == "Mamba2" else {"d_state": 8}
    model = build_mamba(mamba_config(layer, 32, 2, 64, **ssm), torch.device("cpu"), torch.float32)
    hf = hf_twin(model)
    ids = torch.randint(0, 64, (2, 37))  # not a multiple of the chunk
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids, use_cache=False).logits
        assert (ours - theirs).norm() / theirs.norm() < 1e-5
        # and the check notices a different weight
        hf.backbone.layers[1].mixer.D.add_(0.5)
        theirs = hf(ids, use_cache=False).logits
    assert (ours - theirs).norm() / theirs.norm() > 1e-3


def test_failed_measurement_is_recorded_and_the_rest_goes_on():
    rec = Record("x", torch.device("cpu"), {})
    assert rec.attempt("bad", lambda: 1 / 0) is None
    assert rec.attempt("good", lambda: 3) == 3
    assert [e["what"] for e in rec.errors] == ["bad"]
    assert "ZeroDivisionError" in rec.errors[0]["error"]
    assert json.dumps(rec.payload())  # serialisable


def test_summary_and_plot_read_a_results_folder(out_dir, capsys):
    bench.main(["kernels", "--small", "--threads", "1", "--no-plots", "--ops", "causal_conv1d", "--out", out_dir,
                "--name", "kernels_conv"])
    assert bench.main(["summary", out_dir]) == 0
    assert "causal_conv1d" in capsys.readouterr().out
    assert bench.main(["plot", out_dir]) == 0
    assert bench.main(["summary", os.path.join(out_dir, "missing")]) == 1
