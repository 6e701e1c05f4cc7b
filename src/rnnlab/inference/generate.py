"""Streaming generation: prefill once, then one O(1) step per token for recurrent models."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Iterator

import torch

from ..models.lm import LM, ModelState

__all__ = ["generate", "sample_next", "Stream", "PrefixCache"]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from logits (B, V): greedy when ``temperature == 0``, else sampling from
    the temperature-scaled distribution restricted to the ``top_k`` tokens and/or the smallest set
    whose probability reaches ``top_p``. Returns (B,) int64."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the first token reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Stream:
    """A stateful token stream over a model: feed tokens, sample continuations, save and resume.

    The stream's ``state`` always covers every token fed or sampled so far, so it can be saved at
    any point (:meth:`save`) and resumed later (:meth:`load`) in constant memory for recurrent
    models.

    >>> s = Stream(model)                       # doctest: +SKIP
    >>> s.feed(tok("def main():"))              # prefill once
    >>> text = tok.decode(torch.stack(list(s.sample(50)), 1)[0])
    >>> s.save("conversation.safetensors")   # later: Stream.load(model, path).sample(50)

    ``cache`` streams the attention layers under a KV-cache policy chosen now, not at training
    (``"full"``, ``"window=W"``, ``"sinks=S,window=W"``; see :mod:`rnnlab.inference.cache`);
    ``stream.model`` is then that view of the model.
    """

    def __init__(self, model: LM, state: ModelState | None = None, cache=None):
        if cache is not None:  # a KV-cache policy for the attention layers: "sinks=4,window=1024", ...
            from .cache import with_cache
            model = with_cache(model, cache)
        self.model, self.state = model, state
        self.logits: torch.Tensor | None = None  # (B, V) logits after the last token, None before any
        self.hit: bool | None = None  # from PrefixCache.stream: whether the prefix came from the cache

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor | list[torch.Tensor], chunk_size: int = 2048) -> torch.Tensor:
        """Feed tokens (B, T) (or (T,)), in pieces of ``chunk_size``; returns the last logits (B, V).

        A list of N prompts of different lengths (each (T_i,)) is prefilled together as one packed
        row (``cu_seqlens``, one call): the stream then holds N rows, each as if its prompt had been
        fed alone, and :meth:`sample` decodes them as one batch. An existing state must have N rows.
        """
        if isinstance(tokens, (list, tuple)):
            return self._feed_ragged(list(tokens))
        if tokens.dim() == 1:
            tokens = tokens[None]
        for t0 in range(0, tokens.shape[1], chunk_size):
            out, self.state = self.model(tokens[:, t0:t0 + chunk_size], self.state)
            self.logits = out[:, -1]
        return self.logits

    def _feed_ragged(self, prompts: list[torch.Tensor]) -> torch.Tensor:
        if not prompts or any(not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() == 0 for p in prompts):
            raise ValueError("tokens: a list of prompts must hold 1-D tensors of at least one token each")
        lengths = torch.tensor([len(p) for p in prompts])
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])  # (N + 1,)
        packed = torch.cat(prompts).to(next(self.model.parameters()).device)[None]  # (1, sum T_i)
        out, self.state = self.model(packed, self.state, cu_seqlens=cu.to(packed.device))  # (1, sum T_i, V)
        self.logits = out[0, cu[1:].to(out.device) - 1]  # (N, V): after each prompt's last token
        return self.logits

    @torch.no_grad()
    def sample(self, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, eos_id: int | None = None,
               generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield up to ``max_new_tokens`` tokens (B,), each fed back into the stream (one O(1) step
        for a recurrent model). Stops early once every sequence has produced ``eos_id``."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if self.logits is None:
            raise RuntimeError("feed the stream at least one token before sampling")
        done = None
        for _ in range(max_new_tokens):
            nxt = sample_next(self.logits, temperature, top_k, top_p, generator)  # (B,)
            self.feed(nxt[:, None])
            yield nxt
            if eos_id is not None:
                done = (nxt == eos_id) if done is None else done | (nxt == eos_id)
                if bool(done.all()):
                    return

    def fork(self) -> "Stream":
        """An independent copy of the stream: its state and last logits are copied, so feeding or
        sampling one never changes the other (a shared prefix computed once, many continuations)."""
        state = None if self.state is None else ModelState(
            tuple(None if s is None else dataclasses.replace(s, **{k: t.clone() for k, t in s.tensors().items()})
                  for s in self.state.layers), self.state.seen.clone())
        copy = Stream(self.model, state)
        copy.logits = None if self.logits is None else self.logits.clone()
        return copy

    def save(self, path: str, dtype: torch.dtype | None = None) -> None:
        """Save the stream (its state and last logits, see :func:`rnnlab.save_state`) atomically;
        ``dtype`` (e.g. torch.bfloat16) stores the state's floating tensors cast to it."""
        from .state_io import save_state
        if self.state is None:
            raise RuntimeError("nothing to save: the stream has seen no token")
        save_state(self.state, path, model=self.model, extra={"logits": self.logits}, dtype=dtype)

    @classmethod
    def load(cls, model: LM, path: str, dtype: torch.dtype | None = None) -> "Stream":
        """A stream resumed from :meth:`save`: sampling continues exactly where it stopped.
        ``dtype`` casts the state's floating tensors (None: as saved)."""
        from .state_io import load_extra, load_state
        device = next(model.parameters()).device
        stream = cls(model, load_state(path, model=model, device=device, dtype=dtype))
        logits = load_extra(path, "logits")
        stream.logits = None if logits is None else logits.to(device)
        return stream


class PrefixCache:
    """States after shared prefixes (a system prompt, a document), kept in a directory: the prefix
    is read once by the model, and every later stream that starts with it resumes from its state.

    Entries are keyed by the SHA-256 of the model's weights fingerprint and the prefix's token ids,
    so another model (or other weights) never hits a stale entry; each is a stream file written
    atomically, so concurrent users see whole entries or none.

    >>> cache = PrefixCache("prefixes/", model)          # doctest: +SKIP
    >>> s = cache.stream(tok(system_prompt))             # computed once, then loaded
    >>> s.feed(tok(question)); answer = list(s.sample(100))
    """

    def __init__(self, directory: str | os.PathLike, model: LM):
        self.directory, self.model = Path(directory), model
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"prefix cache {str(directory)!r} is a file; expected a directory")

    def path(self, tokens: torch.Tensor) -> Path:
        """The file of the entry for ``tokens`` (T,) or (1, T)."""
        from .state_io import weights_fingerprint
        ids = tokens.reshape(-1).to("cpu", torch.int64).numpy().tobytes()
        key = hashlib.sha256(weights_fingerprint(self.model).encode() + ids).hexdigest()[:32]
        return self.directory / f"{key}.safetensors"

    def stream(self, tokens: torch.Tensor) -> Stream:
        """A new stream positioned after ``tokens`` (T,) or (1, T): loaded from the cache when the
        entry exists (``hit`` is True), else computed and stored."""
        file = self.path(tokens)
        if file.is_file():
            stream = Stream.load(self.model, str(file))
            stream.hit = True
            return stream
        stream = Stream(self.model)
        stream.feed(tokens.to(next(self.model.parameters()).device))
        self.directory.mkdir(parents=True, exist_ok=True)
        stream.save(str(file))
        stream.hit = False
        return stream


def generate(model: LM, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, state: ModelState | None = None,
             eos_id: int | None = None, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield ``max_new_tokens`` sampled tokens, each (B,), after prefilling ``prompt`` (B, T) once.

    ``state`` continues an earlier stream. For access to the state afterwards, use :class:`Stream`.
    """
    stream = Stream(model, state)
    stream.feed(prompt)
    yield from stream.sample(max_new_tokens, temperature, top_k, top_p, eos_id, generator)
