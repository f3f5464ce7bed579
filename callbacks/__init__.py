"""Lightning callbacks, installed as `compresslight.callbacks`.

Each is a Callback of every installed Lightning namespace (`lightning.pytorch` and `pytorch_lightning`):

| callback | what |
|---|---|
| `PruningCallback` | structured (or unstructured) filter pruning at scheduled epochs |
| `TuckerVBMFCallback` | Tucker-2 decomposition with VBMF ranks, optionally runtime-aware |
| `LCCallback` | LC low-rank compression against a FLOPs, storage or measured-runtime cost |
| `QuantizationCallback` | simulated and int8 (ONNX Runtime) quantization, QAT |
| `DistillationCallback` | adds a frozen teacher's soft targets to the training loss |
| `ProfileCallback` | profiles the model before and after compression; writes profile.md/.json/.png |
| `StructuralCompressionCallback` | the base of callbacks that edit a model's structure |
"""

from compresslight.callbacks.distillation import DistillationCallback
from compresslight.callbacks.lc import LCCallback
from compresslight.callbacks.profile import ProfileCallback
from compresslight.callbacks.pruning import PruningCallback
from compresslight.callbacks.quantization import QuantizationCallback
from compresslight.callbacks.structural_edit import StructuralCompressionCallback
from compresslight.callbacks.tucker import TuckerVBMFCallback

__all__ = [
    "DistillationCallback",
    "LCCallback",
    "ProfileCallback",
    "PruningCallback",
    "QuantizationCallback",
    "StructuralCompressionCallback",
    "TuckerVBMFCallback",
]
