"""Pure tensor functions: the math of each recurrence family (reference loops and fast forms)."""
from .attention import merge_attention, softmax_attention
