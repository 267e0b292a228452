"""The test session's own environment (tests/conftest.py) cleans up after itself."""

import os
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")

# run the conftest as a session would, fork a child that exits normally (as mutmut's per-mutant
# children may), then report whether the cache folder outlived the child and the parent
_SESSION = f"""
import os, runpy, sys
runpy.run_path({str(CONFTEST)!r})
cache = os.environ["ORCHESTRATE_CACHE_DIR"]
open(os.path.join(cache, "features.npy"), "w").close()
pid = os.fork()
if pid == 0:
    sys.exit(0)                      # runs the child's atexit handlers
os.waitpid(pid, 0)
print(cache, os.path.isdir(cache))
"""


def test_the_sessions_cache_folder_is_removed_when_the_session_ends_and_not_by_a_forked_child(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRATE_CACHE_DIR"} | {"TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _SESSION], env=env, capture_output=True, text=True, check=True)
    cache, alive_after_child = out.stdout.split()
    assert Path(cache).parent == tmp_path
    assert alive_after_child == "True"
    assert not Path(cache).exists()
    assert list(tmp_path.iterdir()) == []


def test_a_cache_folder_given_by_the_caller_is_used_and_kept(tmp_path):
    env = {**os.environ, "ORCHESTRATE_CACHE_DIR": str(tmp_path / "mine"), "TMPDIR": str(tmp_path)}
    (tmp_path / "mine").mkdir()
    out = subprocess.run([sys.executable, "-c", _SESSION], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(tmp_path / "mine"), "True"]
    assert (tmp_path / "mine" / "features.npy").exists()
