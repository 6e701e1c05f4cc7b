"""``rnnlab bench tasks``: train small models on the synthetic tasks and score them.

A sweep is a grid of cells, one per (task setting, mixer, d_model, learning rate, seed). Each cell
builds a model of the preset's ``n_layers`` blocks of one mixer with the setting's vocabulary,
trains it with :func:`rnnlab.train.train` on fresh batches of the task (AdamW, linear warmup then
a constant learning rate, so that stopping early is the same run cut short) for at most
``--steps`` steps, checks the accuracy on a validation set every ``eval_every`` steps and stops as
soon as it reaches ``--target`` (default: the setting's target, else the preset's), then scores the
model on the setting's test sets (:func:`rnnlab.tasks.evaluate_task`: accuracy over the scored
positions, exact match per example). A cell with no early stop (its setting's target is None)
trains its whole budget as one schedule instead: warmup, then a cosine decay to ``lr_floor`` times
its learning rate (the preset's ``lr_floor``, or ``--lr-floor``; 1 keeps it constant).
The test sets are the same for every cell of a setting.

The settings (``--tasks`` picks families or setting names; the preset gives the sizes):

* ``mqar``: Zoology's MQAR at several (seq_len, kv_pairs); tested at the trained setting;
* ``state``: running parity / sums mod 3 and 5 / products in S3 and S5, trained on lengths 3-40,
  tested on the training lengths and on 41-64, 65-128 and 129-256 (``cpu-tracking``'s S3: trained on
  3-24, tested there and on 25-64 and 65-128);
* ``passkey``: trained at one length, tested at 1x, 2x, 4x, 8x and 16x that length; each cell
  also records the norm of every recurrent layer's state against position up to 16x, the
  accuracy on training-length examples after filler up to 16x (collapse without forgetting), and,
  for Mamba-2, the same with each training-free mitigation of state collapse the setting names
  (:class:`Mitigation`; by default state normalisation and faster forgetting on every block:
  :func:`passkey_extras`), shown as mixers ``"mamba2 +state-norm"``, ``"mamba2 +forget"``, ...
  beside the plain one;
* ``setdisj``: set disjointness, short set first or long set first, read once or twice (JRT);
* ``copy`` and ``induction``: the Mamba paper's selective copying and induction heads (induction
  also tested at 4x its training length).

Per (setting, mixer, d_model) the best learning rate is the one with the highest accuracy,
averaged over seeds and over the setting's test sets. Outputs in ``--out`` (default
``runs/bench/tasks_<preset>``): ``results.jsonl`` (one line per finished cell: a rerun skips
those, so an interrupted sweep continues where it stopped; a cell cut short continues from its
last checkpoint), ``results.csv`` (one row per cell and test set), ``results.json`` (every cell
and the best-learning-rate summary), ``tasks.png`` (MQAR accuracy against d_model and against
the model's state bytes, state tracking accuracy against length, passkey accuracy against
length, set disjointness per variant), ``passkey_state.png`` (each passkey cell's state norm
against position, one line per layer), a table on stdout and a final JSON line. Each cell's
training run lives in ``runs/<cell>/`` (``metrics.jsonl``, ``loss.png``; its checkpoints are
removed once the cell is scored unless ``--keep-checkpoints``).

Presets:

* ``tiny``: a smoke run of every family (d_model 32, 8 steps; Gated DeltaProduct on parity too):
  seconds; the tests run it;
* ``cpu-small``: the findings at small scale on a 2-core CPU (one thread), 14 cells, 15 minutes
  (measured on this host with the other core idle): MQAR (T 64, 8 pairs,
  vocabulary 64, up to 1200 steps) for attention, Gated DeltaNet and Mamba-2 at d_model 64
  (widen it with ``--tasks mqar --d-models 32 64 128``), parity with and without negative
  eigenvalues (DeltaNet, Mamba; d_model 32; each cell trains its whole 500 steps, with no early
  stop: stopping once the training lengths are solved costs extrapolation; ``cpu-parity`` is the
  three-seed run), passkey 64 -> 1024
  tokens, set disjointness (sets of 2 and 8 out of 32 elements) short or long set first, read
  once or twice (Gated DeltaNet, d_model 32);
* ``cpu-parity``: the negative-eigenvalue finding on parity over seeds 0, 1 and 2: DeltaNet and
  Mamba with and without negative eigenvalues (d_model 32, two layers), trained on lengths 3-40 for
  500 steps with no early stop, the learning rate 1e-2 decaying (cosine) to 1e-3, tested on 3-40,
  41-64, 65-128 and 129-256: 12 cells, about 2 minutes each alone on one thread (estimated; 6.5-7.5
  measured on a core shared with five other processes);
* ``cpu-tracking``: permutation composition in S3 on a CPU: one layer (d_model 32) of Gated DeltaNet
  with negative eigenvalues (one Householder step per token, n_h = 1) against Gated DeltaProduct
  (n_h = 2, negative eigenvalues), trained on lengths 3-24 until the validation set is perfect or
  600 steps, tested at 3-24, 25-64 and 65-128, seeds 0 and 1: one reflection per token cannot
  express S3's rotations (its 3-cycles) in one layer, a product of two can;
* ``cpu-passkey``: state collapse and its mitigations: cpu-small's passkey cell (Mamba-2, d_model
  64, 400 steps at T = 64) scored with the two default mitigations and with faster forgetting on
  the first block alone (decay x1.2 and x1.5: the block whose state norm leaves its training range),
  and the trained mitigation, the same model trained at T = 128 (``passkey-T128``), tested at the
  same lengths 64 .. 1024; 512 test examples per length;
* ``cpu-jrt``: set disjointness where the long set overflows a small recurrent state: sets of 4
  and 32 out of 128 elements (``setdisj-*``) and of 4 and 16 out of 64 (``setdisj-16-*``), short
  or long set first, read once or twice, for attention, Gated DeltaNet, RetNet and Mamba-2 with
  d_state 8 (d_model 32, up to 500 steps; 32 cells of 10-40 minutes each on a shared CPU core: run
  slices with ``--tasks`` / ``--mixers``); and sets of 2 and 16 out of 32 (``setdisj-2x16-*``, up to
  1500 steps) for a Gated DeltaNet with one head of 4 key dimensions (a 4 x 8 state per layer)
  against attention;
* ``cpu-mqar``: MQAR against recurrent state size at CPU scale, 9 cells, about 30 minutes on one CPU
  thread (each mixer's step time, measured with the core shared by one other process, times its
  budget; the README's run, with five or six processes on the core, took 10-24 minutes a cell):
  T 64, 8 pairs, vocabulary 256, batch 32, learning rate 1e-3, up to 2000 steps (stopping at
  validation accuracy 0.99), d_model 64, each mixer the second block after a
  ``swa(window=2)`` block: attention, and at 512 and at 2048 floats of recurrent state per layer
  (``CPU_MQAR_STATES``, set by the mixers' options) the delta rule (Gated DeltaNet) against three
  mixers that only decay: GLA (vector decay), Mamba-2 (scalar decay) and RetNet (fixed decay).
  The window block (attention to itself and the previous token) stands in for the short
  convolution Zoology puts before every mixer: without it a 2-layer attention model must first
  learn a previous-token head from RoPE, and at this scale it stays at about 1/8 (a value of the
  context at random) for 2000 steps. The vocabulary of 256 keeps a query's key from recurring
  among the filler before it (2.8% of the queries; 15% at vocabulary 64, where looking the key up
  cannot reach 0.99);
* ``gpu``: Zoology's scale: MQAR at vocab 8192 over (64, 4) .. (512, 64), d_model 64-512, every
  registered mixer plus the negative-eigenvalue variants, four learning rates, three seeds, up to
  20,000 steps of 256 examples per cell; every state-tracking group (with Gated DeltaProduct at
  n_h = 4 as well as its default 2, against Gated DeltaNet with negative eigenvalues, n_h = 1);
  passkey 512 -> 8192; set disjointness; selective copying over 4096 tokens; induction heads
  256 -> 1024. That is 26,352 cells with the 32 mixers registered now (``--list`` counts them):
  run slices of it with ``--mixers`` / ``--tasks`` / ``--lr`` / ``--seeds``, on several machines
  each with its own ``--out``.

``rnnlab bench tasks --preset cpu-small [--mixers attention mamba2 ...] [--tasks mqar state ...]
[--lr 1e-3 3e-3] [--seeds 0 1] [--steps N] [--out DIR]``
"""
from __future__ import annotations

import argparse
import sys
import csv
import io
import json
import re
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from . import report
from .. import build_model
from ..configs import Parser, float_in
from ..inference.mitigation import with_mixer_options
from ..models.layout import parse_layout
from ..models.lm import atomic_write
from ..models.registry import REGISTRY, mixers
from ..tasks import (InductionConfig, MQARConfig, PasskeyConfig, SelectiveCopyConfig, SetDisjointnessConfig,
                     StateTrackingConfig, TaskBatches, TaskConfig, after_filler, evaluate_task, generate,
                     state_norms)
from ..tasks.common import check_int, derive_seed
from ..tasks.recall import STANDARD_SETTINGS
from ..tasks.tracking import GROUPS
from ..train import TrainConfig, latest_checkpoint, train

FAMILIES = ("mqar", "state", "passkey", "setdisj", "copy", "induction")


@dataclass(frozen=True)
class Mitigation:
    """A training-free mitigation of state collapse that a passkey cell is also scored with: one
    option of its trained model's Mamba-2 blocks, set by :func:`rnnlab.inference.with_mixer_options`."""

    name: str  # shown as the mixer "<mixer> +<name>" beside the plain model
    option: str  # "decay_scale" (the log decay times value) or "state_norm_max" (a bound of value times the
    # largest norm the block's state reached on the validation examples, which have the training length)
    value: float  # the factor, > 0
    blocks: tuple[int, ...] = ()  # the block indices it is set on (empty: every block whose mixer has the option)

    def __post_init__(self) -> None:
        if self.option not in ("decay_scale", "state_norm_max"):
            raise ValueError(f"Mitigation option must be 'decay_scale' or 'state_norm_max', got {self.option!r}")
        if not self.value > 0:
            raise ValueError(f"Mitigation value must be > 0, got {self.value!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.blocks):
            raise ValueError(f"Mitigation blocks must be block indices >= 0, got {self.blocks!r}")


FORGET_SCALE = 2.0  # the default "forget" mitigation's decay_scale: every log decay doubled
# What every passkey setting is scored with unless it names its own (Stuffed Mamba's two training-free
# mitigations, on every Mamba-2 block): state normalisation at the training-length bound, and faster forgetting.
MITIGATIONS = (Mitigation("state-norm", "state_norm_max", 1.0), Mitigation("forget", "decay_scale", FORGET_SCALE))


@dataclass(frozen=True)
class Setting:
    """One task setting of a sweep: what to train on and what to test on."""

    name: str  # e.g. "mqar-T64-kv4": unique within a preset, part of each cell's key
    family: str  # one of FAMILIES
    train: TaskConfig  # training (and validation) batches come from this config
    tests: tuple[tuple[str, float, TaskConfig], ...]  # (label, x for the plots, config) per test set
    mixers: tuple[str, ...] = ()  # the mixers this setting trains (empty: the preset's); --mixers overrides
    d_models: tuple[int, ...] = ()  # the widths this setting trains (empty: the preset's); --d-models overrides
    steps: int = 0  # this setting's step budget per cell (0: the preset's); --steps overrides
    target: float | None = 0.0  # this setting's early-stop validation accuracy (0: the preset's; None: no early
    # stop, every cell trains its whole step budget); --target overrides
    mitigations: tuple[Mitigation, ...] = MITIGATIONS  # passkey: the mitigations scored beside the plain model


@dataclass(frozen=True)
class Preset:
    """The scale of a sweep; flags override the grid and the step budget."""

    mixers: tuple[str, ...]  # layout items trained by default, e.g. "deltanet(allow_neg_eigval=True)"
    d_models: tuple[int, ...]  # model widths
    lrs: tuple[float, ...]  # peak learning rates
    seeds: tuple[int, ...]  # seeds (model initialisation and training batches)
    settings: tuple[Setting, ...]  # the task settings
    n_layers: int = 2  # blocks per model
    steps: int = 2000  # optimiser steps per cell at most
    batch_size: int = 64  # examples per step
    warmup: int = 50  # steps of linear warmup
    eval_every: int = 100  # steps between validation checks (early stop)
    val_examples: int = 256  # examples in the validation set
    test_examples: int = 512  # examples per test set
    target: float = 0.99  # stop a cell once its validation accuracy reaches this (unless its setting has its own)
    tiny_options: bool = False  # bare mixer names get the registry's tiny options (for d_model 32)
    lr_floor: float = 1.0  # a cell with no early stop decays (cosine) to lr_floor * lr over its budget; 1: constant

    def __post_init__(self) -> None:
        if not 0 <= self.lr_floor <= 1:
            raise ValueError(f"lr_floor must be in [0, 1], got {self.lr_floor!r}")


# -- settings -----------------------------------------------------------------------------------------
def mqar_settings(pairs, vocab_size: int) -> list[Setting]:
    """MQAR at each (seq_len, kv_pairs), tested at the same setting."""
    out = []
    for T, P in pairs:
        c = MQARConfig(seq_len=T, kv_pairs=P, vocab_size=vocab_size)
        out.append(Setting(f"mqar-T{T}-kv{P}", "mqar", c, (("test", T, c),)))
    return out


def state_settings(groups, train=(3, 40), buckets=((41, 64), (65, 128), (129, 256))) -> list[Setting]:
    """One setting per group: trained on lengths ``train``, tested there and on each bucket."""
    out = []
    for group in groups:
        c = StateTrackingConfig(group, *train)
        tests = [(f"{train[0]}-{train[1]}", train[1], c)]
        tests += [(f"{lo}-{hi}", hi, StateTrackingConfig(group, lo, hi)) for lo, hi in buckets]
        out.append(Setting(f"state-{group}", "state", c, tuple(tests)))
    return out


def passkey_settings(seq_len: int, multiples=(1, 2, 4, 8, 16), key_len: int = 4, base: int = 0,
                     mitigations: tuple[Mitigation, ...] = MITIGATIONS) -> list[Setting]:
    """Passkey trained at ``seq_len``, tested at each multiple of ``base`` tokens (0: of ``seq_len``;
    a model trained longer is then tested at the same lengths as one trained at ``base``), scored
    with ``mitigations`` beside the plain model."""
    check_int("base", base, 0)
    c = PasskeyConfig(seq_len=seq_len, key_len=key_len)
    unit = base or seq_len
    tests = tuple((f"{m}x", m * unit, replace(c, seq_len=m * unit)) for m in multiples)
    return [Setting(f"passkey-T{seq_len}", "passkey", c, tests, mitigations=mitigations)]


def setdisj_settings(short_len: int, long_len: int, n_elements: int, tag: str = "") -> list[Setting]:
    """Set disjointness in its four variants: short or long set first, read once or twice
    (``tag`` goes into the names, to tell several sizes apart in one preset)."""
    out = []
    for jrt in (False, True):
        for short_first in (True, False):
            c = SetDisjointnessConfig(short_len, long_len, n_elements, short_first=short_first, jrt=jrt)
            name = f"setdisj{tag}-{'short' if short_first else 'long'}-first{'-jrt' if jrt else ''}"
            out.append(Setting(name, "setdisj", c, (("test", c.seq_len, c),)))
    return out


def copy_settings(region_len: int, n_tokens: int, n_symbols: int) -> list[Setting]:
    """Selective copying of ``n_tokens`` out of ``region_len`` positions, tested at the same setting."""
    c = SelectiveCopyConfig(region_len, n_tokens, n_symbols)
    return [Setting(f"copy-R{region_len}-N{n_tokens}", "copy", c, (("test", c.seq_len, c),))]


def induction_settings(seq_len: int, n_symbols: int, multiples=(1, 4)) -> list[Setting]:
    """Induction heads trained at ``seq_len``, tested at each multiple of it."""
    c = InductionConfig(seq_len, n_symbols)
    tests = tuple((f"{m}x", m * seq_len, replace(c, seq_len=m * seq_len)) for m in multiples)
    return [Setting(f"induction-T{seq_len}", "induction", c, tests)]


def only(settings: list[Setting], mixers: tuple[str, ...] = (), d_models: tuple[int, ...] = (),
         steps: int = 0, target: float | None = 0.0) -> list[Setting]:
    """The settings with their own mixers, widths, step budget and early-stop target (empty / 0: the
    preset's; target None: no early stop)."""
    return [replace(s, mixers=mixers, d_models=d_models, steps=steps, target=target) for s in settings]


# Faster forgetting on the first block alone, the one whose state norm grows past its training range
# in the cpu-small passkey cell (the second block's stays flat), at two strengths.
PASSKEY_BLOCK0 = (Mitigation("forget-0 x1.2", "decay_scale", 1.2, (0,)),
                  Mitigation("forget-0 x1.5", "decay_scale", 1.5, (0,)))

# cpu-jrt's sets of 2 and 16 out of 32: a Gated DeltaNet layer with one head of 4 key dimensions (a 4 x 8
# state), too small to hold the long set, against attention, whose cache holds every token.
JRT_SMALL_STATE = ("gated_deltanet(num_heads=1,head_dim=4)", "attention")

# The gpu preset's mixers: every registered one and the negative-eigenvalue variants. Its state
# tracking settings add Gated DeltaProduct with n_h = 4 Householder steps per token (the registry's
# default is 2; gated_deltanet(allow_neg_eigval=True) is n_h = 1): reflections compose into
# rotations, which the groups beyond parity need.
_GPU_MIXERS = tuple(mixers()) + ("deltanet(allow_neg_eigval=True)", "gated_deltanet(allow_neg_eigval=True)",
                                 "mamba(allow_neg_eigval=True)")

# cpu-mqar's recurrent mixers at d_model 64, by the floats of recurrent state per layer (their short
# convolutions' few taps aside): gated_deltanet and retnet hold H·K·2K (H 4 heads of K = head_dim), GLA
# H·(expand_k·64/H)·(expand_v·64/H), Mamba-2 (2·64/head_dim)·d_state·head_dim = 128·d_state.
CPU_MQAR_STATES: dict[int, tuple[str, ...]] = {
    512: ("gated_deltanet(head_dim=8)", "gla", "mamba2(d_state=4)", "retnet(head_dim=8)"),
    2048: ("gated_deltanet", "gla(expand_k=1.0,expand_v=2.0)", "mamba2(d_state=16)", "retnet"),
}

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        mixers=("attention", "gated_deltanet"), d_models=(32,), lrs=(3e-3,), seeds=(0,), n_layers=2, steps=8,
        batch_size=8, warmup=2, eval_every=4, val_examples=16, test_examples=16, tiny_options=True,
        settings=tuple(mqar_settings([(16, 2)], 32)
                       + only(state_settings(["parity"], (2, 8), ((9, 16),)),
                              ("attention", "gated_deltanet", "gated_deltaproduct"))
                       + passkey_settings(12, (1, 2), key_len=2) + setdisj_settings(2, 4, 8)[:2]
                       + copy_settings(8, 2, 4) + induction_settings(8, 4, (1, 2)))),
    "cpu-small": Preset(
        mixers=("attention", "gated_deltanet", "mamba2"), d_models=(64,), lrs=(3e-3,), seeds=(0,), n_layers=2,
        steps=400, batch_size=64, warmup=30, eval_every=100, val_examples=256, test_examples=256,
        settings=tuple(
            only(mqar_settings([(64, 8)], 64), steps=1200)
            + only(state_settings(["parity"]), ("deltanet", "deltanet(allow_neg_eigval=True)", "mamba",
                                                "mamba(allow_neg_eigval=True)"), (32,), 500, None)
            + passkey_settings(64)
            + only(setdisj_settings(2, 8, 32), ("gated_deltanet",), (32,), 600))),
    "cpu-parity": Preset(  # the negative-eigenvalue parity finding over three seeds, trained to convergence
        mixers=("deltanet", "deltanet(allow_neg_eigval=True)", "mamba", "mamba(allow_neg_eigval=True)"),
        d_models=(32,), lrs=(1e-2,), seeds=(0, 1, 2), n_layers=2, steps=500, batch_size=64, warmup=30,
        eval_every=100, val_examples=256, test_examples=256, lr_floor=0.1,
        settings=tuple(only(state_settings(["parity"]), target=None))),
    "cpu-jrt": Preset(  # set disjointness where the long set overflows a small recurrent state
        mixers=("attention", "gated_deltanet", "retnet", "mamba2(d_state=8)"), d_models=(32,), lrs=(3e-3,), seeds=(0,),
        n_layers=2, steps=500, batch_size=64, warmup=30, eval_every=100, val_examples=256, test_examples=256,
        settings=tuple(setdisj_settings(4, 32, 128) + setdisj_settings(4, 16, 64, "-16")
                       + only(setdisj_settings(2, 16, 32, "-2x16"), JRT_SMALL_STATE, steps=1500))),
    "cpu-passkey": Preset(  # state collapse: cpu-small's passkey cell with more mitigations, and trained longer
        mixers=("mamba2",), d_models=(64,), lrs=(3e-3,), seeds=(0,), n_layers=2, steps=400, batch_size=64, warmup=30,
        eval_every=100, val_examples=256, test_examples=512,
        settings=tuple(passkey_settings(64, mitigations=MITIGATIONS + PASSKEY_BLOCK0)
                       + passkey_settings(128, (1, 2, 4, 8, 16), base=64, mitigations=()))),
    "cpu-tracking": Preset(
        mixers=("gated_deltanet(allow_neg_eigval=True)", "gated_deltaproduct"), d_models=(32,), lrs=(3e-3,),
        seeds=(0, 1), n_layers=1, steps=600, batch_size=64, warmup=30, eval_every=100, val_examples=256,
        test_examples=256, target=1.0, settings=tuple(state_settings(["s3"], (3, 24), ((25, 64), (65, 128))))),
    "cpu-mqar": Preset(  # MQAR against recurrent state size at d_model 64: the state is set by mixer options
        mixers=tuple(f"swa(window=2),{m}" for m in ("attention",) + CPU_MQAR_STATES[512] + CPU_MQAR_STATES[2048]),
        d_models=(64,), lrs=(1e-3,), seeds=(0,), n_layers=2, steps=2000, batch_size=32, warmup=30,
        eval_every=100, val_examples=256, test_examples=256, settings=tuple(mqar_settings([(64, 8)], 256))),
    "gpu": Preset(
        mixers=_GPU_MIXERS,
        d_models=(64, 128, 256, 512), lrs=(1e-4, 3e-4, 1e-3, 3e-3), seeds=(0, 1, 2), n_layers=2, steps=20000,
        batch_size=256, warmup=500, eval_every=500, val_examples=1000, test_examples=3000,
        settings=tuple(mqar_settings(STANDARD_SETTINGS, 8192)
                       + only(state_settings(GROUPS), _GPU_MIXERS + ("gated_deltaproduct(num_householder=4)",))
                       + passkey_settings(512)
                       + setdisj_settings(16, 64, 256) + copy_settings(4096, 16, 16)
                       + induction_settings(256, 16))),
}


# -- one cell ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One trained model of the sweep."""

    setting: Setting
    mixer: str  # the layout item as given
    d_model: int
    lr: float
    seed: int
    steps: int  # optimiser steps at most
    target: float | None  # stop once the validation accuracy reaches this (None: train the whole budget)

    def key(self, p: Preset) -> str:
        """Everything that decides the cell's result, as one string (the resume key; a passkey setting's
        mitigations only when they are not the default ones, so that earlier results keep their keys)."""
        extra = {} if self.setting.mitigations == MITIGATIONS else dict(mitigations=repr(self.setting.mitigations))
        return json.dumps(dict(setting=self.setting.name, task=repr(self.setting.train), mixer=self.mixer,
                               d_model=self.d_model, lr=self.lr, seed=self.seed, steps=self.steps,
                               n_layers=p.n_layers, batch_size=p.batch_size, warmup=p.warmup, eval_every=p.eval_every,
                               val_examples=p.val_examples, target=self.target, tiny_options=p.tiny_options,
                               min_lr=self.min_lr(p), **extra),
                          sort_keys=True)

    def min_lr(self, p: Preset) -> float:
        """The learning rate the cell ends at: ``lr`` (constant, so that an early stop is the same run
        cut short) unless it has no early stop, then ``p.lr_floor * lr`` (cosine decay over its budget)."""
        return self.lr if self.target is not None else p.lr_floor * self.lr

    def dirname(self) -> str:
        """A file-system friendly name of the cell."""
        mixer = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.mixer).strip("_")
        return f"{self.setting.name}__{mixer}__d{self.d_model}__lr{self.lr:g}__s{self.seed}"


def layout_for(mixer: str, p: Preset) -> str:
    """The model layout of a mixer item: itself, or with the registry's tiny options for a bare
    name when the preset asks for them."""
    if p.tiny_options and mixer in REGISTRY and REGISTRY[mixer].tiny:
        return f"{mixer}({','.join(f'{k}={v!r}' for k, v in REGISTRY[mixer].tiny.items())})"
    return mixer


def _eval_batch(seq_len: int) -> int:
    """Rows per evaluation forward pass: about 16k tokens."""
    return max(1, 16384 // seq_len)


def run_cell(cell: Cell, p: Preset, run_dir: Path, device: torch.device, keep_checkpoints: bool,
             progress: Callable[[int], None] = lambda steps: None) -> dict:
    """Train one cell (continuing its run directory's checkpoint if it has one), score it and
    return its result row. ``progress(n)`` is told of every ``n`` steps of the cell's budget done
    (or skipped by the early stop): ``cell.steps`` in all."""
    s = cell.setting
    torch.manual_seed(cell.seed)
    model = build_model(layout=layout_for(cell.mixer, p), n_layers=p.n_layers, d_model=cell.d_model,
                        vocab_size=s.train.vocab_size).to(device)
    batches = TaskBatches(s.train, p.batch_size, cell.seed)
    val_x, val_y = generate(s.train, p.val_examples, derive_seed("val", s.name))
    checkpoint = latest_checkpoint(run_dir) if run_dir.exists() else None
    if checkpoint is None and run_dir.exists():  # killed before its first checkpoint: start afresh
        shutil.rmtree(run_dir)
    step = int(checkpoint.name.removeprefix("step_")) if checkpoint is not None else 0
    budget = cell.steps
    progress(step)
    t0 = time.time()
    curve = []  # (step, validation accuracy) after each round of this run
    while True:  # with an early stop: rounds of eval_every steps; without: the whole budget in one schedule
        goal = budget if cell.target is None else min(budget, step + p.eval_every) if step < budget else step
        config = TrainConfig(steps=goal, batch_size=p.batch_size, seq_len=s.train.seq_len, lr=cell.lr,
                             min_lr=cell.min_lr(p), warmup=min(p.warmup, budget), eval_every=0,
                             save_every=p.eval_every if cell.target is None else 0, keep_last=1,
                             out_dir=str(run_dir), resume=checkpoint is not None or step > 0)
        result = train(model, batches, config, progress=False)
        if result["interrupted"]:
            raise KeyboardInterrupt(f"cell {cell.dirname()} interrupted at step {result['step']} (checkpoint saved)")
        progress(result["step"] - step)
        step = result["step"]
        val_accuracy = evaluate_task(model, val_x, val_y, _eval_batch(s.train.seq_len))["accuracy"]
        curve.append([step, val_accuracy])
        stopped = cell.target is not None and val_accuracy >= cell.target
        if stopped or step >= budget:
            break
    seconds = time.time() - t0
    progress(budget - step)
    tests = {}
    for label, x, config in s.tests:
        inputs, targets = generate(config, p.test_examples, derive_seed("test", s.name, label))
        tests[label] = dict(x=x, **evaluate_task(model, inputs, targets, _eval_batch(config.seq_len)))
    extras = passkey_extras(model, s, p, val_x) if s.family == "passkey" else {}
    with torch.no_grad():
        _, state = model(generate(s.train, 1, 0)[0].to(device))
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return dict(setting=s.name, family=s.family, mixer=cell.mixer, d_model=cell.d_model, lr=cell.lr, seed=cell.seed,
                steps=step, early_stop=stopped, val_accuracy=val_accuracy, val_curve=curve,
                loss=result.get("loss"), params=model.num_params(), state_bytes=state.nbytes,
                train_seconds=seconds, tests=tests, **extras)


# -- passkey: the state's norm and the mitigations of state collapse ------------------------------------
NORM_EXAMPLES = 16  # examples whose state norms are recorded (the mean over them is kept)


def passkey_extras(model, s: Setting, p: Preset, val_x: torch.Tensor) -> dict:
    """A passkey cell's extra results: ``state_norms`` {variant: {"positions": [...], "layers":
    {block: [mean state norm at each position]}}} on the longest test set's first examples,
    recorded every quarter of the training length; ``after_filler`` {variant: accuracy} on the
    first test set's examples (the training length) preceded by filler up to the longest test
    length, where only a collapsed state (not forgetting) fails; and ``mitigations`` {name: tests} for a model
    whose mixers take the inference-time mitigations of state collapse (Mamba-2,
    :mod:`rnnlab.inference.mitigation`): one per :class:`Mitigation` of the setting (by default
    ``state-norm``, each block's state bounded by ``state_norm_max`` at the largest norm it reached on
    the validation examples, and ``forget``, every log decay multiplied by ``FORGET_SCALE``), scored
    on the same test sets as the plain model. A mitigation naming a block whose mixer lacks its
    option raises ValueError. The plain model's variant is ``""``."""
    every = max(1, s.train.seq_len // 4)
    label, _, longest = s.tests[-1]
    probe = generate(longest, min(NORM_EXAMPLES, p.test_examples), derive_seed("test", s.name, label))[0]
    variants = {"": model}
    takes = [i for i, b in enumerate(model.blocks) if b.mixer is not None and hasattr(b.mixer.config, "state_norm_max")]
    if takes:
        _, val_norms = state_norms(model, val_x[:NORM_EXAMPLES], every)
        for m in s.mitigations:
            bad = sorted(set(m.blocks) - set(takes))
            if bad:
                raise ValueError(f"mitigation {m.name!r}: blocks {bad} have no mixer with option {m.option} "
                                 f"(blocks that have: {takes})")
            unit = {i: float(val_norms[i].max()) if m.option == "state_norm_max" else 1.0 for i in m.blocks or takes}
            variants[m.name] = with_mixer_options(model, {i: {m.option: m.value * u} for i, u in unit.items()})
    first_label, _, first = s.tests[0]
    padded = after_filler(first, *generate(first, p.test_examples, derive_seed("test", s.name, first_label)),
                          longest.seq_len, derive_seed("filler", s.name))
    norms, filler, mitigations = {}, {}, {}
    for name, m in variants.items():
        positions, by_layer = state_norms(m, probe, every)
        norms[name] = dict(positions=positions.tolist(), layers={str(i): v.mean(1).tolist() for i, v in by_layer.items()})
        filler[name] = evaluate_task(m, *padded, _eval_batch(longest.seq_len))["accuracy"]
        if name:
            tests = {}
            for label, x, config in s.tests:
                inputs, targets = generate(config, p.test_examples, derive_seed("test", s.name, label))
                tests[label] = dict(x=x, **evaluate_task(m, inputs, targets, _eval_batch(config.seq_len)))
            mitigations[name] = tests
    return dict(state_norms=norms, after_filler=filler, mitigations=mitigations)


def with_mitigations(rows: list[dict]) -> list[dict]:
    """The cell rows, each followed by one row per mitigation it was scored with (mixer
    ``"<mixer> +<mitigation>"``, tests those of the mitigated model), so that tables, CSV and
    plots show them beside the plain model."""
    out = []
    for r in rows:
        out.append(r)
        out += [{**r, "mixer": f"{r['mixer']} +{name}", "tests": tests, "mitigations": {}}
                for name, tests in r.get("mitigations", {}).items()]
    return out


def print_state_norms(rows: list[dict], best: list[dict]) -> None:
    """Per passkey cell (best learning rate, first seed) and variant: each recurrent layer's mean
    state norm at each test length."""
    picked = _norm_rows(rows, best)
    if not picked:
        return
    print(f"\n{'passkey state norm':26} {'mixer':34} {'layer':>5} | mean norm at each test length")
    for r in picked:
        marks = {t["x"]: label for label, t in r["tests"].items()}
        first, last = min(marks), max(marks)
        for name, rec in r["state_norms"].items():
            mixer = f"{r['mixer']} +{name}" if name else r["mixer"]
            print(f"{r['setting']:26} {mixer:34} {'':>5} | accuracy with the key in the last {first} of {last} "
                  f"tokens: {r['after_filler'][name]:.3f}")
            at = dict(zip(rec["positions"], range(len(rec["positions"]))))
            for layer, values in rec["layers"].items():
                text = "  ".join(f"{marks[x]} {values[at[x]]:.3g}" for x in sorted(marks) if x in at)
                print(f"{r['setting']:26} {mixer:34} {layer:>5} | {text}")


def _norm_rows(rows: list[dict], best: list[dict]) -> list[dict]:
    """The passkey cells with state norms at their group's best learning rate, the first seed each."""
    lrs = {(b["setting"], b["mixer"], b["d_model"]): b["best_lr"] for b in best}
    out = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        key = (r["setting"], r["mixer"], r["d_model"])
        if r.get("state_norms") and lrs.get(key) == r["lr"]:
            out.setdefault(key, r)
    return list(out.values())


def plot_state_norms(path: Path, rows: list[dict], best: list[dict], title: str) -> None:
    """The PNG of the passkey cells' state norm against position: one panel per (cell, variant),
    one line per recurrent layer, dotted lines at the test lengths; a cell's variants share the
    y range."""
    panels = [(r, name, rec) for r in _norm_rows(rows, best) for name, rec in r["state_norms"].items()
              if rec["layers"]]
    if not panels:
        return
    ranges: dict[int, list[float]] = {}  # id of the cell row -> the positive norms of all its variants
    for r, _, rec in panels:
        ranges.setdefault(id(r), []).extend(v for values in rec["layers"].values() for v in values if v > 0)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (r, name, rec) in zip(axes.flat, panels):
        for layer, values in rec["layers"].items():
            ax.plot(rec["positions"], values, marker="o", markersize=2, linewidth=1.2, label=f"layer {layer}")
        for label, t in r["tests"].items():
            ax.axvline(t["x"], color="grey", linestyle=":", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if ranges[id(r)]:
            ax.set_ylim(min(ranges[id(r)]) / 1.2, max(ranges[id(r)]) * 1.2)
        ax.set_xlabel("position (tokens read); dotted: the test lengths")
        ax.set_ylabel("state norm (mean over examples)")
        mixer = f"{r['mixer']} +{name}" if name else r["mixer"]
        ax.set_title(f"{r['setting']} {mixer} d{r['d_model']}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    _save_figure(fig, path, title)


# -- summaries ----------------------------------------------------------------------------------------
def score(row: dict) -> float:
    """A cell's accuracy averaged over its test sets."""
    return statistics.fmean(t["accuracy"] for t in row["tests"].values())


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (setting, mixer, d_model): the learning rate with the best seed-averaged score, with its
    test accuracies averaged over seeds."""
    groups: dict[tuple, dict[float, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["mixer"], r["d_model"]), {}).setdefault(r["lr"], []).append(r)
    out = []
    for (setting, mixer, d_model), by_lr in groups.items():
        lr, runs = max(by_lr.items(), key=lambda kv: statistics.fmean(score(r) for r in kv[1]))
        tests = {label: dict(x=runs[0]["tests"][label]["x"],
                             accuracy=statistics.fmean(r["tests"][label]["accuracy"] for r in runs),
                             exact_match=statistics.fmean(r["tests"][label]["exact_match"] for r in runs))
                 for label in runs[0]["tests"]}
        out.append(dict(setting=setting, family=runs[0]["family"], mixer=mixer, d_model=d_model, best_lr=lr,
                        seeds=len(runs), score=statistics.fmean(score(r) for r in runs),
                        steps=statistics.fmean(r["steps"] for r in runs), state_bytes=runs[0]["state_bytes"],
                        params=runs[0]["params"], lrs_tried=sorted(by_lr), tests=tests))
    return out


def print_table(best: list[dict]) -> None:
    """One line per (setting, mixer, d_model): best learning rate, steps, state bytes, test accuracies."""
    print(f"\n{'setting':26} {'mixer':34} {'d':>4} {'best lr':>8} {'steps':>6} {'state B':>10} | accuracy per test set")
    for b in best:
        tests = "  ".join(f"{label} {t['accuracy']:.3f}" for label, t in b["tests"].items())
        print(f"{b['setting']:26} {b['mixer']:34} {b['d_model']:4d} {b['best_lr']:8.0e} {b['steps']:6.0f} "
              f"{b['state_bytes']:10,d} | {tests}")


def write_csv(path: Path, rows: list[dict]) -> None:
    """One row per (cell, test set)."""
    fields = ["setting", "family", "mixer", "d_model", "lr", "seed", "steps", "early_stop", "val_accuracy", "params",
              "state_bytes", "train_seconds", "test", "x", "accuracy", "exact_match"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        for label, t in r["tests"].items():
            w.writerow({**r, "test": label, "x": t["x"], "accuracy": t["accuracy"], "exact_match": t["exact_match"]})
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def _label(b: dict, widths: set[int]) -> str:
    return b["mixer"] if len(widths) == 1 else f"{b['mixer']} d{b['d_model']}"


def plot(path: Path, best: list[dict], title: str) -> None:
    """The PNG: MQAR accuracy vs d_model and vs state bytes (the hardest MQAR setting run), state
    tracking and passkey accuracy vs length, set disjointness per variant; one line per mixer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = []  # (title, xlabel, {line: [(x, y)]}, x tick labels or None)
    mqar = [b for b in best if b["family"] == "mqar"]
    if mqar:
        hardest = max({b["setting"] for b in mqar}, key=lambda s: tuple(int(v) for v in re.findall(r"\d+", s))[::-1])
        rows = [b for b in mqar if b["setting"] == hardest]
        for xkey, xlabel in (("d_model", "d_model"), ("state_bytes", "state bytes per sequence")):
            series: dict[str, list] = {}
            for b in rows:
                series.setdefault(b["mixer"], []).append((b[xkey], b["score"]))
            panels.append((f"{hardest}: accuracy vs {xlabel}", xlabel, series, None))
    for family, xlabel in (("state", "length (upper end of the test range)"), ("passkey", "length (tokens)"),
                           ("induction", "length (tokens)")):
        for setting in sorted({b["setting"] for b in best if b["family"] == family}):
            rows = [b for b in best if b["setting"] == setting]
            widths = {b["d_model"] for b in rows}
            series = {_label(b, widths): [(t["x"], t["accuracy"]) for t in b["tests"].values()] for b in rows}
            panels.append((f"{setting}: accuracy vs length", xlabel, series, None))
    for family in ("setdisj", "copy"):
        rows = [b for b in best if b["family"] == family]
        if rows:
            names = sorted({b["setting"] for b in rows})
            widths = {b["d_model"] for b in rows}
            series = {}
            for b in rows:
                series.setdefault(_label(b, widths), []).append((names.index(b["setting"]), b["score"]))
            panels.append((f"{family}: accuracy per setting", "", series, names))
    if not panels:
        return
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (panel, xlabel, series, ticks) in zip(axes.flat, panels):
        for label, points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.3, label=label)
        if ticks is None:
            ax.set_xscale("log", base=2)
            xs = sorted({x for points in series.values() for x, _ in points})
            if len(xs) <= 12 and all(b >= 1.5 * a for a, b in zip(xs, xs[1:])):
                # label the measured x values themselves (e.g. length 40, d_model 32) unless two would
                # overlap (state bytes of different mixers may lie close together)
                ax.set_xticks(xs)
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        else:
            ax.set_xticks(range(len(ticks)), ticks, rotation=20, fontsize=7)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.set_title(panel, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    _save_figure(fig, path, title)


# -- the command --------------------------------------------------------------------------------------
def build_parser() -> Parser:
    """The command's flags (the module docstring is its epilog)."""
    p = Parser(prog="rnnlab bench tasks", description=__doc__.split("\n\n")[0], epilog=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                   help="the sweep's scale (default cpu-small)")
    p.add_argument("--mixers", nargs="+", help="layout items, e.g. attention 'deltanet(allow_neg_eigval=True)' "
                                               "(default: the preset's)")
    p.add_argument("--tasks", nargs="+", help=f"families ({', '.join(FAMILIES)}) or setting names "
                                              "(default: all of the preset's)")
    p.add_argument("--d-models", nargs="+", type=int, help="model widths (default: the preset's)")
    p.add_argument("--lr", nargs="+", type=float_in(0, lo_open=True), help="peak learning rates (default: the preset's)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the preset's)")
    p.add_argument("--steps", type=int, help="optimiser steps per cell at most (default: each setting's budget in "
                                             "the preset)")
    p.add_argument("--target", type=float_in(0, 1, lo_open=True), help="stop a cell at this validation accuracy "
                                                                     "(default: each setting's target in the preset)")
    p.add_argument("--lr-floor", type=float_in(0, 1), help="a cell with no early stop decays (cosine) to this "
                                                           "fraction of its learning rate (default: the preset's)")
    p.add_argument("--out", help="results directory (default runs/bench/tasks_<preset>)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: small models are many tiny "
                                                          "ops, which run fastest on one thread)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each cell's final checkpoint")
    p.add_argument("--list", action="store_true", help="print the sweep's cells with their step budgets and "
                                                           "targets, train nothing")
    return p


def resolve(p: argparse.ArgumentParser, a: argparse.Namespace) -> tuple[Preset, list[Cell]]:
    """The preset with the flags applied and the sweep's cells; bad flags end in ``p.error``."""
    preset = PRESETS[a.preset]
    if a.d_models is not None and min(a.d_models) < 1:
        p.error(f"--d-models must be >= 1, got {a.d_models}")
    if a.seeds is not None and min(a.seeds) < 0:
        p.error(f"--seeds must be >= 0, got {a.seeds}")
    if a.lr is not None and any(not v > 0 for v in a.lr):
        p.error(f"--lr must be > 0, got {a.lr}")
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.steps is not None and a.steps < 1:
        p.error(f"--steps must be >= 1, got {a.steps}")
    if a.target is not None and not 0 < a.target <= 1:
        p.error(f"--target must be in (0, 1], got {a.target}")
    preset = replace(preset, lrs=tuple(a.lr or preset.lrs), seeds=tuple(preset.seeds if a.seeds is None else a.seeds),
                     target=a.target or preset.target, lr_floor=preset.lr_floor if a.lr_floor is None else a.lr_floor)
    settings = list(preset.settings)
    if a.tasks:
        names = {s.name for s in settings}
        unknown = sorted(set(a.tasks) - names - set(FAMILIES))
        if unknown:
            p.error(f"--tasks: unknown {unknown}; families: {', '.join(FAMILIES)}; settings of preset "
                    f"{a.preset}: {', '.join(sorted(names))}")
        settings = [s for s in settings if s.name in a.tasks or s.family in a.tasks]
        if not settings:
            p.error(f"--tasks {' '.join(a.tasks)}: preset {a.preset} has no such settings")
    cells = [Cell(s, m, d, lr, seed, a.steps or s.steps or preset.steps,
                  a.target or (preset.target if s.target == 0 else s.target)) for s in settings
             for m in (a.mixers or s.mixers or preset.mixers) for d in (a.d_models or s.d_models or preset.d_models)
             for lr in preset.lrs for seed in preset.seeds]
    for mixer, d in sorted({(c.mixer, c.d_model) for c in cells}):
        try:
            parse_layout(layout_for(mixer, preset), preset.n_layers, d)
        except (ValueError, TypeError, KeyError) as e:
            p.error(f"--mixers: {mixer!r} at d_model {d}: {e}")
    return preset, cells


def _read_results(path: Path) -> dict[str, dict]:
    """The finished cells of a results.jsonl (written whole each time, never torn), by key."""
    if not path.is_file():
        return {}
    return {row["cell"]: row for row in map(json.loads, path.read_text().splitlines())}


def main(argv: list[str] | None = None) -> list[dict]:
    """``rnnlab bench tasks [flags]``: run (or continue) the sweep; returns the best-learning-rate rows."""
    parser = build_parser()
    a = parser.parse_args(argv)
    preset, cells = resolve(parser, a)
    out = Path(a.out or f"runs/bench/tasks_{a.preset}")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.list:
        for c in cells:
            stop = "no early stop" if c.target is None else f"stopping at validation accuracy {c.target:g}"
            print(f"{c.dirname()}  (at most {c.steps} steps, {stop})")
        print(f"{len(cells)} cells")
        return []
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        return _sweep(a, preset, cells, out, device)
    finally:
        torch.set_num_threads(threads)


def _sweep(a: argparse.Namespace, preset: Preset, cells: list[Cell], out: Path, device: torch.device) -> list[dict]:
    """Run the cells not yet in ``out/results.jsonl``, then write the table, CSV, JSON and PNG."""
    results_path = out / "results.jsonl"
    done = _read_results(results_path)
    todo = [c for c in cells if c.key(preset) not in done]
    print(f"rnnlab bench tasks --preset {a.preset}: {len(cells)} cells ({len(cells) - len(todo)} already in "
          f"{results_path}), {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    from tqdm import tqdm
    bar = tqdm(total=sum(c.steps for c in cells), initial=sum(c.steps for c in cells if c.key(preset) in done),
               desc="bench tasks", unit="step", dynamic_ncols=True,  # budgets: an early stop skips the rest
               disable=not sys.stderr.isatty())  # in a log file: one line per finished cell, no bar
    try:
        for i, cell in enumerate(todo):
            bar.set_postfix_str(f"cell {len(cells) - len(todo) + i + 1}/{len(cells)} {cell.dirname()}", refresh=True)
            row = run_cell(cell, preset, out / "runs" / cell.dirname(), device, a.keep_checkpoints, bar.update)
            row["cell"] = cell.key(preset)
            done[row["cell"]] = row
            lines = "".join(json.dumps(r) + "\n" for r in done.values())
            atomic_write(results_path, lambda tmp: Path(tmp).write_text(lines))
            bar.write(f"{cell.dirname()}: {row['steps']} steps, "
                      + ", ".join(f"{k} {t['accuracy']:.3f}" for k, t in row["tests"].items()))
    except KeyboardInterrupt as e:
        bar.close()
        raise SystemExit(f"rnnlab bench tasks: {e or 'interrupted'}; run the same command again to continue") from None
    bar.close()
    keys = {c.key(preset) for c in cells}
    rows = [r for k, r in done.items() if k in keys]
    best = best_rows(with_mitigations(rows))
    print_table(best)
    print_state_norms(rows, best)
    write_csv(out / "results.csv", with_mitigations(rows))
    extra = dict(preset=a.preset, device=str(device), torch=torch.__version__, out=str(out),
                 csv=str(out / "results.csv"), json=str(out / "results.json"), png=str(out / "tasks.png"))
    plot_state_norms(out / "passkey_state.png", rows, best,
                     f"rnnlab bench tasks --preset {a.preset}: passkey state norm against position")
    payload = {"bench": "tasks", **extra, "preset_config": _preset_json(preset), "cells": rows, "best": best}
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2)))
    plot(out / "tasks.png", best, f"rnnlab bench tasks --preset {a.preset} (best learning rate per point)")
    report("tasks", best, None, **extra)
    return best


def _preset_json(p: Preset) -> dict:
    """The preset as JSON, its settings by name."""
    d = {k: v for k, v in p.__dict__.items() if k != "settings"}
    d["settings"] = [s.name for s in p.settings]
    return d



def _save_figure(fig, path: Path, title: str) -> None:
    """Title ``fig``, write it to ``path`` as a PNG (atomically) and close it."""
    import matplotlib.pyplot as plt
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
