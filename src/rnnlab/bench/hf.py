"""rnnlab vs Hugging Face ``transformers`` on the same weights: prefill and decode speed on CPU.

For each architecture a randomly initialised ``transformers`` model is saved, loaded into rnnlab
with :func:`rnnlab.from_hf`, checked for equal logits, and both are timed:

* prefill: one forward pass over T tokens (tokens/s), for each T;
* decode: greedy generation of N tokens after a short prompt (tokens/s), transformers with its
  cache, rnnlab with its recurrent state (and with ``--compile`` also with its step compiled,
  :meth:`rnnlab.LM.compile_step`).

``python -m rnnlab.bench.hf [--archs mamba mamba2 llama recurrent_gemma xlstm] [--T 1024 4096] [--compile] [--quick]``
Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from . import report
from ..configs import Parser, int_at_least
from ..models.hf import from_hf

_SIZES = {  # a small but not toy model: d_model 256, 4 layers
    "mamba": lambda t, d, n: t.MambaConfig(vocab_size=260, hidden_size=d, state_size=16, num_hidden_layers=n),
    "mamba2": lambda t, d, n: t.Mamba2Config(vocab_size=260, hidden_size=d, state_size=64, num_hidden_layers=n,
                                             head_dim=64, num_heads=2 * d // 64, n_groups=1, chunk_size=256),
    "llama": lambda t, d, n: t.LlamaConfig(vocab_size=260, hidden_size=d, intermediate_size=4 * d,
                                           num_hidden_layers=n, num_attention_heads=d // 64),
    "recurrent_gemma": lambda t, d, n: t.RecurrentGemmaConfig(  # Griffin: recurrent, recurrent, local attention
        vocab_size=260, hidden_size=d, intermediate_size=3 * d, num_hidden_layers=n, num_attention_heads=d // 64,
        num_key_value_heads=1, attention_window_size=2048),
    "xlstm": lambda t, d, n: t.xLSTMConfig(vocab_size=260, hidden_size=d, num_hidden_layers=n, num_heads=d // 64,
                                           autocast_kernel_dtype="float32"),
}
_CLASSES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM", "llama": "LlamaForCausalLM",
            "recurrent_gemma": "RecurrentGemmaForCausalLM", "xlstm": "xLSTMForCausalLM"}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def run(arch: str, Ts: list[int], decode_tokens: int, d_model: int, n_layers: int, repeats: int,
        compile_step: bool = False) -> list[dict]:
    import transformers

    torch.manual_seed(0)
    hf = getattr(transformers, _CLASSES[arch])(_SIZES[arch](transformers, d_model, n_layers)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = from_hf(d).eval()
    x = torch.randint(0, 260, (1, max(Ts)))
    diff = (hf(x[:, :256]).logits - ours(x[:, :256])[0]).abs().max().item()
    rows = []
    for T in Ts:
        t_hf = _time(lambda: hf(x[:, :T], use_cache=False), repeats)
        t_us = _time(lambda: ours(x[:, :T]), repeats)
        rows.append(dict(arch=arch, what=f"prefill T={T}", transformers_tok_s=T / t_hf, rnnlab_tok_s=T / t_us,
                         ratio=t_hf / t_us, max_logit_diff=diff))
    prompt = x[:, :16]
    t_hf = _time(lambda: hf.generate(prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                                     do_sample=False), repeats)
    for compiled in (False, True) if compile_step else (False,):
        ours.compile_step(compiled)  # the warm-up call compiles
        t_us = _time(lambda: ours.generate(prompt, decode_tokens, temperature=0), repeats)
        rows.append(dict(arch=arch, what=f"decode {decode_tokens} tok" + (" +compile" if compiled else ""),
                         transformers_tok_s=decode_tokens / t_hf, rnnlab_tok_s=decode_tokens / t_us,
                         ratio=t_hf / t_us, max_logit_diff=diff))
    return rows


def build_parser() -> Parser:
    p = Parser(prog="rnnlab bench hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["mamba", "mamba2"], choices=sorted(_SIZES), help="architectures to compare")
    p.add_argument("--T", nargs="+", type=int_at_least(1), default=[1024, 4096], help="prefill lengths")
    p.add_argument("--decode-tokens", type=int_at_least(1), default=128, help="tokens decoded one at a time")
    p.add_argument("--d-model", type=int_at_least(1), default=256, help="model width")
    p.add_argument("--n-layers", type=int_at_least(1), default=4, help="layers")
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="timed calls; the median is reported")
    p.add_argument("--compile", action="store_true", help="also decode with rnnlab's step compiled "
                                                          "(LM.compile_step; transformers' path stays as it is)")
    p.add_argument("--quick", action="store_true", help="T=256, 16 decode tokens, 1 repeat")
    p.add_argument("--json", help="also write the results to this file")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    p = build_parser()
    a = p.parse_args(argv)
    if a.quick:
        a.T, a.decode_tokens, a.repeats = [256], 16, 1
    rows = []
    for arch in a.archs:
        rows += run(arch, a.T, a.decode_tokens, a.d_model, a.n_layers, a.repeats, a.compile)
    print(f"{'arch':8} {'what':27} {'transformers tok/s':>19} {'rnnlab tok/s':>13} {'rnnlab speed-up':>16} {'max |dlogit|':>13}")
    for r in rows:
        print(f"{r['arch']:8} {r['what']:27} {r['transformers_tok_s']:19.1f} {r['rnnlab_tok_s']:13.1f} "
              f"{r['ratio']:15.2f}x {r['max_logit_diff']:13.2e}")
    report("hf", rows, a.json, device="cpu")
    return rows


if __name__ == "__main__":
    main()
