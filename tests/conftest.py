"""Test-suite set-up: 4 fake CPU devices so the sharded paths run on any machine, the
`tiny_dataset` fixture the trainer's test modules share (tests/train_helpers.py), and no silent
skips in CI.

In CI (`CI` set: .ci/run installs every extra and system package the suite needs) a skipped
test, or a test module skipped at collection, FAILS the run, unless it is on CI_ALLOWED_SKIPS
below with the reason it cannot run there. Elsewhere a skip stays a skip; `-rs` (pyproject's
addopts) prints each one's reason in the summary.
"""

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
# Many tests compile the same tiny models; a persistent cache shares them across tests (and
# the subprocesses the CLI tests start), which on 2 CPU cores saves minutes.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), "bonejax-test-jax-cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

# `--dtype=auto` (predict.py's and the napari widget's default) is bf16 on CPUs with bf16 units;
# the suite's references are float32, so auto means float32 here (and in the subprocesses).
# tests/test_dtype_auto.py tests the detection itself.
os.environ.setdefault("BONEJAX_AUTO_DTYPE", "float32")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


# (node id prefix, text in the skip reason): skips CI accepts. Each entry says why.
CI_ALLOWED_SKIPS = (
    # The read-only-directory check cannot be made as root (root writes anywhere), and CI
    # containers run as root; the same refusal is tested without privileges by the test before
    # it (test_unwritable_output_directory_fails_up_front, permission checks monkeypatched).
    ("tests/test_cli.py::test_read_only_directory_is_refused", "root may write anywhere"),
)


def _skip_reason(report) -> str:
  longrepr = report.longrepr
  if isinstance(longrepr, tuple) and len(longrepr) == 3:
    return str(longrepr[2])
  return str(longrepr)


def ci_allows_skip(nodeid: str, reason: str) -> bool:
  return any(nodeid.startswith(prefix) and text in reason for prefix, text in CI_ALLOWED_SKIPS)


_CI_MESSAGE = ("A skip in CI is a broken install: fix .ci/run, or add the test to "
               "CI_ALLOWED_SKIPS in tests/conftest.py with the reason it cannot run.")
_SKIPPED_MODULES: list[str] = []  # collection-time skips seen in CI, failed at the end


def _skip_in_ci(report) -> str | None:
  """The reason when `report` is a skip CI must not accept, else None."""
  if not (os.environ.get("CI") and report.skipped) or hasattr(report, "wasxfail"):
    return None
  reason = _skip_reason(report)
  return None if ci_allows_skip(report.nodeid, reason) else reason


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  reason = _skip_in_ci(report)
  if reason is not None:
    report.outcome = "failed"
    report.longrepr = f"skipped in CI (CI is set): {reason}\n{_CI_MESSAGE}"


def pytest_collectreport(report):
  # A module that skips itself at import (importorskip, allow_module_level). Kept a skip during
  # collection (a collection error would stop every other test) and failed at the end. This
  # hook (not the collector's own) runs in the controlling process under pytest-xdist too,
  # whose workers send it their skipped collections.
  reason = _skip_in_ci(report)
  line = f"{report.nodeid}: {reason}"
  if reason is not None and line not in _SKIPPED_MODULES:
    _SKIPPED_MODULES.append(line)


def pytest_terminal_summary(terminalreporter):
  if _SKIPPED_MODULES:
    terminalreporter.section("test modules skipped in CI (CI is set)", red=True)
    for line in _SKIPPED_MODULES:
      terminalreporter.write_line(line)
    terminalreporter.write_line(_CI_MESSAGE)


def pytest_sessionfinish(session, exitstatus):
  if _SKIPPED_MODULES and exitstatus == pytest.ExitCode.OK:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
  """3 phantom scans of 32 x 48 x 48, made once per test module that trains on them."""
  import train_helpers  # tests/ is on sys.path (pytest puts it there for this conftest)
  return train_helpers.phantom_dataset(tmp_path_factory)
