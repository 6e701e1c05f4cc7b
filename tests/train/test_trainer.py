"""The trainer: exact resume, explicit resume, masked targets, gradient accumulation, recomputed
blocks, non-finite losses, one host sync per step, checkpoint validation."""
import json
import math
import shutil
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import rnnlab
from rnnlab.train import CheckpointError, NonFiniteLossError, RunExistsError, TrainConfig, load_checkpoint, train


class Source:
    """Random (x, y) batches over 16 symbols; every third target unscored (-100)."""

    def __init__(self, batch=4, T=16, seed=0, mask=True):
        self.g, self.batch, self.T, self.mask, self.n = torch.Generator().manual_seed(seed), batch, T, mask, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        t = torch.randint(0, 16, (self.batch, self.T + 1), generator=self.g)
        x, y = t[:, :-1], t[:, 1:].clone()
        if self.mask:
            y[:, ::3] = -100
        return x, y

    def state_dict(self):
        return {"generator": self.g.get_state(), "n": self.n}

    def load_state_dict(self, s):
        self.g.set_state(s["generator"])
        self.n = s["n"]


def model(seed=0, layout="gated_deltanet,attention"):
    torch.manual_seed(seed)
    return rnnlab.build_model(layout=layout, n_layers=2, d_model=32)


def cfg(out, **kw):
    base = dict(steps=12, batch_size=4, seq_len=16, warmup=2, eval_every=0, save_every=4, out_dir=str(out))
    return TrainConfig(**{**base, **kw})


def weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_resume_is_bit_identical_and_metrics_hold_each_step_once(tmp_path):
    whole = model()
    train(whole, Source(), cfg(tmp_path / "a"), progress=False)
    part = model()
    r = train(part, Source(), cfg(tmp_path / "b", steps=12, max_seconds=1e-9), progress=False)
    assert r["step"] == 1 and r["checkpoint"].endswith("step_00000001")
    fresh = model(seed=5)  # other initial weights: all of them come from the checkpoint
    r = train(fresh, Source(seed=9), cfg(tmp_path / "b", resume=True), progress=False)
    assert r["step"] == 12
    for k, v in weights(whole).items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert kept == ["latest", "step_00000004", "step_00000008", "step_00000012"]  # keep_last=3 (step 0 went)
    loaded = rnnlab.load_model(tmp_path / "b")  # a run directory loads its latest checkpoint
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_resume_is_explicit(tmp_path):
    train(model(), Source(), cfg(tmp_path, steps=2), progress=False)
    with pytest.raises(RunExistsError, match="--resume"):
        train(model(), Source(), cfg(tmp_path, steps=4), progress=False)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        train(model(), Source(), cfg(tmp_path / "new", resume=True), progress=False)
    other = rnnlab.build_model(layout="gated_deltanet,attention", n_layers=2, d_model=64)
    with pytest.raises(CheckpointError, match="d_model=32 in the checkpoint but 64 now"):
        train(other, Source(), cfg(tmp_path, steps=4, resume=True), progress=False)


def test_masked_positions_do_not_count(tmp_path):
    m, ref = model(), model()
    src = Source(mask=True)
    x, y = next(Source(mask=True))
    train(m, src, cfg(tmp_path, steps=1, warmup=0, out_dir="", grad_clip=0.0, weight_decay=0.0), progress=False)
    opt = torch.optim.AdamW(ref.param_groups(0.0), lr=3e-3, betas=(0.9, 0.95))
    logits, _ = ref(x)
    keep = y != -100
    F.cross_entropy(logits[keep], y[keep]).backward()  # the mean over scored positions only
    opt.step()
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)


class Halves:
    """The batches of a Source cut into two micro-batches each."""

    def __init__(self):
        self.src, self.pending = Source(), []

    def __iter__(self):
        return self

    def __next__(self):
        if not self.pending:
            x, y = next(self.src)
            self.pending = [(x[2:], y[2:]), (x[:2], y[:2])]
        return self.pending.pop()


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """In float64: in float32 the summation order of two half-batches differs from one batch, and
    Adam turns a rounding difference in a near-zero gradient into a full-size step."""
    a, b = model().double(), model().double()
    train(a, Source(), cfg(tmp_path, steps=3, out_dir=""), progress=False)
    train(b, Halves(), cfg(tmp_path, steps=3, out_dir="", grad_accum=2), progress=False)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-9, atol=1e-10, msg=k)


def test_recompute_trains_the_same_weights_and_is_switched_off_after():
    """``recompute=True`` runs each block again in the backward: the same arithmetic, so the same
    weights after training (float64 to keep Adam's steps on near-zero gradients out of it)."""
    a, b = model().double(), model().double()
    train(a, Source(T=32), cfg("", steps=3, seq_len=32), progress=False)
    train(b, Source(T=32), cfg("", steps=3, seq_len=32, recompute=True), progress=False)
    assert b.recompute is False  # the model is left as it was given
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-12, atol=1e-14, msg=k)


def test_ops_backend_compile_trains_the_same_weights_and_is_restored_after():
    """ops_backend="compile": Mamba's selective scan runs its compiled chunks (T = 40: one chunk of
    32 and 8 tokens on the eager path) and training ends where the torch backend's does (float64);
    the preferred backend is "torch" again afterwards."""
    from rnnlab.ops import registry
    a, b = model(layout="mamba").double(), model(layout="mamba").double()
    train(a, Source(T=40), cfg("", steps=2, seq_len=40), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(b, Source(T=40), cfg("", steps=2, seq_len=40, ops_backend="compile"), progress=False)
    assert not [w for w in caught if "unavailable" in str(w.message)]  # the eager remainder runs on torch quietly
    x = registry.get_family("selective_scan").inputs(T=40)
    assert registry.select("selective_scan", **x) == ("chunked", "torch")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-9, atol=1e-11, msg=k)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    m = model()
    calls = {"n": 0}

    def poison(module, args, output):  # the 5th forward pass returns NaN logits
        calls["n"] += 1
        return (output[0] * float("nan"), output[1]) if calls["n"] == 5 else output
    m.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match="step 5.*no update.*step_00000004"):
        train(m, Source(), cfg(tmp_path, steps=8), progress=False)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    saved = load_checkpoint(tmp_path)[1]
    assert all(torch.equal(saved[k], v) for k, v in m.state_dict().items())  # no step was taken with NaN


def test_one_host_sync_per_step(monkeypatch):
    """rnnlab's code reads tensors on the host once per step (``tolist`` of loss, token count and
    gradient norm together); every read of a tensor's value from rnnlab's code is counted here.
    (AdamW's own ``step.item()`` reads a CPU counter, no device sync.)"""
    m = model(layout="gated_deltanet,mamba2")
    calls = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            if "rnnlab" in sys._getframe(1).f_code.co_filename:
                calls["n"] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    # tokens are checked on the host on CPU only (a device-side assert elsewhere): not counted here
    monkeypatch.setattr("rnnlab.models.lm.check_tokens_input", lambda tokens, vocab: None)
    # ops may look at their CPU inputs to skip NaN guards (never on other devices): not counted here
    for module in ("delta", "attention", "lti"):
        monkeypatch.setattr(sys.modules[f"rnnlab.ops.{module}"], "known_finite", lambda *xs: False)
    train(m, Source(), TrainConfig(steps=5, batch_size=4, seq_len=16, warmup=1, eval_every=0), progress=False)
    assert calls["n"] == 5


def test_checkpoints_are_validated(tmp_path):
    train(model(), Source(), cfg(tmp_path, steps=4, keep_last=1), progress=False)
    ck = tmp_path / "checkpoints" / "step_00000004"
    bad = tmp_path / "bad"
    shutil.copytree(ck, bad)
    with open(bad / "model.safetensors", "r+b") as f:  # truncated
        f.truncate(100)
    with pytest.raises(CheckpointError, match="model.safetensors has 100 bytes"):
        load_checkpoint(bad)
    shutil.copytree(ck, bad, dirs_exist_ok=True)
    data = bytearray((bad / "trainer.pt").read_bytes())
    data[-20] ^= 0xFF
    (bad / "trainer.pt").write_bytes(bytes(data))  # same size, other bytes
    with pytest.raises(CheckpointError, match="trainer.pt does not match its SHA-256"):
        load_checkpoint(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_checkpoint(bad)
    (bad / "manifest.json").write_text(json.dumps({"kind": "something.else"}))
    with pytest.raises(CheckpointError, match="not an rnnlab checkpoint"):
        load_checkpoint(bad)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="autocast"):
        TrainConfig(autocast="fp16")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="recompute"):
        TrainConfig(recompute="yes")
    with pytest.raises(ValueError, match="ops_backend"):
        TrainConfig(ops_backend="triton")


def test_bf16_autocast_trains():
    m = model()  # seq_len 32: the short convolutions take their training path (longer than 16 tokens)
    r = train(m, Source(T=32), TrainConfig(steps=3, batch_size=4, seq_len=32, warmup=1, autocast="bf16"), progress=False)
    assert math.isfinite(r["loss"]) and r["mfu"] > 0 and r["tokens_per_s"] > 0


def test_cli_trains_with_a_tokenizer_json_and_generates(tmp_path, capsys):
    """A user's own text and tokenizer: train from the command line, then generate through the run's copy."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from rnnlab.cli import main
    text = "".join(f"def function_{i}(x):\n    return x * {i}\n" for i in range(300))
    (tmp_path / "code.py").write_text(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    out = tmp_path / "run"
    main(["train", "--layout", "mamba2", "--n-layers", "1", "--d-model", "32", "--seq-len", "16", "--batch-size", "2",
          "--steps", "2", "--data", str(tmp_path / "code.py"), "--tokenizer", str(tmp_path / "tok"), "--out", str(out)])
    model = rnnlab.load_model(out)
    assert model.config.vocab_size == tok.get_vocab_size()
    assert (out / "tokenizer.json").is_file()
    capsys.readouterr()
    text_out = main(["generate", "--model", str(out), "--prompt", "def", "--max-new-tokens", "5", "--temperature", "0"])
    assert isinstance(text_out, str) and len(text_out) > 0
