"""Labels, training, export, scoring, calibration, metrics, guardrails and the registry."""
