"""`dtrpo.teardown.end_process`: a rank of a multi-process launch ends without the interpreter's finalization (which
can abort a gloo rank after its work is done), having done what a normal exit does first; any other process exits
as `sys.exit` does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_trainer import free_port

ROOT = Path(__file__).parents[1]

EXITING = """
import atexit, sys, threading, time
import torch  # noqa: F401 - a process that loaded torch, as a rank of a launch has
from dtrpo.teardown import end_process

atexit.register(lambda: print("atexit ran", flush=True))
late = threading.Thread(target=lambda: (time.sleep(0.3), print("thread joined")))
late.start()
print("buffered", end="")
end_process(sys.argv[1] if not sys.argv[1].isdigit() else int(sys.argv[1]))
"""


def ending(code: str, world: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": world, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", EXITING, code], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("world", ["2", "1"])
def test_end_process_exits_as_a_normal_exit_would(world):
    """Under a 2-process launch (`os._exit` after the exit work) and in one process (`sys.exit`) alike: the exit
    code, the message of a string code, atexit handlers run, Python threads joined, buffered output flushed."""
    done = ending("3", world)
    assert done.returncode == 3
    assert done.stdout.splitlines() == ["bufferedthread joined", "atexit ran"]
    done = ending("error: no such file", world)
    assert done.returncode == 1 and done.stderr.strip().endswith("error: no such file")
    assert "atexit ran" in done.stdout


WORKER = """
import torch, torch.distributed as dist
from dtrpo.teardown import end_process

dist.init_process_group("gloo")
group = dist.new_group([0, 1])  # a group something else still holds, as DeepSpeed and FSDP hold theirs
t = torch.ones(3)
dist.all_reduce(t)
dist.all_reduce(t, group=group)
end_process(0)
"""


@pytest.mark.slow
def test_gloo_ranks_that_end_with_end_process_never_abort(tmp_path):
    """A collective right before the end is the case that aborts: without `end_process` a rank aborted in 12 of
    25 such launches here (torch 2.13, 2 cores); with it, none of 15 may."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for launch in range(15):
        port = str(free_port())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
        done = subprocess.run([*cmd, str(script)], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, f"launch {launch}: {done.stderr[-1500:]}"
        assert "terminate called" not in done.stderr
