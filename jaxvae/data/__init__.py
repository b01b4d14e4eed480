"""Data: NIfTI I/O with the way back, pre-processing, datasets by name, sequences as channels,
SliceSet, splits by case, phantoms."""
