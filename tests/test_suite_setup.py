"""The test command's own machinery: `--dist loadgroup` must keep an `xdist_group` on one worker.

Module fixtures that train a model or start the peer process are written to run once, on the one worker
that gets their group. pytest 9.2 stores node ids where pytest-xdist 3.8 no longer rewrites them, so the
groups silently fell apart and every such fixture ran once per worker instead of once;
requirements/constraints.txt pins a pytest whose ids xdist can group.
"""
import os

import pytest

pytestmark = pytest.mark.xdist_group("test_suite_setup")


def test_xdist_group_reaches_the_scheduler(request):
  if not os.environ.get("PYTEST_XDIST_WORKER") or request.config.getoption("dist", "no") != "no":
    pytest.skip("only meaningful on an xdist worker")
  if not getattr(request.config.option, "loadgroup", False):
    pytest.skip("not run with --dist loadgroup")
  assert request.node.nodeid.endswith("@test_suite_setup"), (
      f"node id {request.node.nodeid!r} carries no group: --dist loadgroup cannot keep groups together")
