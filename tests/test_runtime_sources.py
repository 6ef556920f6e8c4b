"""Sources read with OpenCV: a video file, an image folder, an fps cap, and a live MJPEG stream over HTTP
that drops and comes back (reconnect with bounded back-off, reported)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from edge_agent.config import RuntimeConfig, SourceConfig
from edge_agent.runtime.service import InferenceService
from edge_agent.runtime.sources import SourceRunner, redact, source_kind
from tests._runtime_helpers import digits_manifest, digits_models, load_split

cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    models = digits_models(max_batch=8)
    # Images are 8-bit: pixel/255 in the model's [0, 1] range.
    svc = InferenceService(
        models, digits_manifest(tmp, router={"tau": "0.9"}, preprocessing={"color": "gray", "scale": "0.0039215686"}),
        tmp, RuntimeConfig(max_queue_delay_ms=0),
    )
    yield svc
    svc.close()
    models.close()


@pytest.fixture(scope="module")
def digits():
    x, y = load_split("heldout")
    imgs = [cv2.resize(np.rint(v[0] * 255).astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST) for v in x]
    return imgs, y


class Sink:
    """Collects published results and events."""

    def __init__(self) -> None:
        self.results = []
        self.events = []
        self.lock = threading.Lock()

    def publish(self, r) -> None:
        with self.lock:
            self.results.append(r)

    def emit(self, kind, message, data) -> None:
        with self.lock:
            self.events.append((time.monotonic(), kind, data))

    def kinds(self):
        with self.lock:
            return [k for _, k, _ in self.events]


def _wait(pred, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _write_video(path, frames, fps=25.0):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 64))
    assert w.isOpened()
    for f in frames:
        w.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
    w.release()


def _runner(cfg, service, sink, **kw):
    return SourceRunner(cfg, get_service=lambda: service, publish=sink.publish, device_id="dev-1", emit=sink.emit, **kw)


def test_video_file_is_served_frame_by_frame_and_published(service, digits, tmp_path):
    imgs, y = digits
    _write_video(tmp_path / "clip.avi", imgs[:12])
    sink = Sink()
    r = _runner(SourceConfig(name="clip", uri=str(tmp_path / "clip.avi")), service, sink)
    r.start()
    assert r.done.wait(20)
    assert [m.frame for m in sink.results] == list(range(12))
    assert all(m.source == "clip" and m.device_id == "dev-1" and m.route in ("small", "large") for m in sink.results)
    assert sink.results[0].bundle.name == "digits"
    correct = sum(int(m.output["top"][0]["label"]) == int(y[i]) for i, m in enumerate(sink.results))
    assert correct >= 10  # MJPEG-compressed digits, still recognised
    assert sink.kinds() == ["source-connected"]
    assert r.stats["frames"] == 12 and r.stats["published"] == 12


def test_image_folder_skips_bad_files_and_goes_on(service, digits, tmp_path):
    imgs, y = digits
    for i in range(5):
        cv2.imwrite(str(tmp_path / ("img%02d.png" % i)), imgs[i])
    (tmp_path / "img02b.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("ignored")
    sink = Sink()
    r = _runner(SourceConfig(name="folder", uri=str(tmp_path)), service, sink)
    r.start()
    assert r.done.wait(20)
    assert [m.output["file"] for m in sink.results] == ["img%02d.png" % i for i in range(5)]
    assert [int(m.output["top"][0]["label"]) for m in sink.results] == [int(v) for v in y[:5]]
    assert r.stats["errors"] == 1 and r.stats["frames"] == 6


def test_fps_cap_paces_a_file(service, digits, tmp_path):
    imgs, _ = digits
    _write_video(tmp_path / "clip.avi", imgs[:8])
    sink = Sink()
    r = _runner(SourceConfig(name="capped", uri=str(tmp_path / "clip.avi"), max_fps=20), service, sink)
    t0 = time.monotonic()
    r.start()
    assert r.done.wait(20)
    assert len(sink.results) == 8
    assert time.monotonic() - t0 >= 7 / 20.0 - 0.02


def test_results_are_not_published_when_disabled_and_no_model_is_counted(service, digits, tmp_path):
    imgs, _ = digits
    _write_video(tmp_path / "clip.avi", imgs[:4])
    sink = Sink()
    r = _runner(SourceConfig(name="quiet", uri=str(tmp_path / "clip.avi"), publish_results=False), service, sink)
    r.start()
    assert r.done.wait(20)
    assert sink.results == [] and r.stats["frames"] == 4
    r2 = SourceRunner(SourceConfig(name="nomodel", uri=str(tmp_path / "clip.avi")), get_service=lambda: None,
                      publish=sink.publish, device_id="dev-1")
    r2.start()
    assert r2.done.wait(20)
    assert r2.stats["no_model"] == 4 and sink.results == []


class _MjpegServer:
    """A live MJPEG-over-HTTP camera: `drop()` cuts every stream and refuses new ones, `restore()` undoes it."""

    def __init__(self, frames) -> None:
        self.frames = [cv2.imencode(".jpg", f)[1].tobytes() for f in frames]
        self.up = threading.Event()
        self.up.set()
        self.generation = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if not outer.up.is_set():
                    self.send_error(503)
                    return
                gen = outer.generation
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                while outer.up.is_set() and outer.generation == gen:
                    jpg = outer.frames[i % len(outer.frames)]
                    try:
                        head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                        self.wfile.write(head)
                        self.wfile.write(jpg + b"\r\n")
                        self.wfile.flush()
                    except OSError:
                        return
                    i += 1
                    time.sleep(0.01)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = "http://127.0.0.1:%d/cam.mjpg" % self.server.server_address[1]

    def drop(self) -> None:
        self.up.clear()
        self.generation += 1

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.drop()
        self.server.shutdown()
        self.server.server_close()


def test_dropped_stream_is_reported_and_reconnects_with_bounded_backoff(service, digits):
    imgs, _ = digits
    cam = _MjpegServer(imgs[:10])
    sink = Sink()
    r = _runner(SourceConfig(name="cam", uri=cam.url), service, sink, reconnect_min_s=0.05, reconnect_max_s=0.4)
    assert r.live and r.kind == "stream"
    try:
        r.start()
        _wait(lambda: len(sink.results) >= 10)
        cam.drop()
        _wait(lambda: "source-lost" in sink.kinds())
        lost_at = len(sink.results)
        # down for a while: several failed attempts, back-off capped at 0.4 s
        _wait(lambda: sink.kinds().count("source-lost") >= 4)
        with sink.lock:
            lost_times = [t for t, k, _ in sink.events if k == "source-lost"]
        assert len(lost_times) >= 3
        gaps = np.diff(lost_times)
        assert gaps.max() < 0.4 + 5.0 * 0.2  # capped (plus the time an attempt takes)
        assert len(sink.results) <= lost_at + 1  # nothing served while down
        cam.restore()
        _wait(lambda: sink.kinds().count("source-connected") >= 2)
        _wait(lambda: len(sink.results) >= lost_at + 10)
        assert r.stats["reconnects"] >= 1
        frames = [m.frame for m in sink.results]
        assert frames == sorted(frames) and len(set(frames)) == len(frames)  # numbering continues
    finally:
        r.stop()
        cam.close()
    assert not r._thread.is_alive()


def test_uri_kinds_and_redaction(tmp_path):
    assert source_kind("0") == "camera" and source_kind("/dev/video2") == "camera"
    assert source_kind("rtsp://cam/stream") == "stream"
    assert source_kind(str(tmp_path)) == "folder"
    assert source_kind(str(tmp_path / "clip.mp4")) == "file"
    assert redact("rtsp://admin:secret@10.0.0.5/live") == "rtsp://***@10.0.0.5/live"
    assert redact("rtsp://10.0.0.5/live") == "rtsp://10.0.0.5/live"
