"""Data side of megatron-effmlm: corpora, tokenizers, preprocessing and MLM datasets.

Submodules are imported on demand (megatron-core's import is slow); only the error type is here.
"""

from megatron_effmlm.data.errors import DataError

__all__ = ["DataError"]
