"""qwen_batched: Qwen2.5-VL inference on whole batches, on device, faithful to the reference."""
from .config import ModelConfig, TextConfig, VisionConfig
from .api import QwenBatchedVL

try:
    from .processor import BatchedImageProcessor
except ImportError:  # pragma: no cover - during partial installs
    pass

__all__ = ["QwenBatchedVL", "ModelConfig", "TextConfig", "VisionConfig", "BatchedImageProcessor"]
__version__ = "0.1.0"
