"""What stops a training run cleanly: a signal from the user or the scheduler, or a loss/gradient that is no
longer a number.

Signals: the first SIGINT/SIGTERM only sets a flag; the loop finishes the step in progress, writes a checkpoint
and exits 128 + signal. A second one abandons the step at once (no new checkpoint; the last complete one stays),
for when a step is too long to wait for. Under torchrun every process gets the signal; the flag is summed
across processes each step so they all stop after the same step.
"""

from __future__ import annotations

import math
import os
import signal

from medtune.errors import MedtuneError

MAX_CONSECUTIVE_SKIPS = 10  # nan_policy=skip_batch: more bad batches in a row than this means training diverged


class Interrupted(Exception):
    """Leave the training loop: after a finished step (checkpoint it), or at once on a second signal."""

    def __init__(self, signum: int, step_finished: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.step_finished = step_finished


class StopSignals:
    """Context manager: SIGINT/SIGTERM request a stop after the current step (`.signum`); a second one raises
    Interrupted at once. The previous handlers come back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def ignore(self) -> None:
        """Once the run is stopping: further SIGINT/SIGTERM are ignored until the handlers are restored."""
        for s in self._previous:
            signal.signal(s, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)
        self.signum = signum
        # os.write, not print/logging: a signal handler may run while the logging lock is held.
        os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                    "(send it again to stop at once)\n".encode())


class NonFiniteGuard:
    """train.nan_policy: `stop` ends the run at the first step whose loss or gradient norm is NaN/Inf; `skip_batch`
    drops that step's batch (no optimizer step) and goes on, up to MAX_CONSECUTIVE_SKIPS in a row."""

    def __init__(self, policy: str):
        self.policy = policy
        self.consecutive = 0

    def bad(self, step: int, loss: float, grad_norm: float) -> bool:
        """True when the step must be skipped; raises MedtuneError when training must stop."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return False
        what = f"loss {loss} and gradient norm {grad_norm} at step {step}"
        self.consecutive += 1
        if self.policy == "stop":
            raise NonFinite(f"training stopped: {what} are not all finite; the weights before this step were "
                            "kept. Try a lower train.lr, train.precision=fp32, or train.nan_policy=skip_batch")
        if self.consecutive > MAX_CONSECUTIVE_SKIPS:
            raise NonFinite(f"training stopped: {what}, {self.consecutive} non-finite batches in a row "
                            "(nan_policy=skip_batch); try a lower train.lr or train.precision=fp32")
        return True


class NonFinite(MedtuneError):
    def __init__(self, message: str):
        super().__init__(message, field="train.nan_policy")
