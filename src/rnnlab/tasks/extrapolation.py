"""Passkey retrieval: a key of a few digits hidden in filler at a random depth, asked at the end.

An example of length T with a key of K digits::

    f f f ... f KEY d1 d2 ... dK f f ... f ASK d1 ... d(K-1)
                \\_ at a random depth _/         targets: d1 ... dK

* filler tokens f are drawn uniformly from their own range of the vocabulary;
* the block ``KEY d1 ... dK`` starts at a position drawn uniformly from every start that keeps
  it before the question (depth 0 = right at the beginning, 1 = just before the question);
* the last K positions read ``ASK d1 ... d(K-1)`` and their targets are ``d1 ... dK``: the model
  writes the key one digit at a time, each digit given once written (teacher forcing).

Train at one length, then test the same model at 1x, 2x, ... 16x that length: recurrent models
whose state is tuned to the training length may lose the key past it (Chen et al. 2024,
"Stuffed Mamba").

:func:`after_filler` separates forgetting from collapse: it puts filler before examples of the
training length, so the key stays as close to the question as in training and only the amount read
before it grows; a model that forgets what is far but whose state has not collapsed still answers.

Why they lose it shows in the state: :func:`state_norms` feeds examples in pieces and records the
norm of each recurrent layer's state at every piece boundary (exact by the chunking law), so a
state that grows past anything seen in training ("state collapse") shows as a curve leaving its
training-length range.

Token ids: digits [0, n_digits), KEY = n_digits, ASK = n_digits + 1, filler after those.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import IGNORE, check_int, make_generator

__all__ = ["PasskeyConfig", "passkey", "after_filler", "state_norm", "state_norms"]


@dataclass(frozen=True)
class PasskeyConfig:
    """One passkey setting."""

    seq_len: int = 128  # T: tokens per example, filler, key block and question included
    key_len: int = 4  # K: digits in the passkey
    n_digits: int = 10  # distinct digit tokens
    n_filler: int = 16  # distinct filler tokens

    def __post_init__(self) -> None:
        check_int("key_len", self.key_len, 1)
        check_int("seq_len", self.seq_len, 2 * self.key_len + 1)
        check_int("n_digits", self.n_digits, 2)
        check_int("n_filler", self.n_filler, 1)

    @property
    def key_token(self) -> int:
        """The token announcing the passkey."""
        return self.n_digits

    @property
    def ask_token(self) -> int:
        """The token asking for the passkey."""
        return self.n_digits + 1

    @property
    def vocab_size(self) -> int:
        """Tokens used: digits, KEY, ASK and filler."""
        return self.n_digits + 2 + self.n_filler


def passkey(config: PasskeyConfig, n: int, generator: torch.Generator | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` passkey examples: ``(inputs, targets)``, both (n, T) int64, targets -100 except at
    the last K positions, which hold the key's digits."""
    c = config
    check_int("n", n, 1)
    g = make_generator(generator)
    T, K = c.seq_len, c.key_len
    rows = torch.arange(n).unsqueeze(1)  # (n, 1)

    # 1. Filler everywhere and a key per row.
    inputs = torch.randint(c.n_digits + 2, c.vocab_size, (n, T), generator=g)
    key = torch.randint(0, c.n_digits, (n, K), generator=g)  # (n, K)

    # 2. KEY d1 ... dK at a random start in [0, T - 2K - 1]: it ends before the question.
    start = torch.randint(0, T - 2 * K, (n, 1), generator=g)  # (n, 1)
    inputs[rows, start] = c.key_token
    inputs[rows, start + 1 + torch.arange(K)] = key

    # 3. The question ASK d1 ... d(K-1) in the last K positions, scored with d1 ... dK.
    inputs[:, T - K] = c.ask_token
    inputs[:, T - K + 1:] = key[:, :-1]
    targets = torch.full((n, T), IGNORE, dtype=torch.int64)
    targets[:, T - K:] = key
    return inputs, targets


def after_filler(config: PasskeyConfig, inputs: torch.Tensor, targets: torch.Tensor, seq_len: int,
                 generator: torch.Generator | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Passkey examples ``(inputs, targets)`` (n, T) of ``config`` preceded by filler tokens up to
    ``seq_len`` >= T: (n, seq_len) int64 each, the prepended positions unscored."""
    check_int("seq_len", seq_len, inputs.shape[1])
    g = make_generator(generator)
    n, pad = inputs.shape[0], seq_len - inputs.shape[1]
    filler = torch.randint(config.n_digits + 2, config.vocab_size, (n, pad), generator=g)
    return (torch.cat([filler, inputs], dim=1),
            torch.cat([torch.full((n, pad), IGNORE, dtype=torch.int64), targets], dim=1))


def state_norm(state) -> torch.Tensor:
    """The Frobenius norm of one layer's memory per row: (B,) float32, over every floating tensor
    field of the layer state (:class:`rnnlab.layers.state.State`) but the short convolutions' buffers
    (fields named ``conv*``), which hold the last few inputs rather than memory."""
    parts = [t.detach().flatten(1).abs().float().pow(2).sum(1) for name, t in state.tensors().items()
             if not name.startswith("conv") and (t.is_floating_point() or t.is_complex())]
    if not parts:
        raise ValueError(f"state_norm: {type(state).__name__} has no floating tensor besides its convolution buffers")
    return torch.stack(parts).sum(0).sqrt()


@torch.no_grad()
def state_norms(model, inputs: torch.Tensor, every: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The norm of each recurrent layer's state against position: ``inputs`` (N, T) int64 are fed
    ``every`` tokens at a time, passing the state on, and after each piece :func:`state_norm` of
    every block whose mixer is recurrent (attention's growing cache and MLP blocks are left out)
    is recorded. By the chunking law these are the states a single call on ``inputs[:, :t]`` ends
    with. Returns ``(positions (P,) int64, {block index: (P, N) float32})``, positions = the tokens
    read so far: every, 2·every, ..., T (the last piece may be shorter)."""
    if not isinstance(inputs, torch.Tensor) or inputs.dtype != torch.int64 or inputs.dim() != 2 or not inputs.numel():
        raise ValueError(f"inputs must be a non-empty (N, T) int64 tensor, got "
                         f"{getattr(inputs, 'dtype', type(inputs).__name__)} of shape {tuple(getattr(inputs, 'shape', ()))}")
    check_int("every", every, 1)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    recurrent = [i for i, block in enumerate(model.blocks) if block.mixer is not None and block.mixer.recurrent]
    positions, norms, state = [], {i: [] for i in recurrent}, None
    for piece in inputs.split(every, dim=1):
        _, state = model(piece.to(device), state)
        positions.append((positions[-1] if positions else 0) + piece.shape[1])
        for i in recurrent:
            norms[i].append(state_norm(state.layers[i]).cpu())
    model.train(was_training)
    return torch.tensor(positions), {i: torch.stack(v) for i, v in norms.items()}
