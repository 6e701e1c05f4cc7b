"""Hugging Face interop: logits and greedy generation equal transformers' on the same weights."""
import json

import pytest
import torch

import rnnlab
from rnnlab.models.hf import from_hf, load_tokenizer, to_hf

transformers = pytest.importorskip("transformers")


def _llama(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0, **kw)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.save_pretrained(tmp_path / "hf")
    return m


@pytest.mark.parametrize("tied", [False, True])
def test_llama_logits_match_both_ways(tmp_path, tied):
    hf = _llama(tmp_path, tie_word_embeddings=tied)
    ours = from_hf(tmp_path / "hf")
    x = torch.randint(0, 120, (2, 40))
    with torch.no_grad():
        ref = hf(x).logits
        got, _ = ours(x)
    assert (got - ref).abs().max() < 1e-5  # float32, CPU: measured ~1e-7
    to_hf(ours, tmp_path / "back")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (again(x).logits - ref).abs().max() < 1e-5


def test_llama_greedy_generation_matches(tmp_path):
    hf = _llama(tmp_path)
    ours = from_hf(tmp_path / "hf")
    prompt = torch.randint(0, 120, (1, 6))
    ref = hf.generate(prompt, max_new_tokens=50, do_sample=False, min_new_tokens=50)[0, 6:]
    got = ours.generate(prompt, 50, temperature=0)[0]
    assert torch.equal(got, ref)


def test_unsupported_and_unmappable(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        from_hf(d)
    _llama(tmp_path)
    from safetensors.torch import load_file, save_file
    f = tmp_path / "hf" / "model.safetensors"
    t = load_file(f)
    t["model.layers.0.self_attn.rotary_extra.weight"] = torch.zeros(1)
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="rotary_extra"):
        from_hf(tmp_path / "hf")
    swa = rnnlab.build_model(layout="swa(window=4)", n_layers=1, d_model=32)
    with pytest.raises(ValueError, match="no Hugging Face architecture"):
        to_hf(swa, tmp_path / "out")


def test_tokenizer_json_is_used_when_present(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(tmp_path)
    assert t.encode("hello world") == [0, 1] and t("world").tolist() == [[1]]
    assert isinstance(load_tokenizer(tmp_path / "none"), rnnlab.ByteTokenizer)


def _ssm(tmp_path, arch):
    torch.manual_seed(0)
    if arch == "mamba":
        cfg = transformers.MambaConfig(vocab_size=120, hidden_size=32, state_size=8, num_hidden_layers=2)
        cls = transformers.MambaForCausalLM
    else:
        cfg = transformers.Mamba2Config(vocab_size=120, hidden_size=32, state_size=8, num_hidden_layers=2,
                                        head_dim=16, num_heads=4, n_groups=2, chunk_size=16)
        cls = transformers.Mamba2ForCausalLM
    m = cls(cfg).eval()
    m.save_pretrained(tmp_path / "hf")
    return m, cls


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_ssm_logits_match_both_ways(tmp_path, arch):
    hf, cls = _ssm(tmp_path, arch)
    ours = from_hf(tmp_path / "hf")
    assert {b.name for b in ours.config.blocks} == {arch}
    x = torch.randint(0, 120, (2, 45))
    with torch.no_grad():
        ref = hf(x).logits
        got, _ = ours(x)
    assert (got - ref).abs().max() < 1e-5  # float32, CPU: measured 3e-7 (mamba), 5e-7 (mamba2)
    to_hf(ours, tmp_path / "back")
    again = cls.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (again(x).logits - ref).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_ssm_greedy_generation_matches(tmp_path, arch):
    hf, _ = _ssm(tmp_path, arch)
    ours = from_hf(tmp_path / "hf")
    prompt = torch.randint(0, 120, (1, 6))
    ref = hf.generate(prompt, max_new_tokens=50, min_new_tokens=50, do_sample=False)[0, 6:]
    assert torch.equal(ours.generate(prompt, 50, temperature=0)[0], ref)
