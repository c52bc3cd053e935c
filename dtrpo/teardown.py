"""The end of a process that ran in a gloo process group (a rank of `torchrun` / `accelerate launch`).

Gloo runs each collective on a worker thread of its process group, and that thread drops its last reference to
the operation (and to the tensors it holds) just after waking the caller. When the caller's next step is the
interpreter's exit, the worker can come to that drop only after Python has begun to finalize: it must take the
GIL to release a tensor's Python object, Python ends the thread with a forced unwind, the unwind meets a
`noexcept` C++ frame and the process aborts ("terminate called without an active exception", exit -6), with
all its work done. Measured on this 2-core machine with torch 2.13: a bare `all_reduce` and exit aborted a rank
in 12 of 25 launches. `destroy_process_group` joins the workers of a group only when nothing else holds it, and
DeepSpeed and FSDP keep their groups, so a destroyed group still aborted DeepSpeed ZeRO-3 and FSDP2 ranks after
their final save about once in 30 launches (PyTorch issue 190489).

`end_process` therefore ends such a rank without finalizing the interpreter: it joins Python's own threads,
runs the `atexit` handlers (logging, `weakref.finalize`, temporary files), flushes the output and leaves with
`os._exit`. A process that never joined a multi-process group exits as usual.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def leave_process_group() -> None:
    """After a command that ran distributed, every rank leaves the process group together."""
    if "torch" not in sys.modules:  # a command that never loaded torch started no process group
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def ran_distributed() -> bool:
    """Whether this process is a rank of a multi-process launch that loaded torch (it may hold a process group)."""
    return "torch" in sys.modules and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def end_process(code: int | str | None = 0) -> NoReturn:
    """Leave with `code` as `sys.exit` takes it (None: 0; a string: printed to stderr, exit 1); a rank of a
    multi-process launch leaves without finalizing the interpreter, after what a normal exit would do first."""
    if not ran_distributed():
        sys.exit(code)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # noqa: SLF001 - what the interpreter runs at exit; os._exit skips it
    if isinstance(code, str):
        print(code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0 if code is None else code if isinstance(code, int) else 1)
