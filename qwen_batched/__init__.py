"""qwen_batched: Qwen2.5-VL inference on whole batches, on device, faithful to the reference."""
from .config import ModelConfig, TextConfig, VisionConfig
from .api import QwenBatchedVL

from .outputs import FeatureOutput, GenerateOutput
from .processor import BatchedImageProcessor, load_processor, smart_resize
from .inputs import ModelInputs

__all__ = ["QwenBatchedVL", "ModelConfig", "TextConfig", "VisionConfig", "BatchedImageProcessor", "ModelInputs",
           "FeatureOutput", "GenerateOutput", "load_processor", "smart_resize"]
__version__ = "0.1.0"
