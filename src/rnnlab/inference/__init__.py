"""Generation, streaming, state save/load."""
from .generate import PrefixCache, Stream, generate, sample_next
from .prompting import jrt_prompt
from .state_io import load_state, save_state

__all__ = ["Stream", "PrefixCache", "jrt_prompt", "generate", "sample_next", "load_state", "save_state"]
