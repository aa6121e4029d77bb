"""megatron-effmlm: efficient masked-LM pre-training (3ML, token dropping, ScTD) on megatron-core.

install_requires holds no CPU pins: GPU clusters bring their own CUDA torch and a newer
megatron-core. The CPU machines use requirements-cpu.txt (see README)."""
from setuptools import find_packages, setup

setup(
    name="megatron-effmlm",
    version="0.1.0",
    description="Efficient masked-LM pre-training (3ML, token dropping, ScTD) on megatron-core",
    packages=find_packages(include=["megatron_effmlm", "megatron_effmlm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "megatron-core>=0.16.1",
        "numpy",
        "psutil",  # dist_checkpointing's async writer hangs without it
        "sentencepiece",
        "nltk",
        "tokenizers",
        "transformers",
        "safetensors",
        "tensorboard",
        "matplotlib",
        "tqdm",
        "mwxml",
        "mwparserfromhell",
    ],
    extras_require={
        # GPU-only; Apex is built from NVIDIA's source on GPU machines (PyPI's "apex" is unrelated).
        "gpu": ["transformer-engine[pytorch]"],
        # FP8 without Transformer Engine (model/fp8_torchao.py)
        "fp8": ["torchao>=0.18"],
        "test": ["pytest"],
    },
)
