"""The decoding engine: continuous batching of completion jobs over one model.

A background thread keeps one running batch: a :class:`~rnnlab.models.lm.ModelState` whose rows
are the jobs being decoded and their last logits (B, V). Between two decode steps, new jobs join:
their prompts are prefilled together as one ragged batch (:meth:`rnnlab.Stream.feed` with a list
of prompts, each row starting from its session's state or the initial state) and their rows are
appended with :meth:`ModelState.cat`; finished jobs leave with :meth:`ModelState.select`. Every
row is sampled with its own settings and generator, so a job's tokens are those it would get
alone (:meth:`rnnlab.Stream.sample`: each sampled token is fed back, so a finished job's state
covers every token of its answer).

Ragged rows need every mixer to keep a state per row at its own position: recurrent states do by
nature, attention's KV cache keeps a position per row (its rows are padded to the longest), and so
does the model state (``ModelState.seen``), so a row taken out of the batch counts its own tokens.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..inference.generate import Stream, sample_next
from ..models.lm import LM, ModelState

__all__ = ["Job", "Result", "Engine"]


@dataclass
class Result:
    """What a finished job produced: ``text`` (stop strings cut off), ``finish_reason`` ("stop":
    eos token or stop string; "length": max_tokens reached; "error": see ``error``), token counts,
    and the state (one row, its ``seen`` the conversation's tokens) and logits (1, V) after it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    state: ModelState | None
    logits: torch.Tensor | None
    error: str | None = None


@dataclass
class Job:
    """One completion to decode. ``on_text`` receives each new piece of text as soon as it cannot
    be part of a stop string or of an unfinished character; ``on_done`` receives the
    :class:`Result`. Both are called from the engine's thread."""

    prompt: list[int]  # tokens to feed before sampling (may be empty when ``logits`` is given)
    state: ModelState | None  # where the conversation stands (one row); None: the start
    logits: torch.Tensor | None  # (1, V) after the conversation's last token; None if it has none
    max_tokens: int  # tokens to sample at most
    temperature: float  # 0 = greedy
    top_p: float | None  # nucleus sampling threshold in (0, 1], None = off
    generator: torch.Generator  # this job's random numbers
    stop: list[str]  # the answer ends before the first of these strings
    on_text: Callable[[str], None]
    on_done: Callable[[Result], None]
    ids: list[int] = field(default_factory=list)  # tokens sampled so far
    sent: int = 0  # characters of the answer passed to on_text

    def text(self, decode: Callable[[list[int]], str]) -> tuple[str, bool]:
        """The answer so far, cut before the first stop string, and whether one was found."""
        text = decode(self.ids)
        cuts = [text.find(s) for s in self.stop if s in text]
        return (text[:min(cuts)], True) if cuts else (text, False)

    def safe(self, text: str) -> int:
        """How much of ``text`` can be sent: not an unfinished character, nor a prefix of a stop string."""
        end = len(text.rstrip("\ufffd"))
        held = 0
        for s in self.stop:
            held = max([held] + [k for k in range(1, min(len(s), end + 1)) if text[:end].endswith(s[:k])])
        return end - held


class Engine:
    """Decodes :class:`Job` s submitted from any thread, ``max_batch`` rows at a time, in one
    background thread (:meth:`start`, :meth:`stop`). ``decode`` turns token ids into text and
    ``eos_id`` (or None) ends an answer."""

    def __init__(self, model: LM, decode: Callable[[list[int]], str], eos_id: int | None, max_batch: int):
        self.model, self.decode, self.eos_id = model, decode, eos_id
        self.max_batch = max_batch
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._jobs: list[Job] = []  # the running batch's jobs, one per row
        self._state: ModelState | None = None  # their state rows
        self._logits: torch.Tensor | None = None  # (B, V) their last logits
        self._done: set[int] = set()  # ids of the jobs answered during the current iteration

    def start(self) -> None:
        """Start the decoding thread."""
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="rnnlab-serve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the running jobs, refuse the waiting ones, and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        while self._waiting:
            self._fail(self._waiting.popleft(), "the server is shutting down")

    def submit(self, job: Job) -> None:
        """Queue ``job``; it joins the batch between two decode steps."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            self._waiting.append(job)
            self._cond.notify()

    # -- the loop -----------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._cond:
                    while not self._jobs and not self._waiting and not self._stopping:
                        self._cond.wait()
                    if self._stopping and not self._jobs:
                        return
                    room = self.max_batch - len(self._jobs)
                    joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))] \
                        if not self._stopping else []
                if joining:
                    try:
                        self._join(joining)
                    except Exception as e:  # e.g. a token the model does not know: only these jobs fail
                        self._fail_all(joining, e)
                if self._jobs:
                    try:
                        self._step()
                    except Exception as e:  # a failure of the model: end the batch's jobs, keep serving
                        self._fail_all(self._jobs, e)
                        self._jobs, self._state, self._logits = [], None, None
                self._done.clear()

    def _join(self, jobs: list[Job]) -> None:
        """Prefill the new jobs' prompts as one ragged batch and append their rows."""
        fed = [j for j in jobs if j.prompt]
        rows = {}
        if fed:
            starts = [j.state for j in fed]
            start = None if all(s is None for s in starts) else ModelState.cat(
                [s if s is not None else self.model.init_state(1, device=self._device()) for s in starts])
            stream = Stream(self.model, start)
            stream.feed([torch.tensor(j.prompt, dtype=torch.long) for j in fed])
            rows = {id(j): (stream.state.select([i]), stream.logits[i:i + 1]) for i, j in enumerate(fed)}
        staying = [j for j in jobs if j.max_tokens > 0]
        if staying:  # the batch changes only once every new row is ready
            states = [rows.get(id(j), (j.state, j.logits))[0] for j in staying]
            logits = [rows.get(id(j), (j.state, j.logits))[1] for j in staying]
            self._state = ModelState.cat(([self._state] if self._jobs else []) + states)
            self._logits = torch.cat(([self._logits] if self._jobs else []) + logits)
            self._jobs = self._jobs + staying
        for j in jobs:
            if j.max_tokens == 0:  # only read: the conversation's state after its prompt
                state, logits = rows.get(id(j), (j.state, j.logits))
                self._done.add(id(j))
                j.on_done(Result("", "length", len(j.prompt), 0, state, logits))

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _step(self) -> None:
        """Sample one token for every row, feed them in one call, and let finished jobs leave."""
        nxt = torch.cat([sample_next(self._logits[i:i + 1], j.temperature, None, j.top_p, j.generator)
                         for i, j in enumerate(self._jobs)])  # (B,)
        out, self._state = self.model(nxt[:, None], self._state)
        self._logits = out[:, -1]
        keep = []
        for i, (job, token) in enumerate(zip(self._jobs, nxt.tolist())):
            reason = None
            if token == self.eos_id:
                reason = "stop"
            else:
                job.ids.append(token)
            text, stopped = job.text(self.decode)
            if stopped:
                reason = "stop"
            elif reason is None and len(job.ids) >= job.max_tokens:
                reason = "length"
            end = len(text) if reason else job.safe(text)
            if end > job.sent:
                job.on_text(text[job.sent:end])
                job.sent = end
            if reason is None:
                keep.append(i)
                continue
            self._done.add(id(job))
            job.on_done(Result(text, reason, len(job.prompt), len(job.ids) + (token == self.eos_id),
                               self._state.select([i]), self._logits[i:i + 1]))
        if len(keep) < len(self._jobs):
            self._jobs = [self._jobs[i] for i in keep]
            self._state = self._state.select(keep) if keep else None
            self._logits = self._logits[keep] if keep else None

    def _fail_all(self, jobs: list[Job], error: Exception) -> None:
        for job in jobs:
            if id(job) not in self._done:
                self._fail(job, f"{type(error).__name__}: {error}")

    def _fail(self, job: Job, message: str) -> None:
        job.on_done(Result("", "error", len(job.prompt), len(job.ids), None, None, error=message))
