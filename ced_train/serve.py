"""A local tagging page: upload or record audio, or listen to the microphone live, and see top classes and events.

    python -m ced_train.serve --checkpoint PATH [--port 7860] [--host 127.0.0.1] [--top-k 5] [--chunk-seconds 1]
                              [--window-s 2] [--hop-s 0.5]

Python's own HTTP server and one self-contained page (no scripts, styles or fonts from elsewhere, no analytics). The
server listens on localhost only unless `--host` says otherwise. Every answer is JSON; a refused request is
`{"error": one line}` with status 400 (503 when all stream sessions are taken).

`POST /api/tag` (body: a file's bytes, `X-Filename`): decoded as `tag` decodes (any format `ced_train.audio` reads;
browser recordings are WebM/Opus, through ffmpeg), the whole clip and each chunk scored → `{"file", "duration_s",
"top": [{"index", "label", "probability"}], "chunks": [{"start_s", "end_s", "labels"}], "timeline_png": base64,
"events": [{"label", "index", "onset_s", "offset_s", "score"}]}`; the events are `WindowTagger`'s over the clip.

Listen mode streams the microphone through `ced_train.windowed.WindowTagger`, one session per listening tab:
`POST /api/stream` → `{"session", "window_s", "hop_s", "top_k", "max_chunk_bytes", "idle_s"}`; then
`POST /api/stream/<session>` (body: mono float32 little-endian samples, `X-Sample-Rate: <Hz>`, the same in every
chunk) → `{"records": [...], "seconds"}`, the records (`ced_train.windowed`) of the hops the chunk completed; and
`POST /api/stream/<session>/stop` → `{"records", "seconds", "events"}`, the last records (the final one closes the
open events) and every event of the session. Each session resamples with its own soxr stream, as
`ced_train.streaming` does; at most `max_streams` sessions at a time, and one idle for `stream_idle_s` ends (an
abandoned tab holds nothing).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import resources
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import soxr
import torch

from ced_train.audio import AUDIO_EXTENSIONS, RESAMPLE_QUALITY, SAMPLE_RATE, AudioDecodeError, load_audio
from ced_train.events import Event
from ced_train.streaming import MAX_RATE, MIN_RATE
from ced_train.tag import load_tagger, tag_waveform
from ced_train.windowed import HOP_S, WINDOW_S, WindowTagger, tag_blocks, top_classes

MAX_UPLOAD_BYTES = 200 * 1024 * 1024
MAX_CHUNK_BYTES = 2 * 1024 * 1024  # one stream chunk: 10.9 s of float32 at 48 kHz (the page sends about 0.3 s)
RATE_HEADER = "X-Sample-Rate"
MAX_STREAMS, STREAM_IDLE_S = 4, 30.0
STREAM_PATH = re.compile(r"/api/stream/(?P<session>[^/]+)(?P<stop>/stop)?")


class Tagger:
    """A loaded model and its class names; `tag(bytes, filename)` → the `/api/tag` answer. Thread-safe: `lock` is
    held around every model call (uploads and stream sessions alike)."""

    def __init__(self, model: torch.nn.Module, names: list[str], top_k: int = 5, chunk_seconds: float = 1.0,
                 window_s: float = WINDOW_S, hop_s: float = HOP_S) -> None:
        self.model, self.names, self.top_k, self.chunk_seconds = model.eval(), names, top_k, chunk_seconds
        self.window_s, self.hop_s = window_s, hop_s
        self.window_tagger()  # refuses a hop longer than the window here, not at the first request
        self.lock = threading.Lock()

    def window_tagger(self) -> WindowTagger:
        """A fresh sliding-window tagger with this page's window, hop and top-k."""
        return WindowTagger(self.model, self.names, self.top_k, self.window_s, self.hop_s)

    def tag(self, data: bytes, filename: str) -> dict:
        suffix = Path(filename).suffix.lower()
        if suffix not in AUDIO_EXTENSIONS:
            raise AudioDecodeError(filename, f"unsupported extension {suffix or '(none)'!r}; known: "
                                             f"{', '.join(sorted(AUDIO_EXTENSIONS))}")
        with tempfile.NamedTemporaryFile(suffix=suffix) as handle:
            handle.write(data)
            handle.flush()
            try:
                waveform = torch.from_numpy(load_audio(handle.name).waveform)
            except AudioDecodeError as error:
                raise AudioDecodeError(filename, error.reason) from None
        if waveform.numel() == 0:
            raise AudioDecodeError(filename, "no audio samples")
        windows = self.window_tagger()
        with self.lock, torch.inference_mode():
            clip = self.model(waveform.unsqueeze(0))[0]
            per_chunk = tag_waveform(self.model, waveform, max(1, round(self.chunk_seconds * SAMPLE_RATE)))
            for _ in tag_blocks(windows, [waveform.numpy()]):
                pass
        duration_s = waveform.numel() / SAMPLE_RATE
        top = top_classes(clip, self.names, self.top_k)
        chunks = [{"start_s": i * self.chunk_seconds, "end_s": min((i + 1) * self.chunk_seconds, duration_s),
                   "labels": top_classes(row, self.names, self.top_k)} for i, row in enumerate(per_chunk)]
        return {"file": filename, "duration_s": duration_s, "top": top, "chunks": chunks,
                "timeline_png": timeline_png(per_chunk, top, self.chunk_seconds, duration_s),
                "events": [event_json(event) for event in windows.events]}


def event_json(event: Event) -> dict:
    """A closed event as the page's answers hold it (times rounded to ms, as `ced_train.windowed` rounds them)."""
    return {"label": event.label, "index": event.index, "onset_s": round(event.onset_s, 3),
            "offset_s": round(event.offset_s, 3), "score": round(event.score, 4)}


class RequestError(Exception):
    """A refused request: `str()` is one line, `status` the HTTP status to answer with."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Session:
    windows: WindowTagger
    last_used_s: float  # time.monotonic()
    rate: int | None = None  # set by the first chunk
    resampler: soxr.ResampleStream | None = None  # None at 16 kHz
    stopped: bool = False


class Streams:
    """The listen mode's sessions: each resamples its chunks to 16 kHz with its own soxr stream and feeds its own
    `WindowTagger`; model calls take `tagger.lock`. At most `max_sessions` at a time; one that receives nothing for
    `idle_s` seconds ends, as does one stopped. Thread-safe."""

    def __init__(self, tagger: Tagger, max_sessions: int = MAX_STREAMS, idle_s: float = STREAM_IDLE_S) -> None:
        self.tagger, self.max_sessions, self.idle_s = tagger, max_sessions, idle_s
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()  # guards the dict; a session's own state is changed under tagger.lock

    def __len__(self) -> int:
        """Sessions open now (expired ones not yet swept included)."""
        with self._lock:
            return len(self._sessions)

    def start(self) -> dict:
        with self._lock:
            self._expire()
            if len(self._sessions) >= self.max_sessions:
                raise RequestError(f"all {self.max_sessions} stream sessions are in use; stop one (or wait "
                                   f"{self.idle_s:g} s for an abandoned one to expire)",
                                   HTTPStatus.SERVICE_UNAVAILABLE)
            session_id = secrets.token_hex(8)
            self._sessions[session_id] = _Session(self.tagger.window_tagger(), time.monotonic())
        tagger = self.tagger
        return {"session": session_id, "window_s": tagger.window_s, "hop_s": tagger.hop_s, "top_k": tagger.top_k,
                "max_chunk_bytes": MAX_CHUNK_BYTES, "idle_s": self.idle_s}

    def push(self, session_id: str, data: bytes, rate_header: str | None) -> dict:
        """Add a chunk (`data`: mono float32 little-endian samples at `rate_header` Hz) → the records of the hops
        it completed."""
        session = self._get(session_id, pop=False)
        rate = _parse_rate(rate_header)
        if len(data) % 4:
            raise RequestError(f"stream chunk of {len(data)} bytes: expected float32 samples (a multiple of 4 "
                               "bytes)")
        samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if not np.isfinite(samples).all():
            raise RequestError("stream chunk holds NaN or infinite samples")
        with self.tagger.lock:
            if session.stopped:
                raise self._unknown(session_id)
            if session.rate is None:
                session.rate = rate
                if rate != SAMPLE_RATE:
                    session.resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32",
                                                            quality=RESAMPLE_QUALITY)
            elif rate != session.rate:
                raise RequestError(f"{RATE_HEADER}: {rate} Hz, but stream session {session_id} started at "
                                   f"{session.rate} Hz")
            block = samples if session.resampler is None else session.resampler.resample_chunk(samples, last=False)
            records = session.windows.push(np.asarray(block, np.float32))
        return {"records": records, "seconds": round(session.windows.seconds, 3)}

    def stop(self, session_id: str) -> dict:
        """End a session → its last records (the final one closes the open events) and all its events."""
        session = self._get(session_id, pop=True)
        with self.tagger.lock:
            if session.stopped:  # expired or stopped by a request that got here first
                raise self._unknown(session_id)
            session.stopped = True
            records = []
            if session.resampler is not None:
                tail = session.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
                records += session.windows.push(np.asarray(tail, np.float32))
            records += session.windows.finish()
        return {"records": records, "seconds": round(session.windows.seconds, 3),
                "events": [event_json(event) for event in session.windows.events]}

    def _get(self, session_id: str, pop: bool) -> _Session:
        with self._lock:
            self._expire()
            session = self._sessions.pop(session_id, None) if pop else self._sessions.get(session_id)
            if session is None:
                raise self._unknown(session_id)
            session.last_used_s = time.monotonic()
            return session

    def _expire(self) -> None:
        now = time.monotonic()
        for session_id, session in list(self._sessions.items()):
            if now - session.last_used_s > self.idle_s:
                session.stopped = True
                del self._sessions[session_id]

    def _unknown(self, session_id: str) -> RequestError:
        return RequestError(f"stream session {session_id[:40]!r} is unknown, stopped or expired (sessions end after "
                            f"{self.idle_s:g} s without a chunk)")


def _parse_rate(header: str | None) -> int:
    if header is None:
        raise RequestError(f"stream chunk without an {RATE_HEADER} header (the samples' rate in Hz)")
    try:
        rate = int(header)
    except ValueError:
        raise RequestError(f"{RATE_HEADER}: expected an integer rate in Hz, got {header[:40]!r}") from None
    if not MIN_RATE <= rate <= MAX_RATE:
        raise RequestError(f"{RATE_HEADER}: {rate} Hz; expected {MIN_RATE} to {MAX_RATE}")
    return rate


def timeline_png(per_chunk: torch.Tensor, top: list[dict], chunk_seconds: float, duration_s: float) -> str:
    """Base64 PNG: probability over time (one step per chunk) of the clip's top classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3), dpi=100)
    starts = [i * chunk_seconds for i in range(per_chunk.shape[0])] + [duration_s]
    for label in top:
        values = per_chunk[:, label["index"]].tolist()
        axis.step(starts, values + values[-1:], where="post", label=label["label"])
    axis.set(xlim=(0, duration_s), ylim=(0, 1), xlabel="time (s)", ylabel="probability")
    axis.legend(loc="upper right", fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# The page (HTML, its style and script in one file); `__CHECKPOINT__` and `__CLASSES__` are filled in per server.
PAGE = resources.files("ced_train").joinpath("resources", "tagging_page.html")


def make_server(tagger: Tagger, checkpoint: str, host: str = "127.0.0.1", port: int = 7860,
                max_streams: int = MAX_STREAMS, stream_idle_s: float = STREAM_IDLE_S) -> ThreadingHTTPServer:
    """The page's HTTP server (not yet serving; `port=0` picks a free port: `server.server_address`); its stream
    sessions are `server.streams`."""
    page = (PAGE.read_text(encoding="utf-8").replace("__CHECKPOINT__", _html_escape(checkpoint))
            .replace("__CLASSES__", str(len(tagger.names))).encode("utf-8"))
    streams = Streams(tagger, max_streams, stream_idle_s)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in ("/", "/index.html"):
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
                return
            self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")

        def do_POST(self) -> None:
            stream = STREAM_PATH.fullmatch(self.path)
            try:
                if self.path == "/api/tag":
                    name = Path(self.headers.get("X-Filename") or "upload").name
                    answer = tagger.tag(self._body(MAX_UPLOAD_BYTES, name), name)
                elif self.path == "/api/stream":
                    answer = streams.start()
                elif stream is not None and stream["stop"]:
                    answer = streams.stop(stream["session"])
                elif stream is not None:
                    answer = streams.push(stream["session"], self._body(MAX_CHUNK_BYTES, "stream chunk"),
                                          self.headers.get(RATE_HEADER))
                else:
                    self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
                    return
            except AudioDecodeError as error:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
                return
            except RequestError as error:
                self._json(error.status, {"error": str(error)})
                return
            self._json(HTTPStatus.OK, answer)

        def _body(self, max_bytes: int, name: str) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= max_bytes:  # refused before reading: a huge body is never held
                limit = f"{max_bytes // 2**20} MiB"
                raise RequestError(f"{name}: expected 1 byte to {limit}, got {length}")
            return self.rfile.read(length)

        def _json(self, status: HTTPStatus, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_request(self, code="-", size="-") -> None:  # a listening page posts ~3 chunks a second: not logged
            match = STREAM_PATH.fullmatch(self.path)
            if not (match and not match["stop"] and str(code) == "200"):
                super().log_request(code, size)

        def log_message(self, format: str, *args) -> None:  # one line per request on stderr, as tag reports errors
            print(f"serve: {self.address_string()} {format % args}", file=sys.stderr)

    server = ThreadingHTTPServer((host, port), Handler)
    server.streams = streams
    return server


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ced_train.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="official CED .pt, state dict, HF-layout directory or ced-train .ckpt")
    parser.add_argument("--labels", default=None, help="label file or shard directory (as for tag)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--chunk-seconds", type=float, default=1.0, help="timeline step in seconds (default 1)")
    parser.add_argument("--window-s", type=float, default=WINDOW_S,
                        help=f"events and listen mode: window length in seconds (default {WINDOW_S})")
    parser.add_argument("--hop-s", type=float, default=HOP_S,
                        help=f"events and listen mode: hop between windows in seconds (default {HOP_S})")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="fully unpickle a checkpoint the safe loader refuses (runs code in it: trusted files only)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.chunk_seconds <= 0:
        parser.error("--top-k must be >= 1 and --chunk-seconds > 0")
    if not 0 < args.hop_s <= args.window_s:
        parser.error(f"need 0 < --hop-s <= --window-s, got --hop-s {args.hop_s}, --window-s {args.window_s}")
    loaded = load_tagger(args.checkpoint, args.labels, args.trust_checkpoint)
    if loaded is None:
        return 2
    model, names = loaded
    try:
        server = make_server(Tagger(model, names, args.top_k, args.chunk_seconds, args.window_s, args.hop_s),
                             args.checkpoint, args.host, args.port)
    except OSError as error:
        print(f"error: cannot listen on {args.host}:{args.port}: {error.strerror}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"serving the tagging page at http://{host}:{port}/ (checkpoint {args.checkpoint}); Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
