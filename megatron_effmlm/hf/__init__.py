"""Hugging Face transformers: export (export.py), import (import_hf.py), weight layouts
(convert.py) and GLUE-format fine-tuning (finetune.py)."""
