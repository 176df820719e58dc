"""Helpers for tests of the search service: ``offset serve``'s server in a thread on a free loopback port, and one
metric read from a Prometheus text page."""
from __future__ import annotations

import time


class serve_in_thread:
    """Context manager: ``offset serve``'s uvicorn server (``offset_cir.search.service.make_server``) for ``app``
    on 127.0.0.1 and a free port, in a daemon thread; yields the base URL. Bounded waits to start and to stop."""

    def __init__(self, app, **options):
        self.app = app
        self.options = {"configure_logging": False, "log_level": "info", **options}

    def __enter__(self):
        import socket
        import threading

        from offset_cir.search.service import make_server

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))  # loopback only, a port chosen by the OS
        self.port = self.sock.getsockname()[1]
        self.server = make_server(self.app, host="127.0.0.1", port=self.port, **self.options)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(400):  # at most ~20 s
            if self.server.started or not self.thread.is_alive():
                break
            time.sleep(0.05)
        if not self.server.started:
            self.__exit__(None, None, None)
            raise RuntimeError("uvicorn did not start")
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        return False


def metric_value(text: str, name: str, **labels) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``, in a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
