"""A real ``yaie serve`` in a subprocess, started once per test module, for the server tests.

A module chooses how its server runs with two module-level names:

* ``SERVER_ARGS``: extra ``yaie serve`` arguments (context length, queue bound, API key, ...);
* ``SERVER_SCRIPT``: a Python file to run instead of ``yaie``'s entry point, given the same
  arguments (``fault_server.py`` injects a fault into the model executor).

The server loads the default model (the offline GGUF that ``tests/conftest.py`` fetched into the
test cache) on a free loopback port; the fixture waits for ``/health`` and stops it at the end
of the module. Its log is printed if it fails to start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import Server, free_port, stop_process, wait_healthy

STARTUP_TIMEOUT_S = 600  # loading the model on a busy 2-core CI box


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, smollm2, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    args = [str(a) for a in getattr(request.module, "SERVER_ARGS", [])]
    script = getattr(request.module, "SERVER_SCRIPT", None)
    api_key = args[args.index("--api-key") + 1] if "--api-key" in args else None
    port = free_port()
    entry = (
        [str(Path(request.module.__file__).parent / script)]
        if script
        else ["-m", "yaie.cli", "serve"]
    )
    command = [sys.executable, *entry, "--port", str(port), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", YAIE_API_KEY="")  # the fallback GGUF, no stray key
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log_path, STARTUP_TIMEOUT_S)
        yield Server(url, api_key)
    finally:
        stop_process(process, timeout_s=30)
