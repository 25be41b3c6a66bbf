"""Training models registered into BasicSR's MODEL_REGISTRY."""
from .esr_model import ESCSRModel, TrainingDivergedError, TrainingStoppedError
from .real_models import ESCRealESRGANModel, ESCRealESRNetModel

__all__ = ['ESCRealESRGANModel', 'ESCRealESRNetModel', 'ESCSRModel', 'TrainingDivergedError', 'TrainingStoppedError']
