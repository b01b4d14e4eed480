"""From a trained model to maps and metrics: settings, maps of a dataset, calibration,
ensembles, the segmenter, evaluation, one scan on its own grid."""
