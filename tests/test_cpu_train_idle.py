"""benchmarks/cpu_train_idle.py's training window, on made-up samples: the cores-busy figure of
issue 25 covers the training steps, up to the last rate line logged before validation (the
trainer prints its last rate line after the final validation pass), and the figure with the
validation pass is kept beside it."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import cpu_train_idle as idle  # noqa: E402

LOG = """[train] 1/40 steps
[train] 9/40 steps loss 1.2 8.5 patches/s
[train] 15/40 steps loss 0.5 8.7 patches/s
[train] 35/40 steps loss 0.3 8.6 patches/s
[eval] step 40: val loss 0.55 (1.0s)
[eval] step 40: volume miou_fg 0.52 (10.6s)
[train] 40/40 steps loss 0.26 8.2 patches/s
"""


def test_rate_lines_before_the_first_validation():
  assert idle.rate_lines_before_evaluation(LOG) == 3
  assert idle.rate_lines_before_evaluation(LOG.replace("[eval]", "[info]")) == 4


def _sample(t, rates, cpu_seconds):
  # One process thread that has used `cpu_seconds` by wall time `t`; the machine's idle time is
  # what the rest of 2 cores did not use (both in clock ticks, as /proc reports them).
  ticks, total = round(cpu_seconds * idle.TICK), round(t * 2 * idle.TICK)
  return {"t": t, "rates": rates, "threads": {1: ("python", ticks)},
          "machine": (total, total - ticks)}


def test_the_window_ends_at_the_last_rate_line_before_validation():
  # Training at 2 cores busy from t=0 to t=10 (rate lines 1-3), then validation at 1 core.
  samples = [_sample(0, 1, 0), _sample(5, 2, 10), _sample(10, 3, 20), _sample(20, 3, 30),
             _sample(21, 4, 31)]
  steps = idle.training_phase(samples, 0, 2, final=idle.rate_lines_before_evaluation(LOG))
  assert steps["wall_seconds"] == 10 and round(steps["process_percent"]) == 200
  everything = idle.training_phase(samples, 0, 2)
  assert everything["wall_seconds"] == 21 and round(everything["process_percent"]) == 148


# `perf sched timehist` lines (time at the end of each run, CPU, task, wait, delay, run time in
# ms), two CPUs, process 100 with an XLA thread (101) and an OpenMP worker (102), one other
# process (7): made up so that every figure below can be counted by hand.
TIMEHIST = """           time    cpu  task name                       wait time  sch delay   run time
                        [tid/pid]                          (msec)     (msec)     (msec)
--------------- ------  ------------------------------  ---------  ---------  ---------
     10.010000 [0000]  tf_XLAEigen[101/100]                0.000      0.000     10.000
     10.010000 [0001]  tf_XLAEigen[102/100]                0.000      0.000     10.000
     10.010050 [0001]  <idle>                              0.000      0.000      0.050
     10.013000 [0000]  <idle>                              0.000      0.000      3.000
     10.013000 [0001]  tf_XLAEigen[102/100]                0.000      0.000      2.950
     10.013500 [0001]  <idle>                              0.000      0.000      0.500
     10.020000 [0000]  tf_XLAEigen[101/100]                0.000      0.000      7.000
     10.020000 [0001]  bash[7]                             0.000      0.000      6.500
     10.026000 [0001]  <idle>                              0.000      0.000      6.000
     10.026000 [0000]  tf_XLAEigen[101/100]                0.000      0.000      6.000
"""


def test_idle_periods_are_counted_by_length_by_the_thread_that_slept_and_by_who_ran_alone():
  out = idle.idle_from_timehist(TIMEHIST, pid=100)
  assert out["cpus"] == 2 and abs(out["seconds"] - 0.026) < 1e-9
  assert {k: round(v, 3) for k, v in out["idle_ms_per_cpu"].items()} == {"0": 3.0, "1": 6.55}
  assert abs(out["idle_percent"] - 100 * 9.55 / 52) < 1e-6
  lengths = {r["length"]: (r["periods"], round(r["idle_ms"], 3)) for r in out["by_length"]}
  assert lengths == {"0-0.1 ms": (1, 0.05), "0.1-1 ms": (1, 0.5), "1-5 ms": (1, 3.0),
                     ">= 5 ms": (1, 6.0)}
  before = {r["thread"]: round(r["idle_ms"], 3) for r in out["by_thread_before"]}
  assert before == {"tf_XLAEigen[102/100]": 0.55, "tf_XLAEigen[101/100]": 3.0,
                    "other processes / kernel": 6.0}
  # CPU 0's 3 ms idle (10.010-10.013): the OpenMP worker ran alone on CPU 1 for 2.95 ms of it;
  # CPU 1's 6 ms idle (10.020-10.026): the XLA thread ran alone on CPU 0 throughout.
  alone = {r["thread"]: round(r["ms"], 3) for r in out["alone_during_long_idle"]}
  assert alone == {"tf_XLAEigen[102/100]": 2.95, "tf_XLAEigen[101/100]": 6.0}
  assert idle.idle_from_timehist("no perf output", pid=100) is None
