"""thousandwords: raw data to trained, fine-tuned and evaluated transformers."""
