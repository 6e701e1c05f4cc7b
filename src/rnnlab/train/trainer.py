"""A compact trainer: AdamW, warmup + cosine schedule, bits-per-byte evaluation, atomic
checkpoints, resume, metrics as JSON lines and a loss plot."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.corpus import get_batch
from ..models.lm import LM, atomic_write

__all__ = ["TrainConfig", "train", "evaluate_bpb", "plot_losses"]


@dataclass
class TrainConfig:
    steps: int = 1000  # optimisation steps in total (a resumed run continues up to this)
    batch_size: int = 16  # sequences per step
    seq_len: int = 256  # tokens per sequence
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # final learning rate of the cosine decay
    warmup: int = 50  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay on matrices (not on norms, biases or 1-D parameters)
    grad_clip: float = 1.0  # gradient-norm clip
    eval_every: int = 200  # steps between evaluations (and at the end)
    eval_batches: int = 8  # validation batches per evaluation
    seed: int = 0  # seed of the data sampler
    autocast: str | None = None  # "bf16" to train under bfloat16 autocast; None for full precision
    out_dir: str | None = None  # where checkpoints, metrics.jsonl and loss.png go; None: nothing saved
    save_every: int = 500  # steps between checkpoints (and at the end)
    max_seconds: float | None = None  # stop early after this much wall time (for demos)

    def __post_init__(self) -> None:
        if self.autocast not in (None, "bf16"):
            raise ValueError(f"autocast must be None or 'bf16', got {self.autocast!r}")
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _lr(step: int, c: TrainConfig) -> float:
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    frac = (step - c.warmup) / max(1, c.steps - c.warmup)
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


def _device(model: LM) -> torch.device:
    return next(model.parameters()).device


def _autocast(model: LM, c: TrainConfig):
    dev = _device(model).type
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=c.autocast == "bf16")


@torch.no_grad()
def evaluate_bpb(model: LM, data: torch.Tensor, seq_len: int, batches: int = 8, batch_size: int = 8,
                 seed: int = 1234, autocast: str | None = None) -> float:
    """Bits per byte of ``model`` on random windows of ``data`` (byte tokens): mean cross-entropy in
    nats / ln 2. The same windows for the same seed."""
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for _ in range(batches):
        x, y = get_batch(data, batch_size, seq_len, g)
        x, y = x.to(_device(model)), y.to(_device(model))
        with torch.autocast(_device(model).type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
            logits, _ = model(x)
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        n += y.numel()
    model.train(was)
    return total / n / math.log(2)


def _optimizer(model: LM, c: TrainConfig) -> torch.optim.Optimizer:
    # each layer names what skips decay (SSM A_log, D, dt, norms, biases): LM.param_groups
    return torch.optim.AdamW(model.param_groups(c.weight_decay), lr=c.lr, betas=(0.9, 0.95))


def train(model: LM, train_data: torch.Tensor, val_data: torch.Tensor, config: TrainConfig,
          progress: bool = True) -> dict:
    """Train ``model`` on byte-token tensors; returns ``{"step", "train_loss", "val_bpb", ...}``.

    With ``config.out_dir`` set, resumes from a checkpoint found there and writes checkpoints
    (``save_pretrained`` + ``trainer_state.pt``, each atomically), ``metrics.jsonl`` and ``loss.png``.
    """
    c = config
    out = Path(c.out_dir) if c.out_dir else None
    opt = _optimizer(model, c)
    step, history = 0, []
    g = torch.Generator().manual_seed(c.seed)
    if out and (out / "trainer_state.pt").is_file():  # resume
        saved = torch.load(out / "trainer_state.pt", map_location=_device(model), weights_only=False)
        model.load_state_dict(LM.from_pretrained(out, device=_device(model)).state_dict())
        opt.load_state_dict(saved["optimizer"])
        step, history = saved["step"], saved["history"]
        g.set_state(saved["generator"])
    if out:
        out.mkdir(parents=True, exist_ok=True)
    model.train()
    t_start, tokens_done, loss_ema = time.time(), 0, None
    bar = tqdm(total=None if c.max_seconds else c.steps, initial=step, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    result: dict = {}
    while step < c.steps:
        for group in opt.param_groups:
            group["lr"] = _lr(step, c)
        x, y = get_batch(train_data, c.batch_size, c.seq_len, g)
        x, y = x.to(_device(model)), y.to(_device(model))
        with _autocast(model, c):
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step()
        step += 1
        tokens_done += x.numel()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        rate = tokens_done / max(time.time() - t_start, 1e-9)
        bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{rate:,.0f}")
        bar.update(1)
        record = {"step": step, "train_loss": loss.item(), "lr": _lr(step - 1, c), "tokens_per_s": rate}
        out_of_time = c.max_seconds is not None and time.time() - t_start > c.max_seconds
        last = step == c.steps or out_of_time
        if step % c.eval_every == 0 or last:
            record["val_bpb"] = evaluate_bpb(model, val_data, c.seq_len, c.eval_batches, autocast=c.autocast)
            bar.write(f"step {step}: train loss {loss_ema:.3f}, val {record['val_bpb']:.3f} bits/byte")
        history.append(record)
        if out:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if step % c.save_every == 0 or last:
                _checkpoint(model, opt, step, history, g, c, out)
        result = {**record, "train_loss_ema": loss_ema, "seconds": time.time() - t_start}
        if out_of_time:
            break
    bar.close()
    if out:
        plot_losses(history, out / "loss.png")
    return result


def _checkpoint(model, opt, step, history, g, c, out: Path) -> None:
    model.save_pretrained(out)
    state = {"step": step, "optimizer": opt.state_dict(), "history": history, "generator": g.get_state(),
             "config": asdict(c)}
    atomic_write(out / "trainer_state.pt", lambda p: torch.save(state, p))


def plot_losses(history: list[dict], path: str | os.PathLike) -> bool:
    """Draw training loss and validation bits/byte against steps to ``path`` (PNG). Returns False
    (with a notice) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss plot (pip install 'rnnlab[plot]')")
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["train_loss"] / math.log(2) for h in history], lw=0.8,
            label="train (bits/byte)")
    ev = [h for h in history if "val_bpb" in h]
    ax.plot([h["step"] for h in ev], [h["val_bpb"] for h in ev], "o-", label="validation (bits/byte)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return True
