"""Export: the packed 1-bit format (``packed``) and Hugging Face checkpoints (``hf``)."""
