"""A persistent ggml thread pool for one llama.cpp context.

Without one, ggml starts and joins new worker threads at every `llama_decode`. The kernel
places each new thread wherever it sees room at that instant; beside a busy event loop (one
token's HTTP chunk is being sent while the next step starts) a worker can land on the core of
the thread that waits for it, and the two then take turns at every barrier of the graph until
the kernel moves one: single streams were seen decoding at 30-55 tok/s instead of 80 for
seconds at a time on the 2-core development machine. A pool made once keeps its workers (and
their caches) between steps, as llama.cpp's own server does, and the issue asks for exactly
this: pick "llama.cpp's thread-pool polling so that they do not spin against a neighbour".

Between steps a worker may poll for the next graph for a while (`engine_settings.poll`, 0-100)
before it sleeps. llama.cpp's server polls at 50, which spins a worker for up to a few hundred
milliseconds after the last step: on the 2-core development machine a neighbour that started
then (another model, another server, the next request of a benchmark taking turns) lost a
sixth of its decode rate and saw TTFT p95 near 200 ms. At 0 (Tiffin's default) a worker sleeps
at once and is woken for the next step, which measured no slower for a running stream.

llama-cpp-python binds neither `ggml_threadpool_new` nor `llama_attach_threadpool`: they are
declared here with ctypes, from ggml.h / ggml-cpu.h / llama.h of the same release.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

MAX_THREADS = 512  # GGML_MAX_N_THREADS


class _Params(ctypes.Structure):
    """struct ggml_threadpool_params (ggml.h)."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * MAX_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


class ThreadPool:
    """`ThreadPool(context, threads)` attaches a pool of up to `threads` threads (the calling
    thread is one of them) to the context, for decoding and prompts alike; `close()` detaches
    and frees it. `llama_set_n_threads` still picks how many of them each step uses."""

    def __init__(self, context: Any, threads: int, poll: int) -> None:
        import llama_cpp

        self._context = context
        # Every symbol is looked up before the pool starts: a build without one leaks nothing.
        self._llama = llama_cpp.llama_cpp._lib
        self._llama.llama_attach_threadpool.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self._llama.llama_attach_threadpool.restype = None
        self._llama.llama_detach_threadpool.argtypes = [ctypes.c_void_p]
        self._llama.llama_detach_threadpool.restype = None
        base, self._ggml = _ggml_libraries()
        params = _Params()
        base.ggml_threadpool_params_init(ctypes.byref(params), threads)
        params.poll = poll
        self._pool = self._ggml.ggml_threadpool_new(ctypes.byref(params))
        if not self._pool:
            raise RuntimeError(f"ggml could not start a pool of {threads} threads")
        self._llama.llama_attach_threadpool(context, self._pool, self._pool)

    def close(self) -> None:
        if self._pool:
            self._llama.llama_detach_threadpool(self._context)
            self._ggml.ggml_threadpool_free(self._pool)
            self._pool = None


def _ggml_libraries() -> tuple[Any, Any]:
    """libggml-cpu and libggml-base as llama-cpp-python loaded them. Its wheel ships each
    library twice (`libggml-cpu.so` and `libggml-cpu.so.0` are two files), and a second copy
    would have its own, uninitialised, global tables: the pool must come from the one that
    computes."""
    base: Any = ctypes.CDLL(_loaded("libggml-base.so"))
    cpu: Any = ctypes.CDLL(_loaded("libggml-cpu.so"))
    base.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(_Params), ctypes.c_int]
    base.ggml_threadpool_params_init.restype = None
    cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(_Params)]
    cpu.ggml_threadpool_new.restype = ctypes.c_void_p
    cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
    cpu.ggml_threadpool_free.restype = None
    return base, cpu


def _loaded(name: str) -> str:
    """The path under which `name` (or `name`.N) is mapped into this process, loading
    llama-cpp-python's libraries first; its own `lib/` copy where /proc cannot be read."""
    import llama_cpp

    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.split()[-1]
                if Path(path).name.startswith(name):
                    return path
    except OSError:
        pass
    return str(Path(llama_cpp.__file__).parent / "lib" / name)
