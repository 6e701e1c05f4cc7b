"""Pure tensor functions: the math of each recurrence family (reference loops and fast forms).

:mod:`rnnlab.ops.registry` lists the families with their forms, backends and test inputs and
chooses the form every dispatcher runs; :mod:`rnnlab.ops.tuning` holds the thresholds and chunk
sizes behind those choices, per device type.
"""
from . import registry, tuning
from .attention import merge_attention, softmax_attention
from .delta import (gated_delta_rule, gated_delta_rule_chunked, gated_delta_rule_normalised,
                    gated_delta_rule_recurrent, gated_delta_rule_step)
from .rwkv6 import rwkv6, rwkv6_chunked, rwkv6_recurrent
from .dplr import dplr, dplr_chunked, dplr_recurrent
from .scan import (linear_scan, linear_scan_chunked, linear_scan_loop, linear_scan_recurrent, linear_scan_step,
                   over_time_chunks)
from .longhorn import longhorn, longhorn_chunked, longhorn_recurrent
from .gsa import gsa, gsa_chunked, gsa_recurrent
from .memory import MemoryState, neural_memory, neural_memory_chunked, neural_memory_recurrent
from .ttt import TTTState, ttt, ttt_chunked, ttt_recurrent
from .newton import (NewtonInfo, matrix_scan, matrix_scan_chunked, matrix_scan_loop, matrix_scan_recurrent,
                     newton_solve, rnn_newton, rnn_sequential)
from .selective_scan import selective_scan, selective_scan_chunked, selective_scan_recurrent, selective_scan_step
from .mlstm import mlstm, mlstm_chunked, mlstm_parallel, mlstm_recurrent, mlstm_step
from .lti import bilinear, hippo_legs, lti, lti_conv, lti_recurrent, lti_scan
from .prefix import prefix_linear_attention, prefix_linear_attention_parallel, prefix_linear_attention_recurrent
