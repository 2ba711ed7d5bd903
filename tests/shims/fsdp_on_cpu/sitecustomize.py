"""Test-only bridge: FSDP2 on CPU processes (gloo), so the fsdp backend can be tested without GPUs.

Put on PYTHONPATH of a test's worker processes only; no production code imports it. It bridges one
thing: accelerate's AcceleratorState enables FSDP only for accelerator device types (MULTI_GPU,
MULTI_XPU, ...) and silently ignores an fsdp_plugin on MULTI_CPU, though torch's FSDP2
(``fully_shard``) itself runs on CPU tensors over gloo. After accelerate has set up the state as
usual, the shim switches a MULTI_CPU state that was given an fsdp_plugin to FSDP, exactly as
accelerate does on GPUs. Everything after that (prepare, fully_shard, clip_grad_norm_, the
state dicts) is accelerate's and torch's own code.
"""

import accelerate.state as _state
from accelerate.utils import DistributedType

_original_init = _state.AcceleratorState.__init__


def _init(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        _state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


_state.AcceleratorState.__init__ = _init
