"""linegate training: datasets, splits, backbones, detectors, calibration, evaluation."""
