"""UART backends, chosen by the form of a console's ``uart`` string."""

from __future__ import annotations

from serialmuxd.backends.base import Backend, BackendSink
from serialmuxd.backends.readmux import ReadMux
from serialmuxd.watch import DirWatcher

__all__ = ["Backend", "BackendSink", "make_backend"]


def make_backend(
    spec: str,
    sink: BackendSink,
    *,
    baud: int = 115200,
    watcher: DirWatcher | None = None,
    reads: ReadMux | None = None,
) -> Backend:
    """Build the backend for ``spec`` (already validated by the config loader).

    Socket links read through ``reads`` when given (see readmux.py).
    """
    if spec.startswith("unix:"):
        from serialmuxd.backends.sockets import UnixSocketBackend

        return UnixSocketBackend(spec, sink, watcher=watcher, reads=reads)
    if spec.startswith("tcp:"):
        from serialmuxd.backends.sockets import TcpBackend

        return TcpBackend(spec, sink, watcher=watcher, reads=reads)
    if spec.startswith("demo:"):
        from serialmuxd.backends.demo import DemoBackend

        return DemoBackend(spec, sink)
    from serialmuxd.backends.serialport import SerialBackend

    return SerialBackend(spec, sink, baud=baud, watcher=watcher)
