"""Data: tokenizers, stream-table data sets, conversion and packing."""
