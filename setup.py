from setuptools import find_packages, setup

setup(
    name="qwen_batched",
    version="0.1.0",
    description="Batched, on-device Qwen2.5-VL inference: processor, varlen vision tower, decoder and generation",
    packages=find_packages(include=["qwen_batched", "qwen_batched.*"]) + ["qwen_batched.kernels"],
    package_dir={"qwen_batched.kernels": "kernels"},
    package_data={"qwen_batched.configs": ["*.json", "*.jinja"]},
    python_requires=">=3.10",
    # what the package imports at run time; transformers is the reference in the tests, never a runtime import
    install_requires=["torch>=2.5", "safetensors", "numpy", "pillow", "tokenizers", "jinja2", "huggingface_hub"],
    extras_require={
        "test": ["pytest", "triton", "transformers"],
        "bench": ["matplotlib"],
        "flash": ["flash-attn"],
    },
)
