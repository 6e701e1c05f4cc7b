"""Training on the tasks: every mixer takes a step on every task; attention learns MQAR; DeltaNet
with negative eigenvalues learns parity."""
import math

import pytest
import torch

import rnnlab
from rnnlab.bench import tasks as bench
from rnnlab.tasks import MQARConfig, StateTrackingConfig, TaskBatches
from rnnlab.train import TrainConfig, train

TINY_TASKS = list({s.family: s.train for s in bench.PRESETS["tiny"].settings}.values())  # one per family


@pytest.fixture
def one_thread():
    """Tiny models are many small ops: one thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_tiny_tasks_cover_every_family():
    assert {type(c).__name__ for c in TINY_TASKS} == {
        "MQARConfig", "StateTrackingConfig", "PasskeyConfig", "SetDisjointnessConfig", "SelectiveCopyConfig",
        "InductionConfig"}


@pytest.mark.parametrize("name", rnnlab.mixers())
def test_every_mixer_trains_a_step_on_every_task(name, one_thread):
    for config in TINY_TASKS:
        torch.manual_seed(0)
        model = rnnlab.build_model(layout=bench.layout_for(name, bench.PRESETS["tiny"]), n_layers=2, d_model=32,
                                   vocab_size=config.vocab_size)
        before = [p.detach().clone() for p in model.parameters()]
        out = train(model, TaskBatches(config, 2, seed=0),
                    TrainConfig(steps=1, batch_size=2, seq_len=config.seq_len, warmup=0), progress=False)
        assert out["step"] == 1 and math.isfinite(out["loss"]), (name, config)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), (name, config)


def _cell(setting, mixer, d_model, lr, steps, **preset):
    p = bench.Preset(mixers=(mixer,), d_models=(d_model,), lrs=(lr,), seeds=(0,), settings=(setting,), steps=steps,
                     **preset)
    return bench.Cell(setting, mixer, d_model, lr, 0, steps, p.target), p


def test_two_layer_attention_solves_small_mqar(tmp_path, one_thread):
    c = MQARConfig(seq_len=16, kv_pairs=2, vocab_size=16)
    setting = bench.Setting("mqar-small", "mqar", c, (("test", 16, c),))
    cell, p = _cell(setting, "attention", 64, 3e-3, n_layers=2, steps=1500, batch_size=64, warmup=20, eval_every=100,
                    val_examples=256, test_examples=512, target=0.95)
    row = bench.run_cell(cell, p, tmp_path / "run", torch.device("cpu"), keep_checkpoints=False)
    assert row["early_stop"] and row["steps"] < cell.steps  # stopped at the target, before the budget
    assert row["tests"]["test"]["accuracy"] >= 0.9


def test_deltanet_with_negative_eigenvalues_solves_parity(tmp_path, one_thread):
    """Grazzi et al. 2024: b in (0, 2) lets the delta rule flip its state; a one-layer DeltaNet
    learns running parity within a few hundred steps and keeps it on longer rows."""
    train_cfg = StateTrackingConfig("parity", 3, 16)
    setting = bench.Setting("parity", "state", train_cfg,
                            (("3-16", 16, train_cfg), ("17-64", 64, StateTrackingConfig("parity", 17, 64))))
    cell, p = _cell(setting, "deltanet(allow_neg_eigval=True,num_heads=2)", 32, 3e-3, n_layers=1, steps=400,
                    batch_size=64, warmup=20, eval_every=100, val_examples=256, test_examples=256, target=0.99)
    row = bench.run_cell(cell, p, tmp_path / "run", torch.device("cpu"), keep_checkpoints=False)
    assert row["early_stop"]
    assert row["tests"]["3-16"]["accuracy"] >= 0.99 and row["tests"]["17-64"]["accuracy"] >= 0.8
