"""Test-wide environment: caches in a per-session temp dir, headless plots, no stray cluster."""

import os
import tempfile

os.environ.setdefault("ORCHESTRATE_CACHE_DIR", tempfile.mkdtemp(prefix="orchestrate-test-cache-"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.pop("RAY_ADDRESS", None)
