"""Training models registered into BasicSR's MODEL_REGISTRY."""
