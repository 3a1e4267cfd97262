"""Progress of long operations: what library code reports, shown only where someone watches.

Library code says what it is doing and how far it got, without knowing about terminals:

    from edgeseg import progress

    with progress.phase("export"):                       # one step without a count: a ticking
        export_model()                                   # clock, then "export  done in 3.1 s"

    with progress.bar("ranges", total=len(frames), unit="frame") as bar:
        for frame in frames:
            collect(frame)
            bar.update()                                 # or update(n); bar.total = n; bar.note("entropy")

    for size in progress.iterate(sizes, "parity", unit="size"):
        check(size)

    progress.write("a line printed between the bars, not through them")

`bar()` also works without `with` (call `.close()`), for callbacks such as TensorRT's
IProgressMonitor. Bars nest: one opened while another is drawn (the frames of one trial inside
a search over trials) disappears when it ends, the outermost stays as a record. Every call is a
no-op object when progress is off, so reporting costs nothing in a library, a test or a service.

Where it goes is decided once by the program (the CLI does it from `--quiet`/`--json`):
`configure(enabled=None)` shows bars only when stderr is a terminal (the default), True/False
force it. Bars go to the stream stderr was when they were configured, so `quiet_third_party()`
can hide other libraries' own bars and prints (coremltools' per-pass bars) while ours keep
showing. The bars are tqdm's; this module imports nothing heavy (no torch), so the runtime uses
it too.
"""
from __future__ import annotations

import contextlib
import functools
import io
import shutil
import sys
import threading
import time
from typing import Iterable, Iterator, TextIO

__all__ = ["configure", "enabled", "bar", "phase", "iterate", "write", "quiet_third_party", "Bar"]

_TICK_S = 0.5  # how often a phase's clock is redrawn


class _State:
    enabled: bool | None = None  # None: only when the stream is a terminal
    stream: TextIO | None = None  # None: sys.stderr at the time of use
    third_party = False  # let other libraries' output through quiet_third_party()
    open_bars = 0  # bars drawn now: one opened inside another is erased when it ends
    lock = threading.Lock()


def configure(enabled: bool | None = None, stream: TextIO | None = None, third_party: bool = False) -> None:
    """Show progress bars (True), never (False) or only when `stream` is a terminal (None, the
    default); `stream` defaults to stderr. third_party=True (the CLI's --verbose) stops
    `quiet_third_party()` from hiding what other libraries print."""
    _State.enabled = enabled
    _State.stream = stream
    _State.third_party = bool(third_party)


def _stream() -> TextIO:
    return _State.stream if _State.stream is not None else sys.stderr


def enabled() -> bool:
    """Whether bars are shown now."""
    if _State.enabled is not None:
        return _State.enabled
    isatty = getattr(_stream(), "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


def write(message: str) -> None:
    """Print one line to the progress stream without breaking a bar being drawn."""
    stream = _stream()
    if enabled():
        from tqdm import tqdm

        tqdm.write(message, file=stream)
    else:
        print(message, file=stream, flush=True)


class Bar:
    """A count towards an optional total. `update(n)`, `total` (settable), `note(text)`, `close()`."""

    def update(self, n: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        """Short extra text after the bar (a current value, a rate of our own)."""

    @property
    def total(self) -> int | None:
        return None

    @total.setter
    def total(self, value: int | None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


_NULL = Bar()


def _size() -> dict:
    # shutil falls back where a terminal reports a 0x0 size (a fresh pty), where tqdm would draw nothing
    columns, lines = shutil.get_terminal_size((100, 24))
    return {"ncols": columns, "nrows": lines}


@functools.lru_cache(maxsize=None)
def _tqdm_class(rate_label: str):
    from tqdm import tqdm

    class _Tqdm(tqdm):
        """tqdm with `{rate_text}` in its format: '12.5 FPS', '3.1 frames/s' ('-' before any rate)."""

        @property
        def format_dict(self):
            d = super().format_dict
            rate = d.get("rate")
            if rate is None and d.get("elapsed"):
                rate = (d["n"] - d.get("initial", 0)) / d["elapsed"]  # tqdm's own fallback: the mean rate
            d["rate_text"] = f"{rate:.1f} {rate_label}" if rate else f"- {rate_label}"
            return d

    return _Tqdm


class _TqdmBar(Bar):
    _FORMAT_TOTAL = "{desc}: {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_text}{postfix}]"
    _FORMAT_OPEN = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_text}{postfix}]"

    def __init__(self, desc: str, total: int | None, unit: str, rate_label: str | None):
        cls = _tqdm_class(rate_label or f"{unit}/s")
        with _State.lock:
            outermost = _State.open_bars == 0
            _State.open_bars += 1
        self._closed = False
        self._bar = cls(total=total, desc=desc, unit=unit, file=_stream(), leave=outermost, **_size(),
                        mininterval=0.25, disable=False, bar_format=self._format(total))

    def _format(self, total) -> str:
        return self._FORMAT_TOTAL if total else self._FORMAT_OPEN

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def note(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=False)

    @property
    def total(self):
        return self._bar.total

    @total.setter
    def total(self, value):
        self._bar.total = value
        self._bar.bar_format = self._format(value)
        self._bar.refresh()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._bar.close()
            with _State.lock:
                _State.open_bars -= 1


def bar(desc: str, total: int | None = None, unit: str = "steps", rate_label: str | None = None) -> Bar:
    """A progress bar of `total` `unit`s (plural: 'frames'; total None: a count without an end,
    e.g. a live camera). rate_label names the rate ('FPS'; default '<unit>/s')."""
    if not enabled():
        return _NULL
    return _TqdmBar(desc, int(total) if total else None, unit, rate_label)


def iterate(items: Iterable, desc: str, total: int | None = None, unit: str = "steps") -> Iterator:
    """Yield from `items`, counting each on a bar (total: len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with bar(desc, total, unit) as b:
        for item in items:
            yield item
            b.update()


@contextlib.contextmanager
def phase(desc: str) -> Iterator[None]:
    """One step without a count: a clock that ticks while it runs, then its duration."""
    if not enabled():
        yield
        return
    with _State.lock:
        outermost = _State.open_bars == 0
        _State.open_bars += 1
    t = _tqdm_class("")(total=None, desc=desc, file=_stream(), leave=False, **_size(), bar_format="{desc} ... {elapsed}",
            disable=False)
    stop = threading.Event()

    def tick():
        while not stop.wait(_TICK_S):
            t.refresh()

    ticker = threading.Thread(target=tick, name="edgeseg-progress", daemon=True)
    ticker.start()
    t0 = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        ticker.join()
        t.close()
        with _State.lock:
            _State.open_bars -= 1
        if ok and outermost:
            write(f"{desc}  done in {time.perf_counter() - t0:.1f} s")


@contextlib.contextmanager
def quiet_third_party() -> Iterator[io.StringIO]:
    """Hide what other libraries print to stdout/stderr inside the block (their own bars,
    notices), while our bars, bound to the real stderr, keep showing; `configure(third_party=True)`
    lets it through. Yields the captured text (for an error message that needs it)."""
    buffer = io.StringIO()
    if _State.third_party:
        yield buffer
        return
    with _State.lock:
        pinned = _State.stream is None
        if pinned:
            _State.stream = sys.stderr
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield buffer
    finally:
        if pinned:
            _State.stream = None
