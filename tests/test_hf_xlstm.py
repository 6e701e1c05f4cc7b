"""xLSTM 7B checkpoints: transformers' xLSTMForCausalLM and rnnlab's LM of mlstm7b blocks give the
same logits and the same greedy tokens, both ways."""
import json

import pytest
import torch

import rnnlab
from rnnlab.models.hf import HF_ARCHITECTURES, from_hf, to_hf

transformers = pytest.importorskip("transformers")


def _xlstm(tmp_path, **kw):
    """A random small xLSTM saved to tmp_path/hf: chunks of 16 so a 45-token input runs transformers'
    chunkwise kernel and its token loop for the rest; kernels in float32 (their default is bfloat16).
    hidden_size 128 keeps qk_dim a multiple of 64, which transformers' cache assumes. Every parameter
    is moved off its init so that each one counts."""
    torch.manual_seed(0)
    cfg = transformers.xLSTMConfig(vocab_size=120, hidden_size=128, num_hidden_layers=2, num_heads=2, chunk_size=16,
                                   autocast_kernel_dtype="float32", output_logit_soft_cap=5.0, eos_token_id=None,
                                   **kw)
    m = transformers.xLSTMForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "hf")
    return m


def test_logits_match_both_ways(tmp_path):
    hf = _xlstm(tmp_path)
    ours = from_hf(tmp_path / "hf")
    c = ours.config
    assert [b.name for b in c.blocks] == ["mlstm7b"] * 2 and c.d_ff == 384 and c.logit_softcap == 5.0
    assert not c.tie_embeddings and c.mlp == "swiglu"
    x = torch.randint(0, 120, (2, 45))
    with torch.no_grad():
        ref = hf(x, use_cache=False).logits
        got, _ = ours(x)
    diff = (got - ref).abs().max().item()
    print(f"xLSTM: max |logit diff| float32 {diff:.1e} (logits up to {ref.abs().max().item():.1f})")
    assert diff < 1e-5, diff  # float32, CPU: measured 7e-6 (exact in float64: see below)
    to_hf(ours, tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again).__name__ == "xLSTMForCausalLM"
    with torch.no_grad():  # the same weights (chunk_size, a kernel setting, is back at its default: rounding differs)
        assert (again(x, use_cache=False).logits - ref).abs().max() < 1e-5
    assert from_hf(tmp_path / "back").config == c


def test_float64_hidden_states_match_to_rounding(tmp_path):
    """transformers' xLSTM computes its final RMSNorm and its logits in float32 whatever the dtype,
    and its states in ``inference_state_dtype`` (float32 at most by its config's rules); with the
    states in float64 and the blocks' norms not forced to float32, the residual stream entering the
    final norm agrees to rounding."""
    hf = _xlstm(tmp_path, norm_reduction_force_float32=False)
    for layer in (b.mlstm_layer for b in hf.backbone.blocks):
        fn = layer.mlstm_backend._inference_fn  # rebuilt with float64 states
        kw = dict(fn.keywords)
        for key in ("mlstm_sequence_kernel", "mlstm_step_kernel"):
            kw[key] = type(kw[key])(kw[key].func, **{**kw[key].keywords, "dtype_state": torch.float64})
        layer.mlstm_backend._inference_fn = type(fn)(fn.func, *fn.args, **kw)
    hf = hf.double()
    ours = from_hf(tmp_path / "hf", dtype=torch.float64)
    seen = {}
    ours.norm.register_forward_hook(lambda mod, args, out: seen.__setitem__("ours", args[0]))
    hf.backbone.out_norm.register_forward_hook(lambda mod, args, out: seen.__setitem__("hf", args[0]))
    x = torch.randint(0, 120, (2, 45))
    with torch.no_grad():
        hf(x, use_cache=False)
        ours(x)
    diff = (seen["ours"] - seen["hf"]).abs().max().item()
    print(f"xLSTM: max |hidden diff| float64 {diff:.1e}")
    assert seen["hf"].dtype == torch.float64 and diff < 1e-12, diff  # measured 2.7e-14


def test_greedy_generation_matches(tmp_path):
    hf = _xlstm(tmp_path)
    ours = from_hf(tmp_path / "hf")
    prompt = torch.randint(0, 120, (2, 6))
    ref = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)[:, 6:]
    assert torch.equal(ours.generate(prompt, 20, temperature=0), ref)


def test_rnnlab_mlstm7b_model_exports_and_refusals(tmp_path):
    torch.manual_seed(0)
    ours = rnnlab.build_model(layout="mlstm7b(num_heads=2,norm_eps=1e-6)", n_layers=2, d_model=128, vocab_size=100,
                              d_ff=320, norm_eps=1e-6, logit_softcap=30.0, tie_embeddings=False).eval()
    to_hf(ours, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["ffn_proj_factor"], cfg["ffn_round_up_to_multiple_of"]) == (2.5, 64)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 100, (1, 30))
    with torch.no_grad():
        assert (hf(x, use_cache=False).logits - ours(x)[0]).abs().max() < 1e-5
    export = HF_ARCHITECTURES["xLSTMForCausalLM"].from_config
    tied = rnnlab.build_model(layout="mlstm7b(num_heads=2,norm_eps=1e-6)", n_layers=1, d_model=64, norm_eps=1e-6)
    with pytest.raises(ValueError, match="untied head"):
        export(tied)
    other_eps = rnnlab.build_model(layout="mlstm7b(num_heads=2)", n_layers=1, d_model=64, tie_embeddings=False)
    with pytest.raises(ValueError, match="one norm_eps"):
        export(other_eps)
    d = tmp_path / "hf"
    (d / "config.json").write_text(json.dumps({**cfg, "weight_mode": "fused"}))
    with pytest.raises(ValueError, match="weight_mode"):
        from_hf(d)
