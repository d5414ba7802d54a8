"""Layer 3: the two-stage training loop, its data, calibration, refit and distributed helpers."""
