"""Sessions: conversations kept as the model's state, one state file per session.

A session is the :class:`~rnnlab.models.lm.ModelState` after every token of its conversation so
far (one batch row) plus the logits after the last token. Its size does not depend on the
conversation's length for a recurrent model, so a turn reads only its new tokens. Each file is
written atomically (:func:`rnnlab.save_state`, with the weights' fingerprint) after every turn, so
a session survives a restart of the server; the most recently used states also stay in memory.

Ids come from :func:`secrets.token_urlsafe` (unguessable; they are the only access control between
clients that share an API key) and are checked against a strict pattern before they name a file.
"""
from __future__ import annotations

import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..inference.state_io import load_extra, load_state, save_state
from ..layers.state import StateError
from ..models.lm import LM, ModelState, is_temp

__all__ = ["Session", "SessionStore", "SessionError"]

_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class SessionError(Exception):
    """A session request that cannot be served: ``status`` is the HTTP status to answer with,
    ``kind`` the error type and ``param`` the request field that named the session."""

    def __init__(self, message: str, status: int, kind: str, param: str):
        super().__init__(f"{param}: {message}")
        self.status, self.kind, self.param = status, kind, param


@dataclass(frozen=True)
class Session:
    """One conversation: ``state`` (one row) covers its ``state.seen`` tokens; ``logits`` (1, V)
    are those after the last token (None while it has seen none)."""

    id: str
    state: ModelState
    logits: torch.Tensor | None

    def info(self) -> dict:
        """The JSON description given by the API."""
        return {"id": self.id, "object": "session", "tokens_seen": int(self.state.seen[0]),
                "state_bytes": self.state.nbytes}


class SessionStore:
    """Sessions of ``model`` in ``directory``: at most ``max_sessions`` files, ``cache_size`` of
    them held in memory (least recently used dropped first). Thread-safe; a session is used by one
    request at a time (:meth:`acquire` / :meth:`release`)."""

    def __init__(self, directory: str | Path, model: LM, max_sessions: int, cache_size: int):
        self.directory, self.model = Path(directory), model
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"sessions_dir {str(directory)!r} is a file; expected a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.iterdir():  # unfinished writes of a server that was killed
            if is_temp(stale) and stale.is_file():
                stale.unlink(missing_ok=True)
        sample = next((p for p in self.directory.glob("*.safetensors") if _ID.match(p.stem)), None)
        if sample is not None:  # a restart with another model: refused before serving, not per request
            try:
                load_state(sample, model)
            except StateError as e:
                raise ValueError(f"sessions_dir {str(directory)!r} holds sessions this model cannot continue "
                                 f"({e}); give this model its own sessions_dir") from None
        self.max_sessions, self.cache_size = max_sessions, cache_size
        self._cache: OrderedDict[str, Session] = OrderedDict()
        self._busy: set[str] = set()
        self._creating: set[str] = set()  # ids handed out by new_id whose first state is not yet stored
        self._lock = threading.Lock()

    def _path(self, session_id: str) -> Path:
        return self.directory / f"{session_id}.safetensors"

    def _check_id(self, session_id: str, param: str = "session") -> None:
        if not isinstance(session_id, str) or not _ID.match(session_id) or not self._path(session_id).is_file():
            raise SessionError(f"no session {session_id!r} (create one with POST /v1/sessions)", 404,
                               "not_found_error", param)

    def count(self) -> int:
        """Sessions on disk (not the ``.tmp*`` file of a write that a killed server left behind)."""
        return sum(1 for p in self.directory.glob("*.safetensors") if _ID.match(p.stem))

    def new_id(self) -> str:
        """A fresh unguessable id, reserved until :meth:`put` stores it or :meth:`abandon` gives it
        up; refused when ``max_sessions`` sessions exist or are being created."""
        with self._lock:
            if self.count() + len(self._creating) >= self.max_sessions:
                raise SessionError(f"the server holds max_sessions={self.max_sessions} sessions; delete some "
                                   "(DELETE /v1/sessions/ID) before creating more", 429, "rate_limit_error",
                                   "max_sessions")
            session_id = secrets.token_urlsafe(24)
            self._creating.add(session_id)
            return session_id

    def abandon(self, session_id: str) -> None:
        """Give up the id reserved by :meth:`new_id` (its session could not be created)."""
        with self._lock:
            self._creating.discard(session_id)

    def empty(self) -> tuple[ModelState, None]:
        """The state and logits of a conversation that has seen no token."""
        return self.model.init_state(1, device=next(self.model.parameters()).device), None

    def get(self, session_id: str, param: str = "session") -> Session:
        """The session ``session_id`` (from memory, else from its file); 404 when there is none."""
        with self._lock:
            if session_id in self._cache:
                self._cache.move_to_end(session_id)
                return self._cache[session_id]
        self._check_id(session_id, param)
        path = self._path(session_id)
        device = next(self.model.parameters()).device
        try:
            state = load_state(path, self.model, device=device)
        except StateError:
            raise SessionError(f"session {session_id!r} was stored by another model or its file is damaged; "
                               "delete it (DELETE /v1/sessions/ID)", 409, "conflict_error", param) from None
        session = Session(session_id, state, None if (lg := load_extra(path, "logits")) is None else lg.to(device))
        self._remember(session)
        return session

    def put(self, session_id: str, state: ModelState, logits: torch.Tensor | None) -> Session:
        """Store the session's new state: its file is replaced atomically, then the memory copy."""
        session = Session(session_id, state, logits)
        extra = {} if logits is None else {"logits": logits}
        save_state(state, self._path(session_id), model=self.model, extra=extra)
        self._remember(session)
        self.abandon(session_id)  # a reserved id is now a stored session
        return session

    def delete(self, session_id: str) -> None:
        """Remove the session (file and memory); 404 when there is none, 409 while it is in use."""
        self._check_id(session_id, "session_id")
        with self._lock:
            if session_id in self._busy:
                raise SessionError(f"session {session_id!r} is answering a request; delete it after",
                                   409, "conflict_error", "session_id")
            self._cache.pop(session_id, None)
            self._path(session_id).unlink(missing_ok=True)

    def acquire(self, session_id: str) -> None:
        """Mark the session as in use by one request; 404 when there is none, 409 when another
        request is using it."""
        self._check_id(session_id)
        with self._lock:
            if session_id in self._busy:
                raise SessionError(f"session {session_id!r} is answering another request; "
                                   "send one turn at a time", 409, "conflict_error", "session")
            self._busy.add(session_id)

    def release(self, session_id: str) -> None:
        """The request using the session has finished."""
        with self._lock:
            self._busy.discard(session_id)

    def _remember(self, session: Session) -> None:
        with self._lock:
            self._cache[session.id] = session
            self._cache.move_to_end(session.id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
