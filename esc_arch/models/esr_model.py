"""The training/validation model: BasicSR's ``SRModel`` with what ESC's recipe needs.

Registered as ``ESCSRModel`` and, so the authors' option files run unchanged, ``ESRModel``.
Option keys it reads on top of ``SRModel``'s (all under ``train:``):

* ``ema_decay``: EMA of the weights, saved as ``params_ema`` (BasicSR's key).
* ``warmup_iter``: linear warm-up of every learning rate over that many iterations.
* ``optim_g.type``: any ``torch.optim`` optimizer by name (``Adam``, ``AdamW``, ...).
* ``grad_clip``: clip the gradient norm to this value (off when absent, null or 0).
* ``amp``: ``bf16``, ``fp16`` or ``false`` (default). bf16 autocast on CPU and CUDA; fp16 on
  CUDA with a GradScaler (on CPU fp16 falls back to bf16).

At validation and test time the LR input is reflect-padded to a multiple of the network's
``window_size`` and the output cropped back. A loss that turns NaN/inf stops the run with
:class:`TrainingDivergedError`. Checkpoints and training states are written atomically (temp
file, fsync, rename), so a killed run never leaves a truncated file for ``--auto_resume``.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections import OrderedDict

import torch
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY
from torch.nn.parallel import DistributedDataParallel

from ..archs import ESC, ESCFP
from ..archs.layers import reflect_pad_to_multiple, resample_subpixel_conv
from ..fileio import atomic_path, remove_stale_temp_files
from ..loading import WRAPPER_KEYS, read_checkpoint_file, read_state_dict
from ..runtime import slow_bf16_warning

AMP_DTYPES = {'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp16': torch.float16, 'float16': torch.float16,
              'half': torch.float16}


class TrainingStoppedError(RuntimeError):
    """Training ended without what it was run for; the message says why (``basicsr train`` logs it
    and exits 1)."""


class TrainingDivergedError(TrainingStoppedError):
    """The loss became NaN or infinite; the message names the iteration and the last saved state."""


def optimizer_class(name: str) -> type:
    """The ``torch.optim`` optimizer called ``name`` (``train.optim_g.type``), or ValueError naming them."""
    cls = getattr(torch.optim, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        names = sorted(n for n, obj in vars(torch.optim).items()
                       if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and n != 'Optimizer')
        raise ValueError(f'unknown optimizer {name!r} (train.optim_g.type); torch.optim has: {", ".join(names)}')
    return cls


def pretrained_state_dict(load_path: str, param_key: str | None = 'params', log=None) -> tuple[dict, str | None]:
    """(state dict, the key it was under) of a network file: under ``param_key``; where the file has
    no such key, under ``params`` as BasicSR's ``load_network`` falls back, else under another
    wrapper key (``params_ema``, ``state_dict``, ``model``; with ``param_key`` None, ``params_ema``
    first), said in the log; else the file's flat dict. CheckpointError if it cannot be read."""
    data = read_checkpoint_file(load_path)
    used = None
    if isinstance(data, dict):
        if param_key is not None and isinstance(data.get(param_key), dict):
            used = param_key
        else:
            order = WRAPPER_KEYS if param_key is None else ('params', ) + WRAPPER_KEYS
            used = next((key for key in order if isinstance(data.get(key), dict)), None)
            if used and log:  # BasicSR's line said "params_ema does not exist" whatever was asked
                log(f'Loading: {"no param key is given" if param_key is None else f"{param_key} does not exist"}, '
                    f'use {used}.')
    # a flat state dict, or one under a key; read_state_dict drops DDP's 'module.'
    return read_state_dict(data[used] if used else data), used


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` that never leaves a partial file at ``path`` (a kill mid-save is safe)."""
    with atomic_path(path, failed_writes=(RuntimeError, )) as tmp:  # how torch's writer says a full disk
        torch.save(obj, tmp)


def saved_iterations(directory: str) -> list[int]:
    """Iterations of the ``<iter>.state`` files in ``directory``, ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name[:-6]) for name in os.listdir(directory) if name.endswith('.state') and name[:-6].isdigit())


def latest_training_state(directory: str) -> str | None:
    """Path of the ``<iter>.state`` with the highest iteration in ``directory``, or None."""
    iters = saved_iterations(directory)
    return os.path.join(directory, f'{iters[-1]}.state') if iters else None


def resolve_amp(setting, device: torch.device, log=None):
    """``train.amp`` -> (autocast dtype or None, use a GradScaler)."""
    if setting in (None, False, 0) or str(setting).lower() in ('false', 'none', 'no', 'off', 'fp32', 'float32'):
        return None, False
    key = 'bf16' if setting is True else str(setting).lower()
    if key not in AMP_DTYPES:
        raise ValueError(f'train.amp must be bf16, fp16 or false, got {setting!r}')
    dtype = AMP_DTYPES[key]
    if device.type == 'cpu' and dtype == torch.float16:
        if log:
            log('train.amp: fp16 autocast is a CUDA feature; using bf16 on CPU.')
        dtype = torch.bfloat16
    if device.type == 'cuda' and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        if log:
            log('train.amp: this GPU has no bf16; using fp16 with a GradScaler.')
        dtype = torch.float16
    if dtype == torch.bfloat16 and log and (warning := slow_bf16_warning(device)):
        log(f'train.amp: {warning}')
    return dtype, dtype == torch.float16


@MODEL_REGISTRY.register()
class ESCSRModel(SRModel):
    """SRModel + EMA, warm-up, any torch optimizer, grad clipping, AMP, window padding,
    NaN stop and atomic checkpoints. Option keys: see the module docstring."""

    # ---------------------------------------------------------------- devices and loading
    def model_to_device(self, net):
        """As BasicSR's, but DDP also works on CPU (gloo): no CUDA device ids there."""
        if not self.opt['dist']:
            return super().model_to_device(net)
        net = net.to(self.device)
        device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
        return DistributedDataParallel(net, device_ids=device_ids,
                                       find_unused_parameters=self.opt.get('find_unused_parameters', False))

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """BasicSR's loader plus ``.safetensors`` files, safe ``torch.load`` and, for ESC/ESC-FP
        with ``strict_load_g: false``, cross-scale re-sampling of ``to_img`` (BasicSR would drop
        the mismatched tensor instead). ``basicsr train`` / ``test`` give BasicSR's own models it too."""
        logger = get_root_logger()
        net = self.get_bare_model(net)
        if not os.path.isfile(load_path):
            raise FileNotFoundError(f'pretrained network not found: {load_path}')
        load_net, param_key = pretrained_state_dict(load_path, param_key, log=logger.info)
        logger.info(f'Loading {net.__class__.__name__} model from {load_path}, with param key: [{param_key}].')
        if not strict and isinstance(net, (ESC, ESCFP)):
            resample_subpixel_conv(load_net, '', 3, net.upscaling_factor, log=logger.info)
        self._print_different_keys_loading(net, load_net, strict)
        net.load_state_dict(load_net, strict=strict)

    # ---------------------------------------------------------------- training set-up
    def init_training_settings(self):
        train_opt = self.opt['train']
        self.amp_dtype, use_scaler = resolve_amp(train_opt.get('amp'), self.device, log=get_root_logger().warning)
        self.scaler = torch.amp.GradScaler('cuda') if use_scaler else None
        self.grad_clip = float(train_opt.get('grad_clip') or 0)
        super().init_training_settings()
        if self.amp_dtype is not None:
            get_root_logger().info(f'Mixed precision: {str(self.amp_dtype)[6:]} autocast'
                                   f'{" with a GradScaler" if self.scaler else ""}.')
        self._finish_training_settings()

    def _finish_training_settings(self):
        """After the set-up (this model's, or the GAN stage's, which is SRGANModel's): the EMA network
        frozen (its forwards record no autograd graph), and what a run killed mid-save left
        half-written removed (rank 0: the folders are shared)."""
        if hasattr(self, 'net_g_ema'):
            self.net_g_ema.requires_grad_(False)
        if self.opt['rank'] == 0:
            for key in ('models', 'training_states'):
                remove_stale_temp_files(self.opt['path'].get(key, ''))

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        return optimizer_class(optim_type)(params, lr, **kwargs)

    def update_learning_rate(self, current_iter, warmup_iter=-1):
        """Step the schedulers, then scale every lr by ``current_iter / warmup_iter`` during warm-up.

        BasicSR writes the warm-up lr into the optimizer, where MultiStepLR (a chained scheduler)
        reads it back, so its lr stays at ``(W-1)/W`` of the base after warm-up. Here the
        scheduler's own lr is restored before each step, so warm-up ends exactly at the base lr.
        """
        if current_iter > 1:
            for optimizer, scheduler in zip(self.optimizers, self.schedulers):
                for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                    group['lr'] = lr
                scheduler.step()
        if current_iter < warmup_iter:
            for optimizer in self.optimizers:
                for group in optimizer.param_groups:
                    group['lr'] = group['lr'] * current_iter / warmup_iter

    def model_ema(self, decay=0.999):
        """EMA of parameters (one fused op) and a copy of the buffers. An EMA network deployed by a
        validation (``deployment: true``) is undeployed first: the update goes to its trained
        weights, and the next validation folds them again."""
        if getattr(self.net_g_ema, 'deployed', False):
            self.net_g_ema.undeploy()
        net_g = self.get_bare_model(self.net_g)
        ema_params = list(self.net_g_ema.parameters())
        params = [param.detach() for param in net_g.parameters()]
        with torch.no_grad():
            if decay == 0:
                torch._foreach_copy_(ema_params, params)
            else:
                torch._foreach_lerp_(ema_params, params, 1 - decay)
            for ema_buffer, buffer in zip(self.net_g_ema.buffers(), net_g.buffers()):
                ema_buffer.copy_(buffer)

    # ---------------------------------------------------------------- one iteration
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def optimize_parameters(self, current_iter):
        self.optimizer_g.zero_grad(set_to_none=True)
        with self._autocast():
            self.output = self.net_g(self.lq)
        output = self.output.float()  # losses in fp32

        l_total = 0
        loss_dict = OrderedDict()
        if self.cri_pix:
            l_pix = self.cri_pix(output, self.gt)
            l_total += l_pix
            loss_dict['l_pix'] = l_pix
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(output, self.gt)
            if l_percep is not None:
                l_total += l_percep
                loss_dict['l_percep'] = l_percep
            if l_style is not None:
                l_total += l_style
                loss_dict['l_style'] = l_style
        self._stop_if_not_finite(l_total, current_iter)

        if self.scaler is not None:
            self.scaler.scale(l_total).backward()
        else:
            l_total.backward()
        grad_norm = None
        if self.grad_clip > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer_g)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.net_g.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer_g)  # skips the step (and lowers the scale) on inf grads
            self.scaler.update()
        else:
            self.optimizer_g.step()

        self.log_dict = self.reduce_loss_dict(loss_dict)
        if grad_norm is not None:
            self.log_dict['grad_norm'] = grad_norm.item()
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    def _stop_if_not_finite(self, loss: torch.Tensor, current_iter: int) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        if self.opt['dist']:  # every rank must stop together, or the others wait forever
            torch.distributed.all_reduce(bad)
        if bad.item():
            value = loss.item()
            kind = 'nan' if math.isnan(value) else 'inf'
            if self.opt['dist'] and math.isfinite(value):
                kind = 'nan/inf on another rank'
            state = latest_training_state(self.opt['path'].get('training_states', ''))
            raise TrainingDivergedError(f'loss is {kind} at iteration {current_iter}; stopping (last good state: '
                                        f'{state or "none saved yet"})')

    # ---------------------------------------------------------------- validation / test
    def test(self):
        """Forward the (EMA) network on ``self.lq`` reflect-padded to a multiple of the window
        size; the output is cropped back to scale x the input size."""
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.get_bare_model(self.net_g)
        window = getattr(net, 'window_size', None) or self.opt['network_g'].get('window_size', 1)
        if isinstance(window, (tuple, list)):
            window = math.lcm(*map(int, window))
        height, width = self.lq.shape[-2:]
        lq = reflect_pad_to_multiple(self.lq, int(window)) if int(window) > 1 else self.lq
        was_training = net.training
        net.eval()
        with torch.no_grad():
            output = net(lq)
        if was_training:
            net.train()
        scale = self.opt.get('scale') or output.shape[-2] // lq.shape[-2]
        if output.shape[-2:] != (lq.shape[-2] * scale, lq.shape[-1] * scale):
            raise ValueError(f'the network made {tuple(output.shape[-2:])} from a {tuple(lq.shape[-2:])} input, not '
                             f'x{scale} (the option scale): its upscaling factor and scale must agree')
        self.output = output[..., :height * scale, :width * scale]

    # ---------------------------------------------------------------- checkpoints
    def save(self, epoch, current_iter):
        if hasattr(self, 'net_g_ema'):
            saved = self.save_network([self.net_g, self.net_g_ema], 'net_g', current_iter,
                                      param_key=['params', 'params_ema'])
        else:
            saved = self.save_network(self.net_g, 'net_g', current_iter)
        if saved is not False and hasattr(self, 'net_d'):  # a GAN's discriminator (ESCRealESRGANModel)
            saved = self.save_network(self.net_d, 'net_d', current_iter)
        if saved is not False:  # a state must never point at a network file that was not written
            self.save_training_state(epoch, current_iter)
        elif current_iter == -1:  # the end of the run: its result would be lost without a word (exit 0)
            kept = saved_iterations(self.opt['path']['training_states'])
            raise TrainingStoppedError(
                f'training ran to the end, but its final network could not be saved in {self.opt["path"]["models"]} '
                f'(see the warnings above); ' + (f'the latest checkpoint is that of iteration {kept[-1]}' if kept
                                                 else 'no checkpoint was saved'))

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's ``save_network``, written atomically; returns whether it was saved."""
        label = 'latest' if current_iter == -1 else current_iter
        save_path = os.path.join(self.opt['path']['models'], f'{net_label}_{label}.pth')
        nets = net if isinstance(net, list) else [net]
        param_keys = param_key if isinstance(param_key, list) else [param_key]
        assert len(nets) == len(param_keys), 'The lengths of net and param_key should be the same.'
        save_dict = {}
        for net_, key in zip(nets, param_keys):
            state_dict = self.get_bare_model(net_).state_dict()
            save_dict[key] = OrderedDict((k[7:] if k.startswith('module.') else k, v.detach().cpu())
                                         for k, v in state_dict.items())
        return self._save_with_retry(save_dict, save_path)

    @master_only
    def save_training_state(self, epoch, current_iter):
        if current_iter == -1:
            return
        state = {'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers]}
        if getattr(self, 'scaler', None) is not None:
            state['amp_scaler'] = self.scaler.state_dict()
        save_path = os.path.join(self.opt['path']['training_states'], f'{current_iter}.state')
        self._save_with_retry(state, save_path)

    @staticmethod
    def _save_with_retry(obj, save_path: str, tries: int = 3) -> bool:
        logger = get_root_logger()
        for attempt in range(1, tries + 1):
            try:
                atomic_torch_save(obj, save_path)
                return True
            except OSError as exc:
                logger.warning(f'Cannot save {save_path} (try {attempt} of {tries}): {exc}')
                if attempt < tries:
                    time.sleep(1)
        logger.error(f'Giving up on saving {save_path}; the previous checkpoint is intact.')
        return False

    def resume_training(self, resume_state):
        super().resume_training(resume_state)
        if getattr(self, 'scaler', None) is not None and 'amp_scaler' in resume_state:
            self.scaler.load_state_dict(resume_state['amp_scaler'])


if 'ESRModel' not in MODEL_REGISTRY:  # the authors' name, so their option files run unchanged
    MODEL_REGISTRY._do_register('ESRModel', ESCSRModel)

__all__ = ['ESCSRModel', 'TrainingDivergedError', 'TrainingStoppedError', 'atomic_torch_save', 'latest_training_state',
           'saved_iterations']
