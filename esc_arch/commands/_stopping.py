"""Stopping ``basicsr train`` on Ctrl-C or SIGTERM without losing the iterations since its last save.

BasicSR's loop dies where the signal lands: every iteration after the last periodic checkpoint is
lost (hours, with ``save_checkpoint_freq: 5000``), and SIGTERM, what ``kill``, torchrun and batch
schedulers (SLURM before a pre-emption or a time limit) send, ends it without its clean-up. Here the
first signal asks the run to stop at the next point where the model is whole: the end of the
iteration under way (after its optimizer step) or of a validation. There the model and the training
state of its last finished iteration are saved, as a periodic checkpoint is (atomically), and the
command exits 130 (SIGINT) or 143 (SIGTERM); ``--auto_resume`` goes on from there. A second signal
stops at once, as does a first one when no finished iteration is unsaved (before the first, right
after a checkpoint). Under DDP the processes agree at each of those points (one all-reduce of a flag),
so they stop at the same iteration also when only one got the signal. The training loader's worker
processes ignore Ctrl-C (the terminal sends it to the whole process group): the run ends them as it
stops. A SIGTERM to every process (a SLURM job's, systemd's stop) ends the workers too; PyTorch's
SIGCHLD handler would then raise in the middle of the iteration, so once a stop is asked for it is
put aside: the iteration ends and is saved. Where the workers' end is found first, by a data
fetch between iterations, the last finished iteration is saved there.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading

from ..messages import first_line

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on a signal; ``saved``: the iteration saved as it stopped (None: nothing new)."""

    def __init__(self, signum: int, saved: int | None, last_saved: int | None, unsaved: int | None = None,
                 why: str | None = None):
        super().__init__(signum)
        self.signum, self.saved, self.last_saved, self.unsaved, self.why = signum, saved, last_saved, unsaved, why

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    def line(self) -> str:
        name = signal.Signals(self.signum).name + (f' ({self.why})' if self.why else '')
        if self.saved is not None:
            return (f'stopped by {name} after iteration {self.saved}, which is saved (models and training state): '
                    'add --auto_resume to go on from it')
        lost = f'; iteration {self.unsaved} could not be saved (see the warnings above)' if self.unsaved else ''
        if self.last_saved is not None:
            return (f'stopped by {name}{lost}; iteration {self.last_saved}, the last saved, is where --auto_resume '
                    'goes on')
        if lost or self.why:
            return f'stopped by {name}{lost}; no iteration of this run is saved'
        return f'stopped by {name} before an iteration of this run ended (nothing to save)'

    def report(self, command: str) -> int:
        """Say ``line()`` (the first DDP process only: it saves) and give the exit code."""
        if first_process():
            sys.stderr.write(f'basicsr {command}: {self.line()}\n')
            sys.stderr.flush()
        return self.exit_code


def first_process() -> bool:
    """Whether this is the first DDP process (or no DDP run): the one that saves and reports."""
    from basicsr.utils.dist_util import get_dist_info
    return get_dist_info()[0] == 0


class _Stop:
    """The state of one training run's stop (a process runs one training at a time)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.requested = None  # the signal that asked to stop
        self.model = None
        self.epoch = 0
        self.done = None  # the last finished iteration
        self.inside = False  # in an iteration's optimize_parameters
        self.saved = None  # the last iteration whose training state is saved
        self.previous = {}

    def unsaved(self) -> bool:
        return self.done is not None and self.done != self.saved

    # ---------------------------------------------------------------------------------- signals
    def on_signal(self, signum, frame):
        if self.requested is not None:
            raise TrainingInterrupted(signum, None, self.saved, why='a second signal: at once, without saving')
        if not self.unsaved():
            raise TrainingInterrupted(signum, None, self.saved)
        self.requested = signum
        child = getattr(signal, 'SIGCHLD', None)  # (none on Windows)
        if child is not None and child not in self.previous and callable(signal.getsignal(child)):
            self.previous[child] = signal.signal(child, _worker_ended)  # PyTorch's loader's handler
        if first_process():
            sys.stderr.write(f'basicsr train: {signal.Signals(signum).name}: stopping once the iteration (or '
                             'validation) under way ends, saving it first (Ctrl-C or SIGTERM again stops at once, '
                             'without saving)\n')
            sys.stderr.flush()

    def install(self):
        if threading.current_thread() is threading.main_thread() and not self.previous:
            self.previous = {signum: signal.signal(signum, self.on_signal) for signum in _SIGNALS}

    def restore_handlers(self):
        """The handlers from before ``install`` back; the run's state is kept (for ``after_failure``)."""
        previous, self.previous = self.previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    @contextlib.contextmanager
    def handling(self):
        """Stop on signals while the training runs; once it has ended (returned or raised), a signal is
        the command's again (the run's end is under way: nothing is asked to stop)."""
        self.install()
        try:
            yield self
        finally:
            self.restore_handlers()

    def uninstall(self):
        self.restore_handlers()
        self.reset()

    # ---------------------------------------------------------------------------------- stop points
    def stop_point(self):
        """Where the model is whole: save and stop if any process was asked to."""
        import torch
        import torch.distributed as dist
        wanted = int(self.requested or 0)
        if dist.is_available() and dist.is_initialized():  # the signal any process got
            flag = torch.tensor([float(wanted)], device=self.model.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            wanted = int(flag.item())
        if wanted:
            raise self._save_last(wanted)

    def _save_last(self, signum: int) -> TrainingInterrupted:
        """Save the last finished iteration where it is unsaved; the stop that says how it went."""
        if not self.unsaved():
            return TrainingInterrupted(signum, None, self.saved)
        from basicsr.utils import get_root_logger
        get_root_logger().info(f'Stopping ({signal.Signals(signum).name}): saving models and training states of '
                               f'iteration {self.done}.')
        self.model.save(self.epoch, self.done)
        if self.saved != self.done:  # a full disk: the model said why
            return TrainingInterrupted(signum, None, self.saved, unsaved=self.done)
        return TrainingInterrupted(signum, self.done, self.saved)

    def after_failure(self, exc: BaseException) -> TrainingInterrupted:
        """The run failed (``exc``) after a stop was asked for (the loader's workers ended by the same
        SIGTERM, a DDP peer gone): the last finished iteration is saved where the failure came between
        iterations."""
        if self.model is None or self.inside:
            where = 'inside an iteration, not saved' if self.inside else 'before training'
            return TrainingInterrupted(self.requested, None, self.saved, why=f'{where}: {first_line(exc)}')
        return self._save_last(self.requested)

    def watch(self, model, resumed_iter: int | None):
        """Follow ``model``'s iterations, saves and validations (its methods wrapped on the instance)."""
        self.model = model
        self.saved = resumed_iter
        optimize, save, validation = model.optimize_parameters, model.save, model.validation

        @functools.wraps(optimize)
        def optimize_parameters(current_iter, *args, **kwargs):
            self.inside = True  # stays True where it raises: the model may be half-updated
            result = optimize(current_iter, *args, **kwargs)
            self.inside = False
            self.done = current_iter
            self.stop_point()
            return result

        @functools.wraps(save)
        def save_model(epoch, current_iter, *args, **kwargs):
            result = save(epoch, current_iter, *args, **kwargs)
            if current_iter >= 0 and _state_written(model, current_iter):  # -1: net_g_latest only
                self.saved = current_iter
            return result

        @functools.wraps(validation)
        def validate(*args, **kwargs):
            result = validation(*args, **kwargs)
            self.stop_point()
            return result

        model.optimize_parameters, model.save, model.validation = optimize_parameters, save_model, validate

    def follow_epochs(self, sampler):
        """Record the epoch BasicSR's loop is in (it sets it on its sampler at each epoch's start)."""
        set_epoch = sampler.set_epoch

        @functools.wraps(set_epoch)
        def recording(epoch):
            self.epoch = epoch
            return set_epoch(epoch)
        sampler.set_epoch = recording


def _state_written(model, iteration: int) -> bool:
    """Whether ``model.save`` wrote the training state of ``iteration`` (it gives up on a full disk).
    Only the first DDP process saves; the others take its word."""
    if not first_process():
        return True
    try:
        folder = model.opt['path']['training_states']
    except (AttributeError, KeyError, TypeError):  # a model without BasicSR's paths: its save raises on failure
        return True
    return os.path.isfile(os.path.join(folder, f'{iteration}.state'))


STOP = _Stop()


def _worker_ended(signum, frame):
    """SIGCHLD once a stop is asked for: the run is ending; a loader worker ended by the same signal
    is no error to raise in the middle of the iteration (PyTorch's handler would)."""


def sigterm_ends_the_process() -> None:
    """Once training has failed or stopped, SIGTERM ends the process at once, as by default: what is left
    is its teardown (its work is saved), and torchrun ends the other DDP processes of a failed run with
    SIGTERM, where the command's Ctrl-C-like handler raised inside their loader's ``__del__`` (joining
    its workers), a traceback Python prints and otherwise ignores."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def ignore_ctrl_c() -> None:
    """In a loader worker: leave Ctrl-C to the main process, which stops the run. (SIGTERM keeps its
    default: the loader, and multiprocessing at exit, end their workers with it and then wait.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
