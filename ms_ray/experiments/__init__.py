"""Experiments built from the other layers (train + evaluate + report): the top floor."""
