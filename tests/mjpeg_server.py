"""A real HTTP MJPEG camera for tests: http.server streaming multipart/x-mixed-replace JPEGs
on 127.0.0.1, as IP cameras do. OpenCV's FFmpeg backend reads it like any http:// stream.

stop() closes the listening socket and every open stream (the camera "goes away");
start() again serves on the same port (the camera comes back); `paused` keeps the streams
open but sends nothing (a camera that hangs).
"""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np


class MjpegServer:
    def __init__(self, level: int = 40, size: tuple[int, int] = (64, 48), fps: float = 20.0) -> None:
        self.level, self.size, self.fps = level, size, fps  # size: (width, height)
        self.port = 0
        self.served = 0  # JPEG parts written, over all connections
        self._running = threading.Event()
        self.paused = threading.Event()  # set: connections stay open and silent (a hung camera)
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def _jpeg(self) -> bytes:
        w, h = self.size
        ok, data = cv2.imencode(".jpg", np.full((h, w, 3), self.level, np.uint8))
        assert ok
        return data.tobytes()

    def start(self) -> "MjpegServer":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                next_t = time.monotonic()
                try:
                    while outer._running.is_set():
                        if outer.paused.is_set():
                            time.sleep(0.02)
                            next_t = time.monotonic()
                            continue
                        data = outer._jpeg()
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(data)).encode() + b"\r\n\r\n" + data + b"\r\n")
                        self.wfile.flush()
                        outer.served += 1
                        next_t += 1.0 / outer.fps
                        time.sleep(max(0.0, next_t - time.monotonic()))
                except (BrokenPipeError, ConnectionResetError):
                    pass
                # Leaving closes the connection: the reader sees the stream end.

        server = None
        for _ in range(50):  # the port may still be held briefly by the last run's sockets
            try:
                server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
                break
            except OSError:
                time.sleep(0.1)
        if server is None:
            raise RuntimeError(f"cannot serve on 127.0.0.1:{self.port}")
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._running.set()
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._running.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def reachable(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0
