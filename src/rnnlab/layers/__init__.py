"""nn.Modules: one file per architecture family, each calling ops."""
from .base import Mixer, MixerConfig
from .state import State, StateError

__all__ = ["Mixer", "MixerConfig", "State", "StateError"]
