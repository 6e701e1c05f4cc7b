"""The server's settings: one typed dataclass, also the source of ``rnnlab serve``'s flags."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ServeConfig"]


@dataclass
class ServeConfig:
    """Settings and limits of :func:`rnnlab.serve.app.create_app`; each limit refuses a request
    that exceeds it with a 4xx JSON error naming it."""

    sessions_dir: str = "sessions"  # directory of the session state files (created if missing; one server per directory)
    api_key: str | None = field(default=None, repr=False)  # if set, all but /health need 'Authorization: Bearer KEY'
    model_name: str | None = None  # the model id reported by /v1/models; None = the model directory's name
    max_prompt_tokens: int = 8192  # most tokens a request's prompt (or messages, or session prefix) may have
    max_body_bytes: int = 1 << 20  # largest request body in bytes; a larger one is refused (413) before it is read whole
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    default_max_tokens: int = 16  # max_tokens of a request that gives none
    max_concurrent: int = 32  # requests in flight at once; more are refused with 429
    max_batch: int = 8  # rows decoded together in one batch (requests join and leave it between steps)
    max_sessions: int = 10000  # sessions kept on disk; creating more is refused with 429
    session_cache: int = 64  # sessions whose states stay in memory (least recently used are dropped)
    bos: bool | None = None  # open fresh text (a prompt or session with no state yet) with the tokenizer's BOS token; None = as the run was trained (rnnlab train --bos)
    compile_step: bool = False  # decode through torch.compile (LM.compile_step): faster steps after a first one that compiles

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_body_bytes", "max_tokens", "max_concurrent", "max_batch",
                     "max_sessions", "session_cache"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        d = self.default_max_tokens
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= self.max_tokens:
            raise ValueError(f"default_max_tokens must be an int in [0, max_tokens={self.max_tokens}], got {d!r}")
        if not isinstance(self.sessions_dir, str) or not self.sessions_dir:
            raise ValueError(f"sessions_dir must be a directory path, got {self.sessions_dir!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string or None")
