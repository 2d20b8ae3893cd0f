"""Progress of long work: a bar on a terminal, and at most a few log lines elsewhere (a SLURM or
CI log, a pipe), where every redraw of a bar would be a line of its own."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def is_terminal(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ExtractionProgress:
    """Progress of an extraction: a tqdm bar when stderr is a terminal; otherwise (a SLURM or
    CI log, a pipe, a file) no bar, whose every redraw would be a line of its own, but one log
    line per tenth of the sequences with the throughput in tokens/s, so a log holds at most
    ``STEPS`` lines per extraction whatever its length."""

    STEPS = 10

    def __init__(
        self, n_seq: int, n_tokens: int, n_layers: int, stream: TextIO | None = None
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.n_seq, self.n_tokens, self.n_layers = n_seq, n_tokens, n_layers
        self.seq = self.tokens = self.reported = 0
        self.started = time.monotonic()
        self.bar: Any = None
        if is_terminal(self.stream):
            self.bar = tqdm(total=n_seq, unit="seq", desc="extract activations", file=self.stream)
        else:
            log.info(
                "Extracting activations: %d sequences, %d tokens, %d layers",
                n_seq,
                n_tokens,
                n_layers,
            )

    def __enter__(self) -> ExtractionProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, n_seq: int, n_tokens: int) -> None:
        """``n_seq`` more sequences (``n_tokens`` content tokens) written to every layer."""
        self.seq += n_seq
        self.tokens += n_tokens
        if self.bar is not None:
            self.bar.update(n_seq)
            return
        step = self.seq * self.STEPS // max(self.n_seq, 1)
        if step <= self.reported:
            return
        self.reported = step
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.tokens / elapsed
        left = max(self.n_tokens - self.tokens, 0) / rate if rate > 0 else 0.0
        log.info(
            "Extracting activations: %d/%d sequences (%d%%), %.0f tokens/s, %s",
            self.seq,
            self.n_seq,
            100 * self.seq // max(self.n_seq, 1),
            rate,
            f"about {duration(left)} left"
            if self.seq < self.n_seq
            else f"done in {duration(elapsed)}",
        )


class FitProgress:
    """Progress of one probe fit: a bar with the iteration, objective and relative gap on a
    terminal; elsewhere a log line every ``every`` seconds once the fit has run that long, so a
    short fit writes nothing and a long one is never silent."""

    def __init__(self, desc: str, every: float = 30.0, stream: TextIO | None = None) -> None:
        self.desc, self.every = desc, every
        self.started = self.last = time.monotonic()
        self.bar: Any = None
        stream = sys.stderr if stream is None else stream
        if is_terminal(stream):
            self.bar = tqdm(desc=desc, unit="it", leave=False, file=stream)

    def __enter__(self) -> FitProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, iteration: int, value: float, gap_rel: float | None) -> None:
        """The fit is at ``iteration`` with objective ``value`` and relative gap ``gap_rel``."""
        gap = "n/a" if gap_rel is None else f"{gap_rel:.1e}"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(objective=f"{value:.6g}", gap=gap)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            log.info(
                "%s: iteration %d, objective %.6g, relative gap %s, %s",
                *(self.desc, iteration, value, gap, duration(now - self.started)),
            )


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
