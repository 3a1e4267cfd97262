"""The pipeline's self-tuning: candidates, the trials on one source, the choice, and the Segmenter
keeping it. Speeds are made deterministic with engines that sleep; the timing of the real
engines is the benchmark's job (benchmarks/pipeline_efficiency.py)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from runtime.pipeline import Config, Pipeline, PipelineError, Tuner, candidate_configs
from runtime.sources import Source
from runtime.stats import Stats


class CountingSource(Source):
    """n small frames, counting reads and closes."""

    live = False

    def __init__(self, n: int):
        super().__init__()
        self.n, self.reads, self.closes = n, 0, 0

    def read(self):
        if self.closed or self.reads >= self.n:
            return None
        self.reads += 1
        return self._frame(np.full((8, 8, 3), self.reads % 256, np.uint8))

    def close(self):
        self.closes += 1
        super().close()


def sleeping_pipeline(source, seconds_per_config: dict, stats=None):
    """make() for the Tuner: the engine of each configuration sleeps its own time per frame."""
    def make(config: Config, frames, keep_source):
        delay = seconds_per_config[config]
        return Pipeline(source, lambda w: w.frame.index, lambda w: time.sleep(delay) or w.data, lambda w: w.data,
                        stats=stats, max_frames=frames, stage_nice=config.stage_nice, keep_source=keep_source)
    return make


def test_candidates_vary_only_what_the_caller_left_open():
    assert candidate_configs(cores=2) == [Config(None, 19), Config(None, 0), Config(1, 19), Config(1, 0)]
    assert candidate_configs(threads=2, cores=2) == [Config(2, 19), Config(2, 0)]
    assert candidate_configs(stage_nice=5, cores=2) == [Config(None, 5), Config(1, 5)]
    assert candidate_configs(cores=1) == [Config(None, 19), Config(None, 0)]
    assert candidate_configs(cores=8)[4:] == [Config(4, 19), Config(4, 0)]  # half the cores on big machines
    assert candidate_configs(vary_threads=False, cores=4) == [Config(None, 19), Config(None, 0)]
    with pytest.raises(PipelineError, match="stage_nice must be 0..19"):
        candidate_configs(stage_nice=25)
    with pytest.raises(PipelineError, match="at least one candidate"):
        Tuner([])


def test_tuner_keeps_the_fastest_and_delivers_every_frame_once_in_order():
    configs = candidate_configs(cores=2)
    delays = {c: 0.006 for c in configs}
    fast = Config(1, 0)
    delays[fast] = 0.001
    src, stats = CountingSource(400), Stats()
    tuner = Tuner(configs, min_frames=6, min_seconds=0.03)
    chosen = []
    indices = [w.frame.index for w in tuner.run(sleeping_pipeline(src, delays, stats), on_choice=chosen.append)]
    assert indices == list(range(400))  # trials included: nothing lost, nothing twice
    assert tuner.chosen == fast and chosen == [fast]
    summary = tuner.summary()
    assert summary["chosen"] == {"threads": 1, "stage_nice": 0}
    assert 0 < summary["trial_frames"] < 400
    rates = {(c["threads"], c["stage_nice"]): max(c["fps"]) for c in summary["candidates"] if c["fps"]}
    assert rates[(1, 0)] > 2 * rates[("engine default", 19)]
    assert src.closes == 1  # only the last pipeline closes the source
    assert stats.counters["frames_in"] == 400  # the trials share one Stats


def test_candidates_far_behind_are_dropped_after_a_round():
    configs = [Config(None, 19), Config(1, 19)]
    src = CountingSource(300)
    tuner = Tuner(configs, min_frames=5, min_seconds=0.02, repeats=3)
    list(tuner.run(sleeping_pipeline(src, {configs[0]: 0.008, configs[1]: 0.001})))
    assert len(tuner.rates[configs[0]]) == 1 and tuner.chosen == configs[1]


def test_a_source_shorter_than_the_tuning_ends_cleanly():
    configs = candidate_configs(cores=2)
    src = CountingSource(20)
    tuner = Tuner(configs, min_frames=8, min_seconds=0.05)
    chosen = []
    out = [w.frame.index for w in tuner.run(sleeping_pipeline(src, {c: 0.002 for c in configs}), on_choice=chosen.append)]
    assert out == list(range(20)) and len(chosen) == 1 and tuner.chosen in configs


def test_max_frames_counts_the_trial_frames():
    configs = candidate_configs(cores=2)
    src = CountingSource(1000)
    tuner = Tuner(configs, min_frames=4, min_seconds=0.0)
    out = list(tuner.run(sleeping_pipeline(src, {c: 0.001 for c in configs}), max_frames=30))
    assert len(out) == 30 and src.reads == 30


def test_ties_go_to_the_earlier_candidate():
    tuner = Tuner([Config(None, 19), Config(1, 19)], tie=0.05)
    tuner.rates = {Config(None, 19): [100.0], Config(1, 19): [103.0]}
    tuner._choose()
    assert tuner.chosen == Config(None, 19)


def test_stopping_during_the_trials_leaves_no_thread_and_closes_the_source(default_bundle):
    from runtime.segmenter import Segmenter

    base = threading.active_count()
    seg = Segmenter(default_bundle)
    src = CountingSource(10_000)
    stream = seg.stream(src)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > base and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == base and src.closed


# -- through the Segmenter --------------------------------------------------------------------
def test_segmenter_tunes_on_its_first_stream_and_keeps_the_choice(default_bundle):
    from runtime.segmenter import Segmenter

    seg = Segmenter(default_bundle)
    frames = [r.frame_index for r in seg.stream("synthetic://?frames=200&width=64&height=48")]
    assert frames == list(range(200))
    info = seg.stats.summary()["info"]
    tuning = info["tuning"]
    assert len(tuning["candidates"]) == 4 and tuning["trial_frames"] > 0
    chosen = tuning["chosen"]
    assert info["engine_threads"] == chosen["threads"] and info["stage_nice"] == chosen["stage_nice"]
    assert seg.engine.session.get_session_options().intra_op_num_threads == (1 if chosen["threads"] == 1 else 0)
    # the next stream runs the choice straight away and still says how it was made
    n = sum(1 for _ in seg.stream("synthetic://?frames=10&width=64&height=48"))
    assert n == 10 and seg.stats.summary()["info"]["tuning"] == tuning
    # an explicit stage priority overrides the chosen one, the threads stay
    list(seg.stream("synthetic://?frames=5&width=64&height=48", stage_nice=3))
    assert seg.stats.info["stage_nice"] == 3 and seg.stats.info["engine_threads"] == chosen["threads"]


def test_what_the_caller_fixes_is_not_tuned(default_bundle):
    from runtime.segmenter import Segmenter

    seg = Segmenter(default_bundle, threads=2)
    list(seg.stream("synthetic://?frames=120&width=64&height=48"))
    cands = seg.stats.info["tuning"]["candidates"]
    assert {c["threads"] for c in cands} == {2} and {c["stage_nice"] for c in cands} == {0, 19}
    seg = Segmenter(default_bundle)
    list(seg.stream("synthetic://?frames=30&width=64&height=48", tune=False))
    assert "tuning" not in seg.stats.info and seg.stats.info["stage_nice"] == 19
    assert seg.stats.info["engine_threads"] == "engine default"
    seg = Segmenter(default_bundle)
    list(seg.stream("synthetic://?frames=30&width=64&height=48", tune=False, stage_nice=0))
    assert seg.stats.info["stage_nice"] == 0


def test_tune_stops_once_chosen_and_bench_reports_it(default_bundle):
    import subprocess
    import sys

    from runtime.segmenter import Segmenter
    from tests.conftest import ROOT

    seg = Segmenter(default_bundle)
    summary = seg.tune("synthetic://?frames=0&width=64&height=48")  # endless: tune() must stop by itself
    assert summary is not None and summary["chosen"] == seg.stats.info["tuning"]["chosen"]
    assert seg.tune("synthetic://?frames=0&width=64&height=48") == summary  # chosen already: nothing to measure
    r = subprocess.run([sys.executable, "-m", "edgeseg.cli", "bench", str(default_bundle.path), "--frames", "20",
                        "--source", "synthetic://?frames=400&width=64&height=48"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tuned on" in r.stdout and "ratio" in r.stdout
