"""The command line's environment defaults (`onnxprune.process_settings`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from onnxprune import process_settings


def test_defaults_fill_only_what_the_environment_lacks():
    env = {"OPENBLAS_THREAD_TIMEOUT": "28"}
    added = process_settings.apply(env, loaded={})
    assert env["OPENBLAS_THREAD_TIMEOUT"] == "28"  # the user's value wins
    assert added == {"NUMPY_MADVISE_HUGEPAGE": "0"}
    assert env["NUMPY_MADVISE_HUGEPAGE"] == "0"


def test_nothing_is_set_once_numpy_is_loaded():
    env: dict[str, str] = {}
    assert process_settings.apply(env, loaded={"numpy": object()}) == {}
    assert env == {}


def test_the_command_line_sets_them_before_numpy_loads():
    """In a fresh process `cli.main` runs first: numpy then loads with huge pages off, and the variables are set
    for OpenBLAS (read when it loads) and for child processes."""
    names = sorted(process_settings.DEFAULTS)
    code = (
        "import os, sys, json\n"
        "from onnxprune import cli\n"
        "assert 'numpy' not in sys.modules\n"
        "cli.main(['--version'])\n"
        "from numpy._core import multiarray\n"
        f"print(json.dumps({{'env': {{k: os.environ.get(k) for k in {names!r}}},"
        " 'huge': multiarray._get_madvise_hugepage()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in process_settings.DEFAULTS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["env"] == dict(process_settings.DEFAULTS)
    assert got["huge"] is False
