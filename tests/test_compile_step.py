"""LM.compile_step: the one-token step through torch.compile.

Every mixer's ``step_compiles`` flag is checked against dynamo (its one-token step traces into one
graph exactly when the flag says so), and a compiled hybrid model decodes as the eager one does."""
import pytest
import torch

import rnnlab
from rnnlab.models.registry import REGISTRY, build_mixer

NAMES = rnnlab.mixers()
D = 32


@pytest.mark.parametrize("name", NAMES)
def test_step_compiles_says_whether_the_step_traces_as_one_graph(name):
    torch.manual_seed(0)
    m = build_mixer(name, d_model=D, **REGISTRY[name].tiny).double().eval()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    x1 = torch.randn(2, 1, D, dtype=torch.float64)
    torch._dynamo.reset()
    with torch.no_grad():
        _, state = m(x)
        y, new = m.call_mix(x1, state)
        traced = torch.compile(m.call_mix, backend="eager", fullgraph=True)
        if not m.step_compiles:
            with pytest.raises(Exception):  # a graph break: dynamo refuses under fullgraph
                traced(x1, state)
            return
        y2, new2 = traced(x1, state)
    torch.testing.assert_close(y2, y, rtol=0, atol=1e-12)
    for k, t in new.tensors().items():
        torch.testing.assert_close(new2.tensors()[k], t, rtol=0, atol=1e-12, msg=f"{name} state.{k}")


def test_compiled_decode_matches_eager():
    """A hybrid (two compiled recurrent blocks around an eager attention block), float64: greedy
    decoding gives the same tokens, logits and states as eager; longer calls are not affected."""
    torch.manual_seed(0)
    layout = "gated_deltanet(num_heads=2),swa(num_heads=2,window=8,sinks=2),mamba2(head_dim=16)"
    eager = rnnlab.build_model(layout=layout, n_layers=3, d_model=D).double().eval()
    compiled = rnnlab.build_model(layout=layout, n_layers=3, d_model=D).double().eval()
    compiled.load_state_dict(eager.state_dict())
    assert compiled.compile_step() is compiled
    prompt = torch.randint(0, 260, (2, 11))
    torch._dynamo.reset()
    with torch.no_grad():
        runs = []
        for model in (eager, compiled):
            logits, state = model(prompt)
            tok, steps = logits[:, -1:].argmax(-1), []
            for _ in range(12):
                logits, state = model(tok, state)
                tok = logits[:, -1:].argmax(-1)
                steps.append(logits)
            runs.append((torch.cat(steps, 1), state))
    (a, sa), (b, sb) = runs
    torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    assert torch.equal(sb.seen, sa.seen)
    for la, lb in zip(sa.layers, sb.layers):
        for k, t in la.tensors().items():
            torch.testing.assert_close(lb.tensors()[k], t, rtol=0, atol=1e-10)
    # prefill (T > 1) and calls under autograd run the eager code: bit for bit the same
    x = torch.randint(0, 260, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, sb)[0], eager(x, sa)[0], rtol=0, atol=1e-10)
    assert torch.equal(compiled(x[:, :1], sa)[0], eager(x[:, :1], sa)[0])  # grad enabled: eager
    compiled.compile_step(False)
    assert "_compiled_step" not in compiled.__dict__
    assert set(compiled.state_dict()) == set(eager.state_dict())  # nothing registered as a module


def test_generate_compile_flag(tmp_path, capsys):
    from rnnlab.cli import main
    torch.manual_seed(0)
    rnnlab.build_model(layout="mamba2(head_dim=16),gla(num_heads=2)", n_layers=2, d_model=D).save_pretrained(tmp_path)
    gen = ["generate", "--model", str(tmp_path), "--temperature", "0", "--max-new-tokens", "16", "--prompt", "abc"]
    torch._dynamo.reset()
    assert main(gen + ["--compile"]) == main(gen)
