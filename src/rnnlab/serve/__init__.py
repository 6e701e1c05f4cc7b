"""The HTTP server: OpenAI-compatible completions whose conversations are O(1) states on disk.

``create_app(model_dir_or_model, ServeConfig(...))`` (in :mod:`rnnlab.serve.app`, which needs the
``serve`` extra: ``pip install 'rnnlab[serve]'``) builds the FastAPI application; ``rnnlab serve``
runs it with uvicorn. :mod:`.sessions` keeps conversations as state files, :mod:`.engine` decodes
the requests together in one batch.
"""
from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # imported on use: the rest of rnnlab works without fastapi
        from .app import create_app
        return create_app
    raise AttributeError(f"module 'rnnlab.serve' has no attribute {name!r}")
