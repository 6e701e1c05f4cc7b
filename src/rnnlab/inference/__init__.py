"""Generation, streaming, state save/load, inference-time options (KV-cache policies, mitigations of
state collapse)."""
from .cache import CachePolicy, parse_cache, with_cache
from .generate import PrefixCache, Stream, generate, sample_next
from .mitigation import with_mixer_options
from .prompting import jrt_prompt
from .state_io import load_state, save_state

__all__ = ["Stream", "PrefixCache", "jrt_prompt", "CachePolicy", "parse_cache", "with_cache", "generate", "sample_next", "load_state", "save_state",
           "with_mixer_options"]
