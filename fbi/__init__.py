"""fbi: pretraining fully-binarized language models."""
