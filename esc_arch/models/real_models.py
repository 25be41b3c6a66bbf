"""BasicSR's real-world models (Real-ESRNet / Real-ESRGAN: degradations synthesised on the fly)
with :class:`ESCSRModel`'s training under them.

Registered as ``ESCRealESRNetModel`` / ``ESCRealESRGANModel`` and under the names the authors'
ESC-Real option files use (HAT's ``RealHATMSEModel`` / ``RealHATGANModel``), so those files run
unchanged. BasicSR's own two build Adam only (the authors' recipe is AdamW) and save non-atomically.
From ESCSRModel they take any ``torch.optim`` optimizer, atomic checkpoints with retries, CPU DDP,
window padding at validation and, in the MSE stage, whose training step is ESCSRModel's, EMA,
warm-up, AMP, grad clipping and the NaN stop. The GAN stage keeps Real-ESRGAN's own set-up and step
(EMA and warm-up, but no AMP or grad clipping: those keys are warned about).
"""
from __future__ import annotations

from basicsr.models.realesrgan_model import RealESRGANModel
from basicsr.models.realesrnet_model import RealESRNetModel
from basicsr.utils.registry import MODEL_REGISTRY

from .esr_model import ESCSRModel


@MODEL_REGISTRY.register()
class ESCRealESRNetModel(RealESRNetModel, ESCSRModel):
    """Real-ESRNet's degraded pairs (its ``feed_data`` and queue) trained by ESCSRModel."""


@MODEL_REGISTRY.register()
class ESCRealESRGANModel(RealESRGANModel, ESCSRModel):
    """Real-ESRGAN's GAN step (its set-up and ``optimize_parameters``: no AMP or grad clipping)
    with ESCSRModel's optimizers, checkpoints, devices and validation."""

    save = ESCSRModel.save  # SRGANModel's wrote the state even after a network failed to save

    def init_training_settings(self):
        super().init_training_settings()  # SRGANModel's: net_d, its optimizers and losses
        self._remove_stale_temp_files()


for _alias, _model in (('RealHATMSEModel', ESCRealESRNetModel), ('RealHATGANModel', ESCRealESRGANModel)):
    if _alias not in MODEL_REGISTRY:  # the authors' names (from HAT), so their option files run unchanged
        MODEL_REGISTRY._do_register(_alias, _model)
