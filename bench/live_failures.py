"""A pytest plugin for GPU sessions: each failing test's report goes to the file ``$LIVE_FAILURES`` as it
happens, so a run stopped at its time limit still leaves every failure seen so far (pytest prints its
summary only at the end). ``PYTHONPATH=bench pytest -p live_failures ...``"""

import os


def pytest_runtest_logreport(report):
    path = os.environ.get("LIVE_FAILURES")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n\n")
