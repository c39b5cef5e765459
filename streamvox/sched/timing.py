"""Online estimates of how long an LM step and a codec call take, measured as the engine runs.

Step time is modelled as `a + b * num_tokens` (fixed overhead plus per-token cost) and fitted by exponentially
weighted least squares, so it follows the machine as load and context lengths change. Pure Python.
"""

from __future__ import annotations


class StepTimer:
    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay  # weight kept by older samples at each new one
        self._sums = [0.0] * 5  # weighted sums of 1, x, y, x*x, x*y
        self._codec_s: float | None = None
        self.recent_step_s = 0.0  # moving average of the latest LM steps, whatever their size
        self.overhead = 1.0  # loop period / LM step time: what the rest of the loop and the codec thread add
        self.codec_busy = 0.0  # share of wall time the codec thread spends decoding
        self.num_steps = 0

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        x, y = float(num_tokens), seconds
        self._sums = [self.decay * s + v for s, v in zip(self._sums, (1.0, x, y, x * x, x * y), strict=True)]
        self.recent_step_s = seconds if not self.num_steps else 0.8 * self.recent_step_s + 0.2 * seconds
        self.num_steps += 1

    def observe_period(self, period_s: float, step_s: float) -> None:
        """One loop iteration took `period_s` wall time, of which the LM step was `step_s`."""
        if step_s > 0:
            self.overhead = 0.9 * self.overhead + 0.1 * max(1.0, period_s / step_s)

    def observe_codec_busy(self, busy_s: float, period_s: float) -> None:
        """Between two codec dispatches `period_s` apart, the codec thread was busy for `busy_s`."""
        if period_s > 0:
            self.codec_busy = 0.9 * self.codec_busy + 0.1 * min(1.0, busy_s / period_s)

    def period_s(self, num_tokens: int) -> float:
        """Predicted wall time between two LM steps over `num_tokens` tokens, overheads included."""
        return self.step_s(num_tokens) * self.overhead

    def observe_codec(self, seconds: float) -> None:
        self._codec_s = seconds if self._codec_s is None else 0.8 * self._codec_s + 0.2 * seconds

    @property
    def has_steps(self) -> bool:
        return self.num_steps > 0

    def step_s(self, num_tokens: int) -> float:
        """Predicted seconds of one LM step over `num_tokens` tokens (0.0 before any step was seen)."""
        w, sx, sy, sxx, sxy = self._sums
        if w == 0.0:
            return 0.0
        mean_x, mean_y = sx / w, sy / w
        var_x = sxx / w - mean_x * mean_x
        if var_x < 1e-6 * max(1.0, mean_x * mean_x):
            # one batch size seen so far: assume half of the time is fixed overhead, half grows with tokens
            return mean_y * (0.5 + 0.5 * num_tokens / max(mean_x, 1.0))
        slope = max(0.0, (sxy / w - mean_x * mean_y) / var_x)
        intercept = max(0.0, mean_y - slope * mean_x)
        return intercept + slope * num_tokens

    @property
    def codec_s(self) -> float:
        """Seconds from a chunk becoming decodable to its PCM existing (0.0 before any codec call)."""
        return self._codec_s or 0.0
