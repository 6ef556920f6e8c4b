"""Configured input sources, read with OpenCV, whose answers are published as `Result` messages.

A source URI is one of:

* an integer (``0``) or a ``/dev/video*`` path: a camera (live);
* ``rtsp://``, ``rtsps://``, ``http://``, ``https://``, ``udp://``, ``tcp://``: a network stream (live);
* an existing folder: the images in it (``.jpg .jpeg .png .bmp``), in name order, once;
* anything else: a video file, played once.

A live source that drops (or cannot be opened) is reported (``source-lost``) and reopened with
exponential back-off between `reconnect_min_s` and `reconnect_max_s`; each successful open is reported
(``source-connected``). An optional frame-rate cap limits how many frames are served: live sources skip
the frames in between (``grab`` without decoding), files and folders are paced.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np

from edge_agent.config import SourceConfig
from edge_agent.errors import EdgeAgentError
from edge_agent.protocol.messages import BundleRef, Result
from edge_agent.runtime.errors import OverloadedError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
LIVE_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "tcp://")
#: Image files bigger than this in a folder source are skipped (and counted as errors).
MAX_IMAGE_FILE_BYTES = 64 * 1024 * 1024
#: Open/read timeouts handed to OpenCV's FFmpeg backend for network streams.
STREAM_TIMEOUT_MS = 5000
EmitFn = Callable[[str, str, Dict[str, Any]], None]


def redact(uri: str) -> str:
    """The URI without credentials (``rtsp://user:pass@host`` -> ``rtsp://***@host``)."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@]*@", r"\1***@", uri, flags=re.I)


def source_kind(uri: str) -> str:
    """``camera``, ``stream``, ``folder`` or ``file``."""
    if uri.isdigit() or uri.startswith("/dev/video"):
        return "camera"
    if uri.lower().startswith(LIVE_SCHEMES):
        return "stream"
    if Path(uri).is_dir():
        return "folder"
    return "file"


def _default_device_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64].lstrip("-_.")
    return name or "edge-device"


class SourceRunner:
    """Reads one source in a thread, serves each frame through the active service, publishes results."""

    def __init__(self, cfg: SourceConfig, *, get_service: Callable[[], Any], publish: Callable[[Result], None],
                 device_id: Optional[str] = None, emit: Optional[EmitFn] = None,
                 reconnect_min_s: Optional[float] = None, reconnect_max_s: Optional[float] = None,
                 infer_timeout_s: Optional[float] = None) -> None:
        self.cfg = cfg
        self.get_service = get_service
        self.publish = publish
        self.device_id = device_id or _default_device_id()
        self.emit = emit
        self.reconnect_min_s = cfg.reconnect_min_s if reconnect_min_s is None else reconnect_min_s
        self.reconnect_max_s = max(cfg.reconnect_max_s if reconnect_max_s is None else reconnect_max_s,
                                   self.reconnect_min_s)
        self.infer_timeout_s = infer_timeout_s
        self.kind = source_kind(cfg.uri)
        self.live = self.kind in ("camera", "stream")
        self._stop = threading.Event()
        self.done = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.stats = {"frames": 0, "published": 0, "errors": 0, "overloaded": 0, "no_model": 0, "reconnects": 0,
                      "open_failures": 0}
        self._frame_index = 0

    # ---------------------------------------------------------------------------------------- control
    def start(self) -> None:
        """Start reading in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="source-%s" % self.cfg.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop reading; returns when the thread ended (or after `timeout_s`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _event(self, kind: str, message: str, **data: Any) -> None:
        data.update({"source": self.cfg.name, "uri": redact(self.cfg.uri), "kind": self.kind})
        if self.emit is None:
            return
        try:
            self.emit(kind, message, data)
        except Exception:  # a broken event sink must not stop the source
            log.exception("source %s: event callback failed", self.cfg.name)

    # ------------------------------------------------------------------------------------------- loop
    def _run(self) -> None:
        backoff = self.reconnect_min_s
        try:
            while not self._stop.is_set():
                frames = self._open()
                if frames is None:
                    self._count("open_failures")
                    self._event("source-lost", "source %s cannot be opened; retrying in %.1f s"
                                % (self.cfg.name, backoff), retry_in_s=backoff)
                    if self._stop.wait(backoff):
                        break
                    backoff = min(backoff * 2, self.reconnect_max_s)
                    continue
                self._event("source-connected", "source %s is open" % self.cfg.name,
                            reconnects=self.stats["reconnects"])
                got_any = self._pump(frames)
                if self._stop.is_set():
                    break
                if not self.live:
                    break  # a file or folder played to the end
                if got_any:
                    backoff = self.reconnect_min_s
                self._count("reconnects")
                self._event("source-lost", "source %s dropped; reconnecting in %.1f s" % (self.cfg.name, backoff),
                            retry_in_s=backoff)
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, self.reconnect_max_s)
        finally:
            self.done.set()

    def _open(self) -> Optional[Iterator[Tuple[Optional[np.ndarray], Optional[bytes], str]]]:
        if self.kind == "folder":
            return self._folder_frames()
        cap = self._open_capture()
        if cap is None:
            return None
        return self._capture_frames(cap)

    def _open_capture(self) -> Any:
        try:
            import cv2
        except ImportError:
            self._event("error", "source %s needs OpenCV (pip install opencv-python-headless)" % self.cfg.name)
            self._stop.set()
            return None

        uri = self.cfg.uri
        target: Any = int(uri) if uri.isdigit() else uri
        try:
            if self.kind == "stream" and hasattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC"):
                cap = cv2.VideoCapture(target, cv2.CAP_FFMPEG, [
                    cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
                    cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
                ])
            else:
                cap = cv2.VideoCapture(target)
        except cv2.error as e:
            log.warning("source %s: OpenCV cannot open %s: %s", self.cfg.name, redact(uri), e)
            return None
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def _capture_frames(self, cap: Any) -> Iterator[Tuple[Optional[np.ndarray], Optional[bytes], str]]:
        interval = 1.0 / self.cfg.max_fps if self.cfg.max_fps else 0.0
        next_due = time.monotonic()
        try:
            while not self._stop.is_set():
                if self.live and interval and time.monotonic() < next_due:
                    if not cap.grab():  # skip a frame without decoding it
                        return
                    continue
                ok, frame = cap.read()
                if not ok or frame is None:
                    return
                yield frame, None, ""
                next_due = max(next_due + interval, time.monotonic()) if interval else next_due
                if not self.live and interval:
                    self._stop.wait(max(0.0, next_due - time.monotonic()))
        finally:
            cap.release()

    def _folder_frames(self) -> Iterator[Tuple[Optional[np.ndarray], Optional[bytes], str]]:
        interval = 1.0 / self.cfg.max_fps if self.cfg.max_fps else 0.0
        try:
            files = sorted(
                p for p in Path(self.cfg.uri).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
        except OSError as e:
            log.warning("source %s: cannot list %s: %s", self.cfg.name, self.cfg.uri, e)
            return
        for p in files:
            if self._stop.is_set():
                return
            t0 = time.monotonic()
            try:
                if p.stat().st_size > MAX_IMAGE_FILE_BYTES:
                    raise OSError("file is over %d bytes" % MAX_IMAGE_FILE_BYTES)
                data = p.read_bytes()
            except OSError as e:
                log.warning("source %s: skipping %s: %s", self.cfg.name, p.name, e)
                self._count("errors")
                continue
            yield None, data, p.name
            if interval:
                self._stop.wait(max(0.0, interval - (time.monotonic() - t0)))

    def _pump(self, frames: Iterator[Tuple[Optional[np.ndarray], Optional[bytes], str]]) -> bool:
        got_any = False
        for frame, data, name in frames:
            got_any = True
            index = self._frame_index
            self._frame_index += 1
            self._count("frames")
            self._serve(index, frame, data, name)
            if self._stop.is_set():
                break
        return got_any

    def _serve(self, index: int, frame: Optional[np.ndarray], data: Optional[bytes], name: str) -> None:
        svc = self.get_service()
        if svc is None:
            self._count("no_model")
            return
        try:
            if frame is not None:
                res = svc.infer_frame(frame, timeout_s=self.infer_timeout_s)
            else:
                assert data is not None
                res = svc.infer_image(data, timeout_s=self.infer_timeout_s)
        except OverloadedError:
            self._count("overloaded")
            return
        except EdgeAgentError as e:
            self._count("errors")
            log.warning("source %s frame %d: %s", self.cfg.name, index, e)
            return
        if not self.cfg.publish_results:
            return
        output = dict(res.output)
        if name:
            output["file"] = name
        try:
            answered_by = (getattr(res, "extra", None) or {}).get("bundle") or svc.bundle  # A/B: the candidate's
            msg = Result(
                device_id=self.device_id, ts=time.time(), source=self.cfg.name, frame=index, route=res.route,
                latency_ms=res.latency_ms, bundle=BundleRef(**answered_by), output=output,
            )
            self.publish(msg)
        except Exception:  # the publisher's trouble is logged, the source goes on
            self._count("errors")
            log.exception("source %s: publishing frame %d failed", self.cfg.name, index)
            return
        self._count("published")
