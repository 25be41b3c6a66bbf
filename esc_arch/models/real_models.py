"""BasicSR's real-world models (Real-ESRNet / Real-ESRGAN: degradations synthesised on the fly)
with :class:`ESCSRModel`'s training under them.

Registered as ``ESCRealESRNetModel`` / ``ESCRealESRGANModel`` and under the names the authors'
ESC-Real option files use (HAT's ``RealHATMSEModel`` / ``RealHATGANModel``), so those files run
unchanged. BasicSR's own two build Adam only (the authors' recipe is AdamW) and save non-atomically.
From ESCSRModel they take any ``torch.optim`` optimizer, atomic checkpoints with retries, CPU DDP,
window padding at validation and the NaN stop; in the MSE stage, whose training step is
ESCSRModel's, EMA, warm-up, AMP and grad clipping too. The GAN stage keeps Real-ESRGAN's own set-up
and step (EMA and warm-up, but no AMP or grad clipping: those keys are warned about); a nan/inf
loss stops it after that step, before anything is saved.
"""
from __future__ import annotations

import torch
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
        self._finish_training_settings()  # its EMA network was left trainable (ldl_opt's forward kept a graph)

    def optimize_parameters(self, current_iter):
        super().optimize_parameters(current_iter)
        # Real-ESRGAN's step has no check: a nan/inf loss stops here, before the networks it has
        # just stepped are saved (ESCSRModel's stops before its step)
        # on the model's device: under nccl the all_reduce in the check takes CUDA tensors only
        losses = torch.tensor([float(value) for value in self.log_dict.values()] or [0.0], device=self.device)
        self._stop_if_not_finite(losses.sum(), current_iter)


for _alias, _model in (('RealHATMSEModel', ESCRealESRNetModel), ('RealHATGANModel', ESCRealESRGANModel)):
    if _alias not in MODEL_REGISTRY:  # the authors' names (from HAT), so their option files run unchanged
        MODEL_REGISTRY._do_register(_alias, _model)
