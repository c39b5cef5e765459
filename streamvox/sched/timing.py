"""Online estimates of how long an LM step and a codec call take, measured as the engine runs.

An LM step is modelled as `a + b * num_rows + c * num_extra_tokens + d * num_context_tokens / 1000`: a fixed cost, a
cost per row (decode work, sampling), a cost per prompt token beyond one per row (prefill) and a cost that grows
with the positions the step attends over. The four are fitted by exponentially weighted least squares, so the
estimate follows the machine as load and context lengths change; the engine's warm-up runs several batch sizes and
context lengths and keeps what it measured as a prior that never decays, so the cost of one more stream is known
before the engine has ever run that many. A linear fit is off by some share where the engine actually runs (the
server and the codec thread take their part of the cores), so predictions are scaled by a moving average of
measured over fitted step time (`bias`), taken before each step joins the fit. A prior measured with nothing else on
the machine can start with a bias above 1, which relaxes as live steps come (about 60 of them).

A codec call is modelled as `e + f * num_frames + g * sum(L) / 1000 + h * sum(L^2) / 1e6`, fitted the same way
(the warm-up's calls as its prior): on a CPU a call of 8 frames costs about half as much per frame as a call of
one, so what a stream costs the codec depends on how full its batches are. L are the frames a detokenizer reruns
over for each chunk when it reruns over the whole prefix (flow matching, AudioPlan.codec_rereads; none for a
plain codec): its attention makes a chunk late in a long utterance cost several times the first (on the tiny
CosyVoice2, 0.8 s at frame 400 against 0.12 s). Its predictions carry a bias of their own (`codec_bias`).
Pure Python.
"""

from __future__ import annotations

PRIOR_WEIGHT = 30.0  # the warm-up counts as this many live samples
MIN_BIAS, MAX_BIAS = 0.8, 2.0  # bounds of the correction of the fit by recent steps
OUTLIER = 3.0  # a decode step or codec call longer than this many times the prediction counts as this many
CODEC_RIDGE = 1e-3  # the same for a codec call, relative to each feature's spread
RIDGE = 0.05  # pulls an unmeasured direction towards a guess, relative to the samples' weight (see `_fit`)
NUM_FEATURES = 4  # of an LM step
NUM_CODEC_FEATURES = 4  # of a codec call: fixed, frames, rerun frames / 1000, squared rerun frames / 1e6


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a @ x = b for a small positive-definite `a` (Gaussian elimination with partial pivoting)."""
    n = len(b)
    m = [row[:] + [v] for row, v in zip(a, b, strict=True)]
    for i in range(n):
        pivot = max(range(i, n), key=lambda r: abs(m[r][i]))
        m[i], m[pivot] = m[pivot], m[i]
        if abs(m[i][i]) < 1e-30:
            return [0.0] * n
        for r in range(i + 1, n):
            f = m[r][i] / m[i][i]
            m[r] = [x - f * y for x, y in zip(m[r], m[i], strict=True)]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (m[i][n] - sum(m[i][j] * x[j] for j in range(i + 1, n))) / m[i][i]
    return x


def _features(num_rows: int, num_tokens: int | None, num_context: int) -> list[float]:
    tokens = num_rows if num_tokens is None else num_tokens
    return [1.0, float(num_rows), float(max(0, tokens - num_rows)), num_context / 1000.0]


class _Sums:
    """Weighted sums X^T W X and X^T W y of the samples."""

    def __init__(self, num_features: int = NUM_FEATURES) -> None:
        self.xx = [[0.0] * num_features for _ in range(num_features)]
        self.xy = [0.0] * num_features

    def add(self, x: list[float], y: float, decay: float = 1.0) -> None:
        for i in range(len(x)):
            self.xy[i] = decay * self.xy[i] + x[i] * y
            for j in range(len(x)):
                self.xx[i][j] = decay * self.xx[i][j] + x[i] * x[j]

    def scaled_sum(self, other: _Sums, scale: float) -> _Sums:
        out = _Sums(len(self.xy))
        out.xx = [[(p + q) * scale for p, q in zip(r1, r2, strict=True)]
                  for r1, r2 in zip(self.xx, other.xx, strict=True)]
        out.xy = [(p + q) * scale for p, q in zip(self.xy, other.xy, strict=True)]
        return out


def _codec_features(num_frames: float, rereads: tuple[float, float]) -> list[float]:
    return [1.0, float(num_frames), rereads[0] / 1000.0, rereads[1] / 1e6]


def _ridge_fit(sums: _Sums, guesses: list[float], relative: float | None = None) -> list[float]:
    """Non-negative coefficients of the weighted least-squares fit, each but the first (the fixed cost) pulled
    towards its guess by RIDGE of the samples' weight (or by `relative` of the feature's own second moment, which
    does not depend on the feature's units); the fixed cost then takes what the others leave."""
    w = sums.xx[0][0]
    ridges = [0.0] + [RIDGE * w if relative is None else relative * max(sums.xx[i][i], 1e-9 * w)
                      for i in range(1, len(guesses))]
    normal = [[v + (ridges[i] if i == j else 0.0) for j, v in enumerate(row)] for i, row in enumerate(sums.xx)]
    target = [v + ridges[i] * g for i, (v, g) in enumerate(zip(sums.xy, guesses, strict=True))]
    coefficients = [max(0.0, c) for c in _solve(normal, target)]
    coefficients[0] = max(0.0, (sums.xy[0] - sum(c * sums.xx[0][i] for i, c in enumerate(coefficients) if i)) / w)
    return coefficients


def _corrected(bias: float, seconds: float, predicted_s: float) -> float:
    """`bias` moved a step towards measured over predicted time (a pause, GC or another process, is not a cost)."""
    ratio = min(seconds, OUTLIER * predicted_s) / predicted_s
    return min(MAX_BIAS, max(MIN_BIAS, 0.95 * bias + 0.05 * ratio))


def _as_prior(prior: _Sums, live: _Sums) -> _Sums:
    """`prior` and `live` together, weighing PRIOR_WEIGHT samples."""
    weight = live.xx[0][0] + prior.xx[0][0]
    return prior.scaled_sum(live, PRIOR_WEIGHT / weight) if weight > 0 else prior


class StepTimer:
    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay  # weight kept by older samples at each new one (1.0 while the prior is measured)
        self._live_decay = decay
        self._live = _Sums()
        self._prior = _Sums()
        self._codec_s: float | None = None
        self.prefill_token_s: float | None = None  # seconds one prompt token adds to a step
        self.bias = 1.0  # measured / fitted decode step time lately: corrects the fit where the engine runs
        self.codec_bias = 1.0  # the same for codec calls
        self._coefficients: list[float] | None = None  # cached fit, cleared by each sample
        self.recent_step_s = 0.0  # moving average of the latest LM steps, whatever their size
        self.recent_period_s = 0.0  # moving average of the latest back-to-back loop periods
        self.overhead = 1.0  # loop period / LM step time: what the rest of the loop and the codec thread add
        # codec calls: _codec_features -> seconds
        self._codec_live, self._codec_prior = _Sums(NUM_CODEC_FEATURES), _Sums(NUM_CODEC_FEATURES)
        self._codec_fit: list[float] | None = None  # cached coefficients, cleared by each call
        self.num_steps = 0

    def observe_step(self, num_rows: int, num_tokens: int, num_context: int, seconds: float) -> None:
        """An LM step over `num_rows` requests, `num_tokens` new positions and `num_context` attended positions
        took `seconds`."""
        extra = num_tokens - num_rows
        if extra > 0:  # prefill: its tokens' cost on top of what the same step would cost as decode rows
            per_token_s = max(0.0, seconds - self.step_s(num_rows, num_rows, num_context)) / extra
            self.prefill_token_s = per_token_s if self.prefill_token_s is None else (
                0.8 * self.prefill_token_s + 0.2 * per_token_s)
        else:
            predicted_s = self.step_s(num_rows, num_tokens, num_context) / self.bias
            if predicted_s > 0:  # how far off the fit is where the engine runs now, before it learns this step
                seconds = min(seconds, OUTLIER * predicted_s)
                self.bias = _corrected(self.bias, seconds, predicted_s)
            self._live.add(_features(num_rows, num_tokens, num_context), seconds, self.decay)
            self._coefficients = None
        self.recent_step_s = seconds if not self.num_steps else 0.8 * self.recent_step_s + 0.2 * seconds
        self.num_steps += 1

    def begin_prior(self) -> None:
        """Samples from now to `keep_as_prior` (the warm-up) all count alike: none decays. Earlier ones are
        forgotten."""
        self.decay = 1.0
        self._live, self._codec_live = _Sums(), _Sums(NUM_CODEC_FEATURES)
        self._coefficients = self._codec_fit = None

    def keep_as_prior(self, bias: float = 1.0) -> None:
        """What was measured since `begin_prior` stays as a prior of PRIOR_WEIGHT samples; live samples restart.
        `bias`: how much slower than measured steps and codec calls are taken to be until live ones say."""
        self.decay = self._live_decay
        self.bias = self.codec_bias = bias
        self._prior, self._codec_prior = _as_prior(self._prior, self._live), _as_prior(self._codec_prior,
                                                                                        self._codec_live)
        self._live, self._codec_live = _Sums(), _Sums(NUM_CODEC_FEATURES)
        self._coefficients = self._codec_fit = None

    def observe_period(self, period_s: float, step_s: float) -> None:
        """One loop iteration took `period_s` wall time, of which the LM step was `step_s`."""
        if step_s > 0:
            self.overhead = 0.9 * self.overhead + 0.1 * max(1.0, period_s / step_s)
        self.recent_period_s = 0.9 * self.recent_period_s + 0.1 * period_s if self.recent_period_s else period_s

    def observe_codec_frames(self, num_frames: int, busy_s: float, rereads: tuple[float, float] = (0.0, 0.0)) -> None:
        """The codec thread took `busy_s` to decode a batch of `num_frames` frames whose chunks rerun over
        `rereads` (AudioPlan.codec_rereads summed)."""
        if num_frames > 0:
            predicted_s = self.codec_call_s(num_frames, rereads) / self.codec_bias
            if predicted_s > 0:
                self.codec_bias = _corrected(self.codec_bias, busy_s, predicted_s)
            self._codec_live.add(_codec_features(num_frames, rereads), busy_s, self.decay)
            self._codec_fit = None

    def codec_call_s(self, num_frames: float, rereads: tuple[float, float] = (0.0, 0.0)) -> float:
        """Predicted codec thread seconds of one call decoding `num_frames` frames whose chunks rerun over
        `rereads` (0.0 before any call)."""
        if self._codec_fit is None:
            self._codec_fit = self._fit_codec()
        return self.codec_bias * sum(c * x for c, x in zip(self._codec_fit, _codec_features(num_frames, rereads),
                                                            strict=True))

    def _fit_codec(self) -> list[float]:
        sums = self._codec_prior.scaled_sum(self._codec_live, 1.0)
        if sums.xx[0][0] == 0.0:
            return [0.0] * NUM_CODEC_FEATURES
        # a direction the calls do not vary in (one size of call; no reruns) is pulled towards a call costing in
        # proportion to its frames, with no rerun cost; the pull is slight against any spread
        return _ridge_fit(sums, [0.0, sums.xy[0] / max(sums.xx[0][1], 1e-9), 0.0, 0.0], relative=CODEC_RIDGE)

    def observe_codec(self, seconds: float) -> None:
        self._codec_s = seconds if self._codec_s is None else 0.8 * self._codec_s + 0.2 * seconds

    @property
    def has_steps(self) -> bool:
        return self.num_steps > 0 or self._prior.xx[0][0] > 0

    def period_s(self, num_rows: int, num_tokens: int | None = None, num_context: int = 0) -> float:
        """Predicted wall time between two LM steps (overheads included) over `num_rows` requests, `num_tokens`
        new positions (default: one per row) and `num_context` attended positions."""
        return self.step_s(num_rows, num_tokens, num_context) * self.overhead

    def step_s(self, num_rows: int, num_tokens: int | None = None, num_context: int = 0) -> float:
        """Predicted seconds of one LM step (0.0 before any step was seen)."""
        features = _features(num_rows, num_tokens, num_context)
        if self.prefill_token_s is not None:
            features[2], extra_s = 0.0, features[2] * self.prefill_token_s
        else:
            extra_s = 0.0
        return extra_s + self.bias * sum(c * x for c, x in zip(self._fit(), features, strict=True))

    def _fit(self) -> list[float]:
        if self._coefficients is not None:
            return self._coefficients
        sums = self._prior.scaled_sum(self._live, 1.0)
        w = sums.xx[0][0]
        if w == 0.0:
            return [0.0] * NUM_FEATURES
        # A direction the samples do not vary in is pulled towards a guess: half of the mean step is fixed cost,
        # half grows with the rows, a prefill token costs what a row does, context costs nothing. The pull is
        # small against any real spread, e.g. batches that differ by one row.
        guess_row = 0.5 * (sums.xy[0] / w) / max(sums.xx[0][1] / w, 1.0)
        coefficients = _ridge_fit(sums, [0.0, guess_row, guess_row, 0.0])
        self._coefficients = coefficients
        return coefficients

    @property
    def codec_s(self) -> float:
        """Seconds from a chunk becoming decodable to its PCM existing (0.0 before any codec call)."""
        return self._codec_s or 0.0
