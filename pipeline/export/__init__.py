"""`pipeline export`: a training stage's checkpoint as a Hugging Face model folder.

The weights come from the DeepSpeed checkpoint itself (any ZeRO stage, every rank's
shard consolidated), so a mid-run checkpoint of a stopped stage exports as well as a
finished one. The GPT and the ViT become stock `transformers` models (GPT-2 and ViT
classes hold exactly our architectures: `stock.py`); the captioner, whose encoder
reads each cell separately, ships its own code and loads with
`trust_remote_code=True` (`remote.py`). Each model kind's `export_hf` picks its
writer; `command.py` is the command around them.
"""


class ExportError(ValueError):
    """An export that cannot be done as asked."""
