"""RecurrentGemma (Griffin, Hawk) checkpoints: transformers' RecurrentGemmaForCausalLM and rnnlab's LM
with the Gemma options give the same logits and the same greedy tokens, both ways."""
import json

import pytest
import torch

import rnnlab
from rnnlab.models.hf import from_hf, to_hf

transformers = pytest.importorskip("transformers")
mrg = pytest.importorskip("transformers.models.recurrent_gemma.modeling_recurrent_gemma")

LAYOUTS = {  # block_types of transformers' config
    "griffin": ("recurrent", "recurrent", "attention"),
    "hawk": ("recurrent",),
}


def _rg(tmp_path, kind="griffin", tied=True, n_layers=4, **kw):
    """A random small RecurrentGemma saved to tmp_path/hf. hidden_size 48: sqrt(48) is not a bfloat16
    number, so the embedding scale's rounding matters; the window (8) is shorter than the inputs.
    Every parameter is moved off its init (norms 0, biases 0) so that each one counts."""
    torch.manual_seed(0)
    cfg = transformers.RecurrentGemmaConfig(vocab_size=120, hidden_size=48, intermediate_size=96,
                                            num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                            lru_width=32, attention_window_size=8, block_types=LAYOUTS[kind],
                                            tie_word_embeddings=tied, logits_soft_cap=5.0, **kw)
    m = transformers.RecurrentGemmaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "hf")
    return m


@pytest.mark.parametrize("kind,tied", [("griffin", True), ("hawk", True), ("griffin", False)])
def test_logits_match_both_ways(tmp_path, kind, tied):
    hf = _rg(tmp_path, kind, tied)
    ours = from_hf(tmp_path / "hf")
    c = ours.config
    assert [b.name for b in c.blocks] == (["rg_lru", "rg_lru", "swa", "rg_lru"] if kind == "griffin" else ["rg_lru"] * 4)
    assert c.embed_scale == 6.9375 and c.norm_plus_one and c.mlp == "geglu" and c.mlp_bias and c.logit_softcap == 5.0
    assert c.tie_embeddings == tied
    x = torch.randint(0, 120, (2, 30))
    with torch.no_grad():
        ref = hf(x, use_cache=False).logits
        got, _ = ours(x)
    assert ref.abs().max() > 1  # the cap (5) is felt
    diff = (got - ref).abs().max().item()
    print(f"{kind} tied={tied}: max |logit diff| float32 {diff:.1e}")
    assert diff < 1e-5, diff  # float32, CPU: measured 0.9-1.3e-6 (logits up to 5)
    to_hf(ours, tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["block_types"] == list(LAYOUTS[kind])
    again = transformers.RecurrentGemmaForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(again(x, use_cache=False).logits, ref)  # the same weights: the same numbers
    assert from_hf(tmp_path / "back").config == c


def _float64_transformers(monkeypatch):
    """transformers' RecurrentGemma computes three things in float32 whatever the model's dtype: its
    RMSNorm, the RG-LRU scan's accumulator and the RoPE angles. These replacements do the same
    arithmetic in the input's dtype, so a float64 model is float64 throughout."""
    def norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    def rope(self, x, position_ids):
        p = self.config.rope_parameters
        dim = int(self.config.head_dim * p["partial_rotary_factor"])
        inv_freq = p["rope_theta"] ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        ang = position_ids[..., None].double() * inv_freq
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos().to(x.dtype), ang.sin().to(x.dtype)

    monkeypatch.setattr(mrg.RecurrentGemmaRMSNorm, "forward", norm)
    monkeypatch.setattr(mrg.RecurrentGemmaRotaryEmbedding, "forward", rope)
    monkeypatch.setattr(mrg.RecurrentGemmaRglru._rnn_scan, "__defaults__", (torch.float64,))


@pytest.mark.parametrize("kind", ["griffin", "hawk"])
def test_float64_logits_match_to_rounding(tmp_path, monkeypatch, kind):
    hf = _rg(tmp_path, kind).double()
    ours = from_hf(tmp_path / "hf", dtype=torch.float64)
    x = torch.randint(0, 120, (2, 30))
    with torch.no_grad():
        as_is = (hf(x, use_cache=False).logits - ours(x)[0]).abs().max().item()
        _float64_transformers(monkeypatch)
        diff = (hf(x, use_cache=False).logits - ours(x)[0]).abs().max().item()
    print(f"{kind}: max |logit diff| float64 {diff:.1e} (transformers' float32 parts left as they are: {as_is:.1e})")
    assert diff < 1e-12, diff  # measured 2.7e-15 (both)
    assert as_is < 1e-5  # bounded by transformers' float32 norm, scan and RoPE: measured ~5e-7


def _greedy_without_cache(hf, prompt, n):
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, hf(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1]:]


@pytest.mark.parametrize("kind", ["griffin", "hawk"])
def test_greedy_generation_matches(tmp_path, kind):
    hf = _rg(tmp_path, kind)
    ours = from_hf(tmp_path / "hf")
    prompt = torch.randint(0, 120, (2, 6))
    got = ours.generate(prompt, 20, temperature=0)
    ref = _greedy_without_cache(hf, prompt, 20)
    assert torch.equal(got, ref)
    if kind == "griffin":  # transformers 5.23's generate() cannot start a cache without an attention layer (Hawk)
        cached = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)[:, 6:]
        assert torch.equal(got, cached)


def test_config_round_trips_and_older_configs_load(tmp_path):
    _rg(tmp_path)
    ours = from_hf(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "rn")
    meta = json.loads((tmp_path / "rn" / "config.json").read_text())
    assert {k: meta["config"][k] for k in ("embed_scale", "norm_plus_one", "mlp", "mlp_bias", "logit_softcap")} == \
        {"embed_scale": 6.9375, "norm_plus_one": True, "mlp": "geglu", "mlp_bias": True, "logit_softcap": 5.0}
    back = rnnlab.load_model(tmp_path / "rn")
    x = torch.randint(0, 120, (1, 12))
    with torch.no_grad():
        assert back.config == ours.config and torch.equal(back(x)[0], ours(x)[0])
    # a config.json written before these options existed loads with today's defaults
    old = rnnlab.build_model(layout="rg_lru*2,swa(window=4)", n_layers=3, d_model=32, mlp="gelu")
    old.save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("embed_scale", "norm_plus_one", "mlp_bias", "logit_softcap"):
        del meta["config"][key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    loaded = rnnlab.load_model(tmp_path / "old")
    assert (loaded.config.embed_scale, loaded.config.norm_plus_one, loaded.config.mlp_bias,
            loaded.config.logit_softcap) == (1.0, False, False, None)
    with torch.no_grad():
        assert torch.equal(loaded(x % 32)[0], old(x % 32)[0])


def test_convert_command_reads_and_writes_recurrent_gemma(tmp_path):
    hf = _rg(tmp_path)
    from rnnlab.cli import main
    main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "rn")])
    main(["convert", "--to-hf", str(tmp_path / "rn"), "--out", str(tmp_path / "back")])
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again).__name__ == "RecurrentGemmaForCausalLM"
    x = torch.randint(0, 120, (1, 20))
    with torch.no_grad():
        assert torch.equal(again(x, use_cache=False).logits, hf(x, use_cache=False).logits)


def test_what_does_not_export_says_why(tmp_path):
    gemma = dict(mlp="geglu", mlp_bias=True, norm_plus_one=True, embed_scale=8.0, logit_softcap=30.0)
    plain = rnnlab.build_model(layout="rg_lru(num_heads=4)*2,swa(window=8,num_heads=4)", n_layers=3, d_model=64)
    with pytest.raises(ValueError, match="no Hugging Face architecture"):
        to_hf(plain, tmp_path / "a")  # no Gemma options: not a RecurrentGemma
    mixed = rnnlab.build_model(layout="rg_lru(num_heads=2),swa(window=8,num_heads=4,rope_fraction=0.5,out_bias=True)",
                               n_layers=2, d_model=64, **gemma)
    with pytest.raises(ValueError, match="one head count"):
        mrg_export(mixed)
    sinks = rnnlab.build_model(layout="rg_lru(num_heads=4),swa(window=8,sinks=2,num_heads=4,out_bias=True)",
                               n_layers=2, d_model=64, **gemma)
    with pytest.raises(ValueError, match="sliding window without sinks"):
        mrg_export(sinks)
    capped_llama = rnnlab.build_model(layout="attention", n_layers=1, d_model=32, logit_softcap=30.0)
    with pytest.raises(ValueError, match="no Hugging Face architecture"):
        to_hf(capped_llama, tmp_path / "b")
    from rnnlab.models.hf import HF_ARCHITECTURES
    with pytest.raises(ValueError, match="logit_softcap"):
        HF_ARCHITECTURES["LlamaForCausalLM"].from_config(capped_llama)
    good = rnnlab.build_model(layout="rg_lru(num_heads=4)*2,swa(window=8,num_heads=4,rope_fraction=0.5,out_bias=True)",
                              n_layers=3, d_model=64, **gemma)
    assert mrg_export(good)["block_types"] == ["recurrent", "recurrent", "attention"]


def mrg_export(model):
    from rnnlab.models.hf import HF_ARCHITECTURES
    return HF_ARCHITECTURES["RecurrentGemmaForCausalLM"].from_config(model)


def test_unsupported_recurrent_gemma_settings_are_refused(tmp_path):
    _rg(tmp_path)
    cfg_path = tmp_path / "hf" / "config.json"
    base = json.loads(cfg_path.read_text())
    for change, match in ((dict(hidden_activation="gelu"), "hidden_activation"),
                          (dict(block_types=["recurrent", "mlp"]), "block_types"),
                          (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope")):
        cfg_path.write_text(json.dumps({**base, **change}))
        with pytest.raises(ValueError, match=match):
            from_hf(tmp_path / "hf")


@pytest.mark.parametrize("layout", [  # the README's Hawk and Griffin, built in rnnlab
    "rg_lru(num_heads=4)",
    "rg_lru(num_heads=4)*2,swa(window=6,num_heads=4,num_kv_heads=1,rope_fraction=0.5,out_bias=True)"])
def test_rnnlab_griffin_and_hawk_export_to_transformers(tmp_path, layout):
    torch.manual_seed(0)
    ours = rnnlab.build_model(layout=layout, n_layers=4, d_model=64, vocab_size=100, mlp="geglu", mlp_bias=True,
                              norm_plus_one=True, embed_scale=8.0, logit_softcap=30.0).eval()
    to_hf(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 100, (2, 25))
    with torch.no_grad():
        diff = (hf(x, use_cache=False).logits - ours(x)[0]).abs().max().item()
    assert diff < 1e-5, diff
    assert torch.equal(ours.generate(x[:, :5], 20, temperature=0), _greedy_without_cache(hf, x[:, :5], 20))
