"""Data: the embedded demo set and training-set preparation."""
