"""Training models registered into BasicSR's MODEL_REGISTRY."""
from .esr_model import ESCSRModel, TrainingDivergedError

__all__ = ['ESCSRModel', 'TrainingDivergedError']
