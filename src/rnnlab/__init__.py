"""rnnlab: recurrent sequence models in PyTorch.

Linear attention, gated linear RNNs, state-space models, xLSTM, LSTM/GRU and softmax attention,
trained in parallel over the sequence and run as RNNs at inference. Every mixer obeys
``y, state = mixer(x, state)`` and the chunking law (see DESIGN).
"""
from . import ops
from .allocator import reuse_freed_memory
from .data.tokenizer import ByteTokenizer
from .inference import PrefixCache, Stream, generate, load_state, save_state
from .layers.state import State, StateError
from .models import LM, LMConfig, ModelState, build_mixer, build_model, load_model, mixers
from .models.hf import from_hf, to_hf

__version__ = "0.1.0"

__all__ = ["ops", "ByteTokenizer", "Stream", "PrefixCache", "generate", "load_state", "save_state", "State", "StateError",
           "LM", "LMConfig", "ModelState", "build_mixer", "build_model", "load_model", "mixers", "from_hf", "to_hf", "reuse_freed_memory",
           "__version__"]
