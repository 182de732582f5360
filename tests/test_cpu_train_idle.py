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
