"""The models. This package imports nothing of the pipeline outside itself (relative
imports, torch only): `pipeline export` ships its files as the captioner's
Hugging Face remote code."""
