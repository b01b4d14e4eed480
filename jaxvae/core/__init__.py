"""The maths, pure functions of (params, x): model, losses, anomaly maps, projection,
augmentation."""
