"""Generation, streaming, state save/load."""
from .cache import CachePolicy, parse_cache, with_cache
from .generate import PrefixCache, Stream, generate, sample_next
from .prompting import jrt_prompt
from .state_io import load_state, save_state

__all__ = ["Stream", "PrefixCache", "jrt_prompt", "CachePolicy", "parse_cache", "with_cache", "generate", "sample_next", "load_state", "save_state"]
