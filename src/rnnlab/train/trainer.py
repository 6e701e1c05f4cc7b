"""The trainer: any model, any batch source, exact resume, one or many processes.

``train(model, batches, config)`` runs AdamW with warmup and a cosine schedule on ``(x, y)``
batches (y = -100 where a position is not scored), with gradient accumulation, optional bfloat16
autocast, gradient clipping, tokens/s and model FLOPs utilisation in the progress bar and in
``metrics.jsonl``, periodic evaluation, and checkpoints (:mod:`rnnlab.train.checkpoint`) that a
crash never tears. Under ``torchrun`` it trains with DDP (or FSDP2) and gives the weights one
process would reach on the same global batch. One host synchronisation per step.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import distributed as D
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, run_exists, save_checkpoint
from .evaluate import batch_logits, evaluate, plot_losses
from ..flops import matmul_peak, model_flops_per_token
from ..ops.registry import BACKENDS, use_backend

__all__ = ["TrainConfig", "train", "RunExistsError", "NonFiniteLossError"]


class RunExistsError(FileExistsError):
    """The output directory already holds a run and ``resume`` was not asked for."""


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite; no step was taken with it."""


@dataclass
class TrainConfig:
    """How to train. Sizes are global: summed over gradient-accumulation micro-batches and processes."""

    steps: int = 1000  # optimiser steps in total (a resumed run continues up to this)
    batch_size: int = 16  # sequences per optimiser step, over all micro-batches and processes
    seq_len: int = 256  # tokens per training sequence
    grad_accum: int = 1  # micro-batches per optimiser step (each batch_size / grad_accum sequences)
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the end of the cosine decay
    warmup: int = 50  # steps of linear warmup from 0 to lr
    weight_decay: float = 0.1  # AdamW decay on the parameters the layers do not exempt (see LM.param_groups)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    autocast: str = "none"  # "bf16": bfloat16 autocast for the forward; "none": full precision
    recompute: bool = False  # keep only each block's input and run the block again in the backward (LM.recompute)
    ops_backend: str = "torch"  # the ops' backend (rnnlab.ops.registry.use_backend): "torch", "compile" or "fla" (CUDA)
    eval_every: int = 200  # steps between evaluations (and one at the end); 0 = only at the end
    save_every: int = 500  # steps between checkpoints (and one at the end and on SIGINT/SIGTERM)
    keep_last: int = 3  # checkpoints kept (older ones are deleted); 0 = keep all
    out_dir: str = ""  # run directory for checkpoints, metrics.jsonl, loss.png; "" = save nothing
    resume: bool = False  # continue the run in out_dir from its latest checkpoint
    max_seconds: float = 0.0  # stop (with a checkpoint) after this much training time; 0 = no limit
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated weights) or "fsdp" (sharded, FSDP2)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("eval_every", "save_every", "keep_last", "warmup"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        if self.autocast not in ("none", "bf16"):
            raise ValueError(f"autocast must be 'none' or 'bf16', got {self.autocast!r}")
        if self.ops_backend not in BACKENDS:
            raise ValueError(f"ops_backend must be one of {', '.join(BACKENDS)}, got {self.ops_backend!r}")
        if not isinstance(self.recompute, bool):
            raise ValueError(f"recompute must be True or False, got {self.recompute!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        for name, lo, hi in (("lr", 0, None), ("min_lr", None, None), ("weight_decay", None, None),
                             ("grad_clip", None, None), ("max_seconds", None, None), ("beta1", None, 1), ("beta2", None, 1)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 and (lo is None or v > lo)
                    and (hi is None or v < hi)):
                bound = "> 0" if lo is not None else ">= 0" if hi is None else "in [0, 1)"
                raise ValueError(f"{name} must be a finite number {bound}, got {v!r}")
        if self.resume and not self.out_dir:
            raise ValueError("resume needs out_dir (the run to continue)")

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch over all processes."""
        return self.batch_size // self.grad_accum


def lr_at(step: int, c: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, then cosine to min_lr."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    frac = (step - c.warmup) / max(1, c.steps - c.warmup)
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


class _StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step (and save); a second one
    interrupts at once (checkpoints stay whole either way)."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        for sig, old in self._old.items():  # a second signal acts as before
            signal.signal(sig, old)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_resumable(model: nn.Module, config_saved, out: Path) -> None:
    have, want = model.config.to_dict(), config_saved.to_dict()
    diff = {k: (want[k], have.get(k)) for k in want if want[k] != have.get(k)}
    if diff:
        items = ", ".join(f"{k}={v[0]!r} in the checkpoint but {v[1]!r} now" for k, v in diff.items())
        raise CheckpointError(f"cannot resume {out}: the model differs from the checkpoint's ({items}); "
                              "resume with the run's own model settings, or start a new run in another directory")


def train(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], config: TrainConfig, *,
          val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None,
          progress: bool | None = None) -> dict:
    """Train ``model`` (an :class:`rnnlab.LM`) on ``batches`` and return the last step's metrics.

    ``batches`` yields ``(x, y)`` int64 (b, T) micro-batches, y = -100 where not scored (or
    ``(x, y, cu_seqlens)`` for rows of packed documents kept apart, see :func:`batch_logits`), with
    b = ``config.batch_size / (grad_accum · world_size)``; under ``torchrun`` each process passes its
    own share of the global batch (e.g. ``RandomWindows(..., rank=r, world_size=w)``). When it has
    ``state_dict``/``load_state_dict`` its position is checkpointed, so a resumed run sees the data
    an uninterrupted run would; otherwise a resumed run skips the batches already consumed.
    ``val_batches`` makes a fresh finite iterable of validation batches for each evaluation.
    ``progress``: True draws a progress bar on stderr, False prints nothing, None (default) draws
    the bar when stderr is a terminal and otherwise logs a plain line every tenth of the run.
    Losses are shown in bits per token (``metrics.jsonl`` keeps ``loss`` in nats beside ``bits``).

    With ``config.out_dir``: checkpoints of the initial weights (step 0), every ``save_every`` steps,
    at the end and on SIGINT/SIGTERM; ``metrics.jsonl`` (one line per step, each step once across resumes) and
    ``loss.png``. A directory that holds a run is refused unless ``config.resume``.
    """
    c = config
    e = D.env(next(model.parameters()).device)
    out = Path(c.out_dir) if c.out_dir else None
    micro = c.micro_batch_size
    if micro % e.world_size:
        raise ValueError(f"batch_size / grad_accum = {micro} sequences must split evenly over {e.world_size} processes")

    # 1. Where to start: a new run, or the latest checkpoint of this one.
    resume_from = None
    if out is not None:
        if c.resume:
            resume_from = latest_checkpoint(out)
            if resume_from is None:
                raise CheckpointError(f"--resume: {out} holds no checkpoint to continue (start without --resume)")
        elif run_exists(out):
            raise RunExistsError(f"{out} already holds a training run; pass --resume (resume=True) to continue it, "
                                 "or choose another output directory")
    loaded = None
    if resume_from is not None and e.is_main:
        loaded = load_checkpoint(resume_from)
        _check_resumable(model, loaded[0], out)
    loaded = D.broadcast_object(loaded)
    D.barrier()

    # 2. The model to train and its optimiser (parameter groups declared by the layers).
    net = D.wrap(model, c.parallel, e)
    opt = torch.optim.AdamW(model.param_groups(c.weight_decay), lr=c.lr, betas=(c.beta1, c.beta2))
    step, metrics_offset, loss_ema = 0, 0, None
    if loaded is not None:
        _, model_state, ts = loaded
        D.load_full_state(net, opt, model_state, ts["optimizer"])
        step, metrics_offset, loss_ema = ts["step"], ts["metrics_offset"], ts.get("loss_ema")
        torch.set_rng_state(ts["rng"]["torch"])
        if "batches" in ts and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(ts["batches"])
    it = iter(batches)
    if loaded is not None and not hasattr(batches, "load_state_dict"):
        for _ in range(step * c.grad_accum):  # a source without state: skip what was consumed
            next(it)
    history: list[dict] = []
    if out is not None and e.is_main:
        out.mkdir(parents=True, exist_ok=True)
        mpath = out / "metrics.jsonl"
        if mpath.exists():  # drop the steps logged after the checkpoint we resume from
            with open(mpath, "rb+") as f:
                f.truncate(metrics_offset)
            history = [json.loads(line) for line in mpath.read_text().splitlines() if line.strip()]
        metrics_file = open(mpath, "a")
    else:
        metrics_file = None

    def save(at_step: int) -> Path | None:
        msd, osd = D.full_state(net, opt)
        path = None
        if out is not None and e.is_main:
            if metrics_file is not None:
                metrics_file.flush()
            ts = {"step": at_step, "optimizer": osd, "rng": {"torch": torch.get_rng_state()},
                  "metrics_offset": metrics_file.tell() if metrics_file is not None else 0,
                  "loss_ema": loss_ema, "train_config": asdict(c), "world_size": e.world_size}
            if hasattr(batches, "state_dict"):
                ts["batches"] = batches.state_dict()
            path = save_checkpoint(out, at_step, model.config, msd, ts, keep_last=c.keep_last or None)
        D.barrier()
        return path

    if out is not None and loaded is None:
        save(0)  # the initial weights: from here on a run can always be resumed

    # 3. The loop: one host sync per step (loss, scored tokens and gradient norm together).
    flops_tok = model_flops_per_token(model, c.seq_len)
    peak = matmul_peak(e.device, torch.bfloat16 if c.autocast == "bf16" else torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    net.train()
    show = e.is_main and progress is not False
    use_bar = show and (progress is True or sys.stderr.isatty())
    bar = tqdm(total=c.steps, initial=step, disable=not use_bar, desc="train", unit="step", dynamic_ncols=True)
    say = bar.write if use_bar else (lambda text: print(text, file=sys.stderr, flush=True)) if show else (lambda text: None)
    log_every = max(1, c.steps // 10)
    t_start, start_step, last_ckpt = time.time(), step, None
    tokens_per_step = c.batch_size * c.seq_len
    row: dict = {"step": step}
    # the bar is closed on any exit, so an error is printed on a line of its own
    with _StopSignals() as stop, bar, _recomputing(model, c.recompute), use_backend(c.ops_backend):
        while step < c.steps:
            lr = lr_at(step, c)
            for group in opt.param_groups:
                group["lr"] = lr
            parts = [tuple(t.to(e.device, non_blocking=True) for t in next(it)) for _ in range(c.grad_accum)]
            scored = D.all_reduce_sum(sum((p[1] != -100).sum() for p in parts).to(torch.float32))
            denom = scored.clamp(min=1) / e.world_size  # DDP averages gradients over processes
            loss_sum = torch.zeros((), device=e.device)
            for i, (x, y, *bounds) in enumerate(parts):
                last_micro = i == len(parts) - 1
                _sync_grads(net, last_micro)
                with torch.autocast(e.device.type, dtype=torch.bfloat16, enabled=c.autocast == "bf16"):
                    logits = batch_logits(net, x, bounds[0] if bounds else None)
                part = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
                (part / denom).backward()
                loss_sum += part.detach()
            norm = (nn.utils.clip_grad_norm_(params, c.grad_clip) if c.grad_clip > 0
                    else torch.zeros((), device=e.device))
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
                norm = norm.full_tensor()
            D.all_reduce_sum(loss_sum)
            loss_total, n_scored, gnorm = torch.stack([loss_sum, scored, norm.float()]).tolist()  # the one sync
            loss = loss_total / max(n_scored, 1.0)
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                opt.zero_grad(set_to_none=True)
                where = f"; the last good checkpoint is {latest_checkpoint(out)}" if out is not None and latest_checkpoint(out) else ""
                raise NonFiniteLossError(f"the loss became {loss} (gradient norm {gnorm}) at step {step + 1}; "
                                         f"no update was made{where}. Lower --lr or raise --warmup and resume.")
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.time() - t_start
            tok_s = tokens_per_step * (step - start_step) / max(elapsed, 1e-9)
            loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
            mfu = tok_s * flops_tok / peak
            row = {"step": step, "loss": loss, "bits": loss / math.log(2), "lr": lr, "grad_norm": gnorm, "tokens_per_s": tok_s, "mfu": mfu,
                   "seconds": elapsed}
            out_of_time = c.max_seconds > 0 and elapsed > c.max_seconds
            last = step == c.steps or out_of_time or stop.received is not None
            if val_batches is not None and ((c.eval_every and step % c.eval_every == 0) or last):
                if e.is_main or c.parallel == "fsdp":  # FSDP's forward gathers weights: every rank runs it
                    ev = evaluate(model, val_batches(), autocast=c.autocast if c.autocast != "none" else None)
                    row.update(val_loss=ev["loss"], val_bits=ev["bits"])
                    say(f"step {step}: train {loss_ema / math.log(2):.4f}, validation {ev['bits']:.4f} bits per token")
                D.barrier()
            history.append(row)
            if metrics_file is not None:
                metrics_file.write(json.dumps(row) + "\n")
            bar.set_postfix(bits=f"{loss_ema / math.log(2):.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{100 * mfu:.1f}%")
            bar.update(1)
            if show and not use_bar and step % log_every == 0 and "val_bits" not in row:
                say(f"step {step}/{c.steps}: train {loss_ema / math.log(2):.4f} bits per token, {tok_s:,.0f} tokens/s, "
                    f"MFU {100 * mfu:.1f}%, {elapsed:.0f} s")
            if out is not None and ((c.save_every and step % c.save_every == 0) or last):
                last_ckpt = save(step)
            if last:
                break
    if metrics_file is not None:
        metrics_file.close()
        plot_losses(history, out / "loss.png")
    result = dict(row)
    result.update(loss_ema=loss_ema, interrupted=stop.received is not None,
                  checkpoint=str(last_ckpt) if last_ckpt else None, flops_per_token=flops_tok, matmul_peak=peak)
    return result


@contextlib.contextmanager
def _recomputing(model: nn.Module, enabled: bool):
    """``model.recompute = enabled`` for the duration of the loop, then as it was."""
    before = model.recompute
    model.recompute = enabled
    try:
        yield
    finally:
        model.recompute = before


def _sync_grads(net: nn.Module, enabled: bool) -> None:
    """Gradient synchronisation only on the last micro-batch of a step (DDP and FSDP2)."""
    if isinstance(net, nn.parallel.DistributedDataParallel):
        net.require_backward_grad_sync = enabled
    elif hasattr(net, "set_requires_gradient_sync"):
        net.set_requires_gradient_sync(enabled)

