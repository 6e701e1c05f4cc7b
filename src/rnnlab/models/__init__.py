"""Model configs, blocks, layouts, the language model, save/load, the mixer registry."""
from .layout import BlockSpec, parse_layout
from .lm import LM, LMConfig, ModelState, build_model, load_model
from .registry import REGISTRY, MixerSpec, build_mixer, get_spec, mixers

__all__ = ["BlockSpec", "parse_layout", "LM", "LMConfig", "ModelState", "build_model", "load_model",
           "REGISTRY", "MixerSpec", "build_mixer", "get_spec", "mixers"]
