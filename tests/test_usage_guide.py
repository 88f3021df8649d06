"""Acceptance tests: every workflow of the users' usage guide (/work/shared/reference/mamba-skill.md) runs with
mambakit after replacing ``mamba_ssm`` by ``mambakit`` in the imports, on CPU ("cuda" -> "cpu", sizes shrunk).

Each test is one snippet of the guide, written the way a user would write it, then checked: shapes, finite
values, losses that go down, generated lengths and prompts kept as prefixes, checkpoints that give back the same
logits. Where the guide's snippet cannot run as printed (a bare ``Mamba`` block fed token ids, a ``MambaLM`` class
it never defines), the test runs the smallest fix and docs/migrating.md says why.
"""

import dataclasses
import importlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

# The guide's imports, with mamba_ssm -> mambakit.
from mambakit import Mamba, Mamba2
from mambakit.models.config_mamba import MambaConfig
from mambakit.models.mixer_seq_simple import MambaLMHeadModel

DEVICE = "cpu"


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and on a loaded 2-core machine OpenMP barriers between two
    threads cost more than the work (tens of ms per tiny conv)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_lm(layer="Mamba1", vocab_size=64, d_model=32, n_layer=2, dtype=None, **ssm):
    ssm_cfg = dict(layer=layer, **ssm)
    if layer == "Mamba2":
        ssm_cfg.setdefault("headdim", 16)
        ssm_cfg.setdefault("d_state", 16)
        ssm_cfg.setdefault("chunk_size", 16)
    config = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size, ssm_cfg=ssm_cfg)
    return MambaLMHeadModel(config, device=DEVICE, dtype=dtype)


def lm_loss(model, ids):
    """Next-token cross-entropy, written with the official forward only (it has no ``labels`` argument)."""
    logits = model(ids).logits
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))


def pattern_batches(n, batch=4, seqlen=32, vocab=64, seed=0):
    """Learnable token streams: each row counts up from a random start modulo a small period."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        out.append((start + torch.arange(seqlen)) % 16 + (start % 4) * 16)
    return out


# ---- Basic usage -------------------------------------------------------------------------------------------

def test_basic_mamba_block():
    batch, length, dim = 2, 64, 16
    x = torch.randn(batch, length, dim).to(DEVICE)

    model = Mamba(
        d_model=dim,  # Model dimension
        d_state=16,  # SSM state dimension
        d_conv=4,  # Conv1d kernel size
        expand=2,  # Expansion factor
    ).to(DEVICE)

    y = model(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    # Causal: the first half of the output does not depend on the second half of the input.
    x2 = x.clone()
    x2[:, length // 2:] = torch.randn(batch, length - length // 2, dim)
    torch.testing.assert_close(model(x2)[:, : length // 2], y[:, : length // 2])
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- Workflow 1: Mamba-2 language model with generation -----------------------------------------------------

def test_workflow1_mamba2_lm_generate():
    config = MambaConfig(
        d_model=64,  # guide: 1024
        n_layer=2,  # guide: 24
        vocab_size=50277,
        ssm_cfg=dict(layer="Mamba2", d_state=128, headdim=64, ngroups=1),
    )
    model = MambaLMHeadModel(config, device=DEVICE, dtype=torch.float16)

    input_ids = torch.randint(0, 1000, (1, 20), device=DEVICE, dtype=torch.long)
    output = model.generate(input_ids=input_ids, max_length=100, temperature=0.7, top_p=0.9)

    assert output.shape == (1, 100) and output.dtype == torch.long
    assert torch.equal(output[:, :20], input_ids)  # the prompt is a prefix
    assert int(output.max()) < config.vocab_size  # never a padding row of the 50280-row embedding
    assert model.backbone.embedding.weight.shape[0] == 50280
    # As in mamba_ssm, top_k defaults to 1 = greedy, so temperature/top_p change nothing (docs/migrating.md):
    torch.manual_seed(123)
    assert torch.equal(model.generate(input_ids=input_ids, max_length=100), output)
    # The greedy tokens are the argmax of a full forward pass (decode steps agree with the parallel scan).
    # generate() returns inference-mode tensors (as mamba_ssm's decode does): use them under no_grad.
    with torch.no_grad():
        logits = model(output[:, :-1]).logits.float()
    agree = (logits[0, 19:].argmax(-1) == output[0, 20:]).float().mean()
    assert agree >= 0.9, agree  # fp16: near-ties may flip a few
    # Sampling needs top_k=0 (or do_sample=True); then the seed matters.
    s1 = model.generate(input_ids, max_length=40, top_k=0, temperature=0.7, top_p=0.9,
                        generator=torch.Generator().manual_seed(1))
    s2 = model.generate(input_ids, max_length=40, top_k=0, temperature=0.7, top_p=0.9,
                        generator=torch.Generator().manual_seed(2))
    assert s1.shape == s2.shape == (1, 40) and not torch.equal(s1, s2)
    assert torch.equal(s1[:, :20], input_ids)


# ---- Workflow 2: pretrained model + tokenizer + generate(repetition_penalty) -----------------------------------

PROMPT = "The future of AI is"
CORPUS = [
    "The future of AI is bright and the future of state space models is long.",
    "Mamba is a selective state space model with linear time in the sequence length.",
    "Language models predict the next token from the tokens before it.",
] * 4


def build_tokenizer_json(path):
    """A byte-level BPE tokenizer (GPT-NeoX style) trained on a few sentences, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A small Mamba-1 checkpoint saved like the state-spaces repos, with a tokenizer.json beside it."""
    directory = tmp_path_factory.mktemp("mamba-tiny")
    vocab = build_tokenizer_json(directory / "tokenizer.json")
    torch.manual_seed(0)
    saved = tiny_lm("Mamba1", vocab_size=vocab, d_model=32, n_layer=2).eval()
    saved.save_pretrained(str(directory))
    return directory, saved


def test_workflow2_from_pretrained_generate_decode(pretrained_dir):
    from mambakit.tokenizer import load_tokenizer

    model_name, saved = pretrained_dir
    model_name = str(model_name)
    # guide: AutoTokenizer.from_pretrained("EleutherAI/gpt-neox-20b"); offline we read our tokenizer.json
    tokenizer = load_tokenizer(model_name)
    model = MambaLMHeadModel.from_pretrained(model_name, device=DEVICE, dtype=torch.float16)

    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(DEVICE)
    output_ids = model.generate(input_ids=input_ids, max_length=60, temperature=0.7, top_p=0.9,
                                repetition_penalty=1.2)
    generated_text = tokenizer.decode(output_ids[0])

    n = input_ids.shape[1]
    assert output_ids.shape == (1, 60) and torch.equal(output_ids[:, :n], input_ids)
    assert generated_text.startswith(PROMPT) and len(generated_text) > len(PROMPT)
    # dtype=float16 as in mamba_ssm: weights in fp16, A_log and D kept in fp32.
    assert model.lm_head.weight.dtype == torch.float16
    assert model.backbone.layers[0].mixer.A_log.dtype == torch.float32
    # The loaded model computes what the saved one did (fp32 exactly, fp16 closely).
    ids = torch.randint(0, saved.config.vocab_size, (2, 24))
    ref = saved(ids).logits
    exact = MambaLMHeadModel.from_pretrained(model_name)  # "Common issues" call: fp32, CPU
    assert torch.equal(exact(ids).logits, ref)
    half = model(ids).logits.float()
    assert torch.isfinite(half).all()
    assert (half - ref).norm() / ref.norm() < 2e-2


def test_workflow2_repetition_penalty_matches_reference(pretrained_dir):
    """Greedy decoding with the CTRL repetition penalty (every token already in the row, prompt included)."""
    model_name, _ = pretrained_dir
    model = MambaLMHeadModel.from_pretrained(str(model_name), device=DEVICE, dtype=torch.float32)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 6))
    out = model.generate(input_ids=input_ids, max_length=24, repetition_penalty=1.2)
    seq = input_ids
    with torch.no_grad():
        while seq.shape[1] < 24:
            logits = model(seq).logits[0, -1, : model.config.vocab_size].clone()
            seen = seq[0].unique()
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / 1.2, logits[seen] * 1.2)
            seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
    assert torch.equal(out, seq)


def test_workflow2_transformers_tokenizer_ids(pretrained_dir):
    """transformers' PreTrainedTokenizerFast on the same tokenizer.json: same ids, usable as generate input."""
    transformers = pytest.importorskip("transformers")
    from mambakit.tokenizer import load_tokenizer

    directory, _ = pretrained_dir
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    ours = load_tokenizer(str(directory))
    hf_ids = hf_tok(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(hf_ids, ours(PROMPT, return_tensors="pt").input_ids)

    model = MambaLMHeadModel.from_pretrained(str(directory), device=DEVICE, dtype=torch.float32)
    out = model.generate(input_ids=hf_ids, max_length=30, repetition_penalty=1.2)
    assert out.shape == (1, 30) and torch.equal(out[:, : hf_ids.shape[1]], hf_ids)
    assert hf_tok.decode(out[0]) == ours.decode(out[0])
    assert hf_tok.decode(out[0]).startswith(PROMPT)
    # The guide's AutoTokenizer call works on the checkpoint directory too.
    auto = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert torch.equal(auto(PROMPT, return_tensors="pt").input_ids, hf_ids)


# ---- Workflow 3: Mamba-1 vs Mamba-2 blocks --------------------------------------------------------------------

MAMBA1_KEYS = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
               "dt_proj.bias", "A_log", "D", "out_proj.weight"}
MAMBA2_KEYS = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
               "out_proj.weight"}


def test_workflow3_mamba1_vs_mamba2():
    mamba1 = Mamba(
        d_model=256,
        d_state=16,  # Smaller state dimension
        d_conv=4,
        expand=2,
    ).to(DEVICE)
    mamba2 = Mamba2(
        d_model=256,
        d_state=128,  # Larger state dimension
        d_conv=4,
        expand=2,
        headdim=64,  # Head dimension for multi-head
        ngroups=1,  # Parallel groups
    ).to(DEVICE)

    x = torch.randn(2, 40, 256, device=DEVICE)
    for model in (mamba1, mamba2):
        y = model(x)
        assert y.shape == x.shape and torch.isfinite(y).all()

    # Same parameter names and sizes as mamba_ssm, so official checkpoints load (d_inner 512, dt_rank 16,
    # Mamba-2: 8 heads, conv over x, B, C = 512 + 2 * 128 channels, in_proj to z, xBC, dt = 1288).
    assert set(mamba1.state_dict()) == MAMBA1_KEYS and set(mamba2.state_dict()) == MAMBA2_KEYS
    n1 = 256 * 1024 + (512 * 4 + 512) + 512 * (16 + 32) + (16 * 512 + 512) + 512 * 16 + 512 + 512 * 256
    n2 = 256 * 1288 + (768 * 4 + 768) + 3 * 8 + 512 + 512 * 256
    assert sum(p.numel() for p in mamba1.parameters()) == n1
    assert sum(p.numel() for p in mamba2.parameters()) == n2
    assert mamba2.nheads == 8 and mamba2.headdim == 64
    # "State size": the recurrent state per sequence is fixed, (d_inner, d_state) vs (nheads, headdim, d_state).
    conv1, ssm1 = mamba1.allocate_inference_cache(batch_size=1, max_seqlen=10_000)
    conv2, ssm2 = mamba2.allocate_inference_cache(batch_size=1, max_seqlen=10_000)
    assert ssm1.shape == (1, 512, 16) and ssm2.shape == (1, 8, 64, 128)
    assert conv1.shape == (1, 512, 4) and conv2.shape == (1, 768, 4)
    # "Normalization: Mamba-2 uses RMSNorm": a gated RMSNorm inside the mixer, which Mamba-1 does not have.
    assert hasattr(mamba2, "norm") and not hasattr(mamba1, "norm")


def test_mamba1_core_parameters_and_init():
    """references/architecture-details.md, "Core Parameters": every argument is accepted; the init is the
    official one (not the guide's "Initialization Strategy" sketch, see docs/migrating.md)."""
    model = Mamba(
        d_model=256,  # Hidden dimension (256, 512, 768, 1024, 2048)
        d_state=16,  # SSM state dimension
        d_conv=4,  # Local convolution width (4 is standard)
        expand=2,  # Expansion factor (1.5-2.0)
        dt_rank="auto",  # Rank of delta projection (auto = ceil(d_model / 16))
        dt_min=0.001,  # Min delta init (controls forgetting rate)
        dt_max=0.1,  # Max delta init
        dt_init="random",  # delta initialization (random, constant)
        dt_scale=1.0,  # delta scaling factor
        conv_bias=True,  # Use bias in convolution
        bias=False,  # Use bias in linear projections
    )
    assert model.dt_rank == 16 and model.d_inner == 512
    assert model.x_proj.weight.shape == (16 + 2 * 16, 512)  # B and C come from x_proj, per token
    assert model.in_proj.bias is None and model.conv1d.bias is not None
    dt = F.softplus(model.dt_proj.bias.detach())  # the bias is inverse-softplus of dt ~ logU[dt_min, dt_max]
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    A = -torch.exp(model.A_log.detach())  # S4D-real: A[:, n] = -(n + 1), the same for every channel
    torch.testing.assert_close(A, -torch.arange(1, 17, dtype=torch.float32).expand(512, 16))
    y = model(torch.randn(1, 24, 256))
    assert y.shape == (1, 24, 256) and torch.isfinite(y).all()


# ---- Common issues: gradient_checkpointing_enable() ------------------------------------------------------------

def count_mixer_calls(model):
    calls = []
    for layer in model.backbone.layers:
        layer.mixer.register_forward_pre_hook(lambda *a: calls.append(1))  # recomputation may stop early
    return calls


def test_gradient_checkpointing_enable():
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg=dict(layer="Mamba2", headdim=16,
                                                                           d_state=16, chunk_size=16))
    model = MambaLMHeadModel(config, device=DEVICE, dtype=torch.float32)  # guide: cuda, float16
    reference = MambaLMHeadModel(config, device=DEVICE, dtype=torch.float32)
    reference.load_state_dict(model.state_dict())
    model.gradient_checkpointing_enable()  # Enable checkpointing

    ids = pattern_batches(1)[0]
    calls = count_mixer_calls(model)
    loss = lm_loss(model.train(), ids)
    loss.backward()
    assert len(calls) == 2 * config.n_layer  # each mixer ran again in the backward pass
    ref_loss = lm_loss(reference.train(), ids)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # Inference is unaffected.
    with torch.no_grad():
        model.eval()
        out = model.generate(ids[:1, :8], max_length=16)
    assert out.shape == (1, 16)


# ---- Training guide ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
@pytest.mark.parametrize("precision", ["bf16", "fp16-scaler"])
def test_training_loop_adamw_clip_autocast(layer, precision):
    """Basic training loop with the BF16 snippet, or the FP16 snippet with a GradScaler. The guide feeds token
    ids to a bare Mamba block and takes logits over a vocabulary from it; a block maps (b, l, d) -> (b, l, d),
    so the language model is used."""
    model = tiny_lm(layer, vocab_size=64)
    vocab_size = model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)  # guide 6e-4
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(DEVICE, enabled=precision == "fp16-scaler")  # guide: torch.cuda.amp
    dataloader = [(ids[:, :-1], ids[:, 1:]) for ids in pattern_batches(1) * 10]

    losses = []
    for batch in dataloader:
        inputs, targets = batch
        inputs, targets = inputs.to(DEVICE), targets.to(DEVICE)
        with torch.autocast(DEVICE, dtype=dtype):  # guide: torch.cuda.amp.autocast(dtype=...)
            logits = model(inputs).logits
            loss = F.cross_entropy(logits.view(-1, vocab_size).float(), targets.reshape(-1))
        assert logits.dtype == dtype and logits.shape == (*inputs.shape, vocab_size)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        assert torch.isfinite(grad_norm)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())

    assert all(math.isfinite(v) for v in losses)
    assert losses[0] > math.log(vocab_size) * 0.8  # starts near chance
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights


def test_training_weight_decay_exemptions():
    model = tiny_lm("Mamba2")
    decay = set()
    no_decay = set()
    for name, param in model.named_parameters():
        if "norm" in name or "bias" in name:
            no_decay.add(param)
        else:
            decay.add(param)
    optimizer = torch.optim.AdamW([
        {"params": list(decay), "weight_decay": 0.1},
        {"params": list(no_decay), "weight_decay": 0.0},
    ], lr=6e-4, betas=(0.9, 0.95))

    params = list(model.parameters())
    assert len(decay) + len(no_decay) == len(params) and not decay & no_decay
    # The name rule exempts norms and biases (dt_bias, conv1d.bias) ...
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = [names[id(p)] for p in no_decay]
    for suffix in ("layers.0.norm.weight", "mixer.norm.weight", "mixer.dt_bias", "conv1d.bias", "norm_f.weight"):
        assert any(n.endswith(suffix) for n in exempt), suffix
    # ... but not A_log and D, which mambakit (like mamba_ssm) marks with _no_weight_decay (docs/migrating.md).
    decayed = {names[id(p)].rsplit(".", 1)[-1] for p in decay}
    assert {"A_log", "D"} <= decayed
    assert all(getattr(p, "_no_weight_decay", False) for n, p in model.named_parameters()
               if n.endswith((".A_log", ".D")))
    before = [p.detach().clone() for p in params]
    ids = pattern_batches(1)[0]
    loss = lm_loss(model, ids)
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params) if p.grad is not None and p.grad.any())


def test_training_gradient_accumulation():
    model = tiny_lm("Mamba1")
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    accumulation_steps = 4  # guide: 8
    dataloader = pattern_batches(accumulation_steps, batch=2)

    def compute_loss(model, batch):
        return lm_loss(model, batch)

    # Reference: the gradient of the mean loss over all micro-batches, in one backward.
    full = sum(compute_loss(model, b) for b in dataloader) / accumulation_steps
    expected = torch.autograd.grad(full, list(model.parameters()))
    expected_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected]))
    clip = min(1.0, 1.0 / (float(expected_norm) + 1e-6))
    before = [p.detach().clone() for p in model.parameters()]

    optimizer.zero_grad()
    for i, batch in enumerate(dataloader):
        loss = compute_loss(model, batch) / accumulation_steps
        loss.backward()
        if (i + 1) % accumulation_steps == 0:
            for p, g in zip(model.parameters(), expected):  # accumulated == full-batch gradient
                torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for p, g in zip(model.parameters(), expected):
                torch.testing.assert_close(p.grad, g * clip, rtol=1e-4, atol=1e-6)
            optimizer.step()
            optimizer.zero_grad()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_training_gradient_checkpointing_around_mamba_block():
    from torch.utils.checkpoint import checkpoint

    from mambakit.ops import RMSNorm  # mamba_ssm: from mamba_ssm.ops.triton.layer_norm import RMSNorm

    class MambaBlock(nn.Module):
        def __init__(self, d_model, use_checkpoint=False):
            super().__init__()
            self.use_checkpoint = use_checkpoint
            self.norm = RMSNorm(d_model)
            self.mamba = Mamba(d_model)

        def forward(self, x):
            if self.use_checkpoint and self.training:
                return x + checkpoint(self._forward, x, use_reentrant=False)
            return x + self._forward(x)

        def _forward(self, x):
            return self.mamba(self.norm(x))

    torch.manual_seed(0)
    blocks = nn.Sequential(*[MambaBlock(32, use_checkpoint=True) for _ in range(2)])
    plain = nn.Sequential(*[MambaBlock(32, use_checkpoint=False) for _ in range(2)])
    plain.load_state_dict(blocks.state_dict())
    calls = []
    for b in blocks:
        b.mamba.register_forward_pre_hook(lambda *a: calls.append(1))  # recomputation may stop early

    x = torch.randn(2, 48, 32)
    y = blocks.train()(x)
    y.square().mean().backward()
    assert len(calls) == 4  # forward + recomputation in backward, per block
    y_ref = plain.train()(x)
    y_ref.square().mean().backward()
    torch.testing.assert_close(y, y_ref)
    for (name, p), q in zip(blocks.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


# ---- Distributed (DDP), world size 1 with gloo ----------------------------------------------------------------

def test_ddp_one_step(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Mamba(d_model=32, d_state=16, d_conv=4, expand=2).to(DEVICE)
        single = Mamba(d_model=32, d_state=16, d_conv=4, expand=2).to(DEVICE)
        single.load_state_dict(model.state_dict())
        model = DDP(model)  # guide: device_ids=[local_rank] on GPUs

        optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4)
        x = torch.randn(2, 40, 32)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        single(x).square().mean().backward()
        for (name, p), q in zip(model.module.named_parameters(), single.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert all(torch.isfinite(p).all() for p in model.parameters())
    finally:
        dist.destroy_process_group()


# ---- Save / load a training checkpoint --------------------------------------------------------------------------

@pytest.mark.parametrize("config_form", [
    "dict",
    "object",  # MambaConfig is allow-listed for torch.load(weights_only=True)
])
def test_save_load_training_checkpoint(tmp_path, config_form):
    torch.manual_seed(0)
    model = tiny_lm("Mamba2")
    model_config = model.config if config_form == "object" else dataclasses.asdict(model.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    batches = pattern_batches(3)
    for ids in batches[:2]:
        optimizer.zero_grad()
        lm_loss(model, ids).backward()
        optimizer.step()
    iteration = 2

    # Save
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iter": iteration,
        "config": model_config,
    }
    torch.save(checkpoint, tmp_path / f"checkpoint_{iteration}.pt")

    # Load (into a fresh model and optimizer, as after a restart)
    checkpoint = torch.load(tmp_path / f"checkpoint_{iteration}.pt")
    config = checkpoint["config"]
    restored = MambaLMHeadModel(config if isinstance(config, MambaConfig) else MambaConfig(**config), device=DEVICE)
    restored_opt = torch.optim.AdamW(restored.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    restored.load_state_dict(checkpoint["model"])
    restored_opt.load_state_dict(checkpoint["optimizer"])
    assert checkpoint["iter"] == 2

    ids = batches[2]
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, model(ids).logits)
    # One more step from the restored state equals one more step from the original.
    for m, opt in ((model, optimizer), (restored, restored_opt)):
        opt.zero_grad()
        lm_loss(m, ids).backward()
        opt.step()
    for (name, p), q in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(p, q), name
    assert restored.lm_head.weight is restored.backbone.embedding.weight  # still tied


# ---- Official import paths ------------------------------------------------------------------------------------

PRESENT = [
    ("mambakit", ["Mamba", "Mamba2", "MambaLMHeadModel"]),
    ("mambakit.modules.mamba_simple", ["Mamba"]),
    ("mambakit.modules.mamba2", ["Mamba2"]),
    ("mambakit.modules.block", ["Block"]),
    ("mambakit.modules.mlp", ["GatedMLP"]),
    ("mambakit.models.mixer_seq_simple", ["MambaLMHeadModel", "MixerModel", "create_block"]),
    ("mambakit.models.config_mamba", ["MambaConfig"]),
    ("mambakit.ops.selective_scan_interface", ["selective_scan_fn", "selective_scan_ref"]),
    ("mambakit.utils.generation", ["InferenceParams", "decode", "sample", "modify_logit_for_repetition_penalty"]),
    ("mambakit", ["selective_scan_fn"]),
    ("mambakit.ops.selective_scan_interface", ["mamba_inner_fn", "mamba_inner_ref"]),
    ("mambakit.ops.triton.ssd_combined", ["mamba_chunk_scan_combined"]),
    ("mambakit.ops.triton.selective_state_update", ["selective_state_update"]),
    ("mambakit.ops.triton.layernorm_gated", ["RMSNorm", "rmsnorm_fn"]),
    ("mambakit.ops.triton.layer_norm", ["RMSNorm", "rms_norm_fn"]),
    ("mambakit.modules.mha", ["MHA"]),
]
# Official module paths that mamba_ssm users import and mambakit does not have yet (aliases the lead owns).


def _has(module, names):
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"


@pytest.mark.parametrize("module,names", PRESENT, ids=[m for m, _ in PRESENT])
def test_official_import_path(module, names):
    _has(module, names)


def test_mamba_inner_fn_equals_the_mixer():
    """The official fused-entry function gives the Mamba module's output on the module's weights."""
    from mambakit.modules.mamba_simple import Mamba
    from mambakit.ops.selective_scan_interface import mamba_inner_fn

    torch.manual_seed(0)
    m = Mamba(d_model=16, d_state=4)
    x = torch.randn(2, 9, 16)
    xz = m.in_proj(x).transpose(1, 2)
    out = mamba_inner_fn(xz, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight,
                         m.out_proj.weight, m.out_proj.bias, -torch.exp(m.A_log.float()), D=m.D.float(),
                         delta_bias=m.dt_proj.bias.float(), delta_softplus=True)
    torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-6)
