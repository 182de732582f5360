"""What every benchmark shares, by concern: the machine it ran on (`machine`), timing and memory
measurements (`timing`), jobs in their own process and the bonejax pieces they time (`jobs`),
tables and result files (`reports`). Everything is re-exported here:

    from benchmarks import common
    times = common.time_calls(step, repeats=5, warmup=2)
    print(common.markdown_table(rows, ["model", "patches/s"]))
    common.write_results("roofline", payload, markdown)   # results/roofline_<machine>.{json,md}

Results go to `benchmarks/results/NAME_<machine>.{json,md}` where <machine> is a short tag
(`cpu-2c`, `nvidia-h100-80gb-hbm3`, ...; override with BONEJAX_MACHINE). Every JSON result
carries `machine` (CPU model, cores, memory, accelerator, library versions) and the load average
at the start and end of the run, so numbers taken on a busy shared machine say so.

Importing this package does not import jax or torch: peer (PyTorch) jobs use it too.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"

if str(REPO) not in sys.path:  # scripts run as `python benchmarks/x.py` import bonejax from here
  sys.path.insert(0, str(REPO))

from bonejax.cli import runner  # noqa: E402  (imports neither jax nor torch)
from bonejax.core import errors  # noqa: E402

from .jobs import (JobFailed, bonejax_forward, bonejax_model, bonejax_train_step,  # noqa: E402
                   dtype_of, last_json_line, run_json, trainer_train_step)
from .machine import (accelerators, datasheet_peak, load_average, machine,  # noqa: E402
                      machine_tag, usable_cores)
from .reports import (fmt, machine_line, markdown_table, result_paths,  # noqa: E402
                      write_results)
from .timing import (jax_peak_device_mb, jax_sync, matmul_peak, median,  # noqa: E402
                     peak_rss_mb, reset_peak_rss, spread, time_calls, xla_flops, xla_memory_mb)

__all__ = [
    "REPO", "RESULTS", "JobFailed", "accelerators", "bonejax_forward", "bonejax_model",
    "bonejax_train_step", "datasheet_peak", "dtype_of", "errors", "runner", "fmt",
    "jax_peak_device_mb", "jax_sync", "last_json_line", "load_average", "machine",
    "machine_line", "machine_tag", "markdown_table", "matmul_peak",
    "median", "peak_rss_mb", "reset_peak_rss", "result_paths", "run_json", "spread",
    "time_calls", "trainer_train_step", "usable_cores", "write_results", "xla_flops",
    "xla_memory_mb",
]
