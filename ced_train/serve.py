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
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import soxr
import torch

from ced_train.audio import AUDIO_EXTENSIONS, RESAMPLE_QUALITY, SAMPLE_RATE, AudioDecodeError, load_audio
from ced_train.events import Event
from ced_train.streaming import MAX_RATE, MIN_RATE
from ced_train.tag import load_tagger, tag_waveform, top_classes
from ced_train.windowed import HOP_S, WINDOW_S, WindowTagger, tag_blocks

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


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ced-train tagger</title><link rel="icon" href="data:,">
<style>
body { font-family: sans-serif; max-width: 52rem; margin: 2rem auto; color: #222; }
#top li, #live-top li { margin: .2rem 0; list-style: none; }
.bar { display: inline-block; height: .8rem; background: #3b7dd8; vertical-align: middle; margin-right: .5rem; }
#error { color: #b00020; }
#timeline { max-width: 100%; margin-top: 1rem; }
#live-timeline { width: 100%; border: 1px solid #ccc; }
#events li.open, #live-events li.open { font-weight: bold; }
.note { color: #666; font-size: .9rem; }
</style></head>
<body>
<h1>ced-train tagger</h1>
<p>Model: <code>__CHECKPOINT__</code> (__CLASSES__ classes)</p>
<p><input type="file" id="file" accept="audio/*">
<button id="record">Record</button> <button id="listen">Listen</button> <span id="status"></span></p>
<p id="error"></p>
<section id="live" hidden>
<h2>Live <span id="live-time" class="note"></span></h2>
<canvas id="live-timeline" width="800" height="260"></canvas>
<h3>Last window</h3>
<ol id="live-top"></ol>
<h3>Events</h3>
<ul id="live-events"></ul>
</section>
<h2 id="heading" hidden>Top classes of <span id="name"></span></h2>
<ol id="top"></ol>
<img id="timeline" alt="per-chunk timeline" hidden>
<h3 id="events-heading" hidden>Events</h3>
<ul id="events"></ul>
<script>
const $ = id => document.getElementById(id);
const seconds = value => value.toFixed(2) + " s";
function showError(message) { $("error").textContent = message; }
async function postJson(url, body, headers) {
  const response = await fetch(url, {method: "POST", body: body, headers: headers || {}});
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error);
  return answer;
}
function labelled(text, extra) {
  const item = document.createElement("li");
  const label = document.createElement("span");
  label.className = "label"; label.textContent = text;
  item.append(label, extra);
  return item;
}
function eventItem(event) {
  const open = event.offset_s === undefined;
  const item = labelled(event.label, "  " + seconds(event.onset_s) + " \\u2013 " +
                        (open ? "(open)" : seconds(event.offset_s)) + "  score " + event.score.toFixed(3));
  item.className = open ? "open" : "closed";
  return item;
}
function topItems(top, colour) {
  return top.map(entry => {
    const item = labelled(entry.label, "");
    const bar = document.createElement("span");
    bar.className = "bar"; bar.style.width = (12 * entry.probability) + "rem";
    if (colour) bar.style.background = colour(entry.index);
    item.prepend(bar, entry.probability.toFixed(3) + "  ");
    return item;
  });
}

async function send(blob, name) {
  $("status").textContent = "tagging " + name + " ...";
  showError("");
  let result;
  try { result = await postJson("api/tag", blob, {"X-Filename": name}); }
  catch (error) { showError(error.message); return; }
  finally { $("status").textContent = ""; }
  $("name").textContent = result.file + " (" + seconds(result.duration_s) + ")";
  $("heading").hidden = false;
  $("top").replaceChildren(...topItems(result.top));
  const image = $("timeline");
  image.src = "data:image/png;base64," + result.timeline_png; image.hidden = false;
  $("events-heading").hidden = false;
  $("events").replaceChildren(...(result.events.length ? result.events.map(eventItem)
                                                        : [labelled("no events", "")]));
}
$("file").addEventListener("change", event => {
  const file = event.target.files[0];
  if (file) send(file, file.name);
});
let recorder = null;
$("record").addEventListener("click", async event => {
  if (recorder) { recorder.stop(); return; }
  const stream = await navigator.mediaDevices.getUserMedia({audio: true});
  const parts = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = e => parts.push(e.data);
  recorder.onstop = () => {
    stream.getTracks().forEach(track => track.stop());
    recorder = null; event.target.textContent = "Record";
    send(new Blob(parts, {type: "audio/webm"}), "recording.webm");
  };
  recorder.start(); event.target.textContent = "Stop";
});

// Listen mode: an AudioWorklet hands the microphone's samples (mono: the mean over channels) to this page, which
// posts them as float32 at the AudioContext's own rate (the server resamples) about every SEND_S, one request at a
// time so chunks arrive in order; each answer holds the records of the hops the chunk completed.
const SEND_S = 0.3, SPAN_S = 30;
const WORKLET = `
registerProcessor("capture", class extends AudioWorkletProcessor {
  process(inputs) {
    const channels = inputs[0];
    if (channels.length) {
      const mono = new Float32Array(channels[0].length);
      for (const channel of channels)
        for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / channels.length;
      this.port.postMessage(mono, [mono.buffer]);
    }
    return true;
  }
});`;
const PALETTE = ["#3b7dd8", "#d8543b", "#2e9e44", "#9b3bd8", "#d8a23b", "#3bb8d8", "#d83b8f", "#6b6b6b"];
let live = null;

function colourOf(session, index) {
  if (!session.colours.has(index)) session.colours.set(index, PALETTE[session.colours.size % PALETTE.length]);
  return session.colours.get(index);
}
function take(session, count) {
  const chunk = new Float32Array(count);
  let filled = 0;
  while (filled < count) {
    const head = session.pending[0], used = Math.min(head.length, count - filled);
    chunk.set(head.subarray(0, used), filled); filled += used;
    if (used === head.length) session.pending.shift(); else session.pending[0] = head.subarray(used);
  }
  session.pendingSamples -= count;
  return chunk;
}
function showRecords(session, records) {
  for (const record of records) {
    if (record.top.length) {
      session.history.push(record);
      session.now = record.end_s;
      $("live-top").replaceChildren(...topItems(record.top, index => colourOf(session, index)));
    }
    for (const event of record.opened) session.events.set(event.index + "@" + event.onset_s, event);
    for (const event of record.closed) session.events.set(event.index + "@" + event.onset_s, event);
  }
  while (session.history.length && session.history[0].end_s < session.now - SPAN_S - session.window_s)
    session.history.shift();
  $("live-time").textContent = seconds(session.now) + " heard; window " + session.window_s + " s, hop " +
                               session.hop_s + " s";
  const events = [...session.events.values()].reverse();
  $("live-events").replaceChildren(...(events.length ? events.map(eventItem) : [labelled("no events yet", "")]));
  draw(session);
}
function draw(session) {
  const canvas = $("live-timeline"), g = canvas.getContext("2d");
  const width = canvas.width, plotHeight = 170, laneTop = 180, laneHeight = 14;
  const left = Math.max(0, session.now - SPAN_S), x = t => (t - left) / SPAN_S * width;
  const y = p => plotHeight - p * (plotHeight - 10);
  g.fillStyle = "#fff"; g.fillRect(0, 0, width, canvas.height);
  g.strokeStyle = "#ddd"; g.fillStyle = "#888"; g.font = "11px sans-serif"; g.lineWidth = 1;
  for (let t = Math.ceil(left / 5) * 5; t <= left + SPAN_S; t += 5) {
    g.beginPath(); g.moveTo(x(t), 0); g.lineTo(x(t), canvas.height); g.stroke();
    g.fillText(t + " s", x(t) + 2, canvas.height - 3);
  }
  for (const p of [0, 0.5, 1]) {
    g.beginPath(); g.moveTo(0, y(p)); g.lineTo(width, y(p)); g.stroke();
    g.fillText("p " + p, 2, y(p) + (p ? 11 : -2));
  }
  const latest = session.history.length ? session.history[session.history.length - 1].top : [];
  g.lineWidth = 2;
  for (const entry of latest) {
    g.strokeStyle = colourOf(session, entry.index); g.beginPath();
    let drawing = false;
    for (const record of session.history) {
      const hit = record.top.find(other => other.index === entry.index);
      if (!hit) { drawing = false; continue; }
      if (drawing) g.lineTo(x(record.end_s), y(hit.probability));
      else g.moveTo(x(record.end_s), y(hit.probability));
      drawing = true;
    }
    g.stroke();
  }
  const lanes = new Map();
  for (const event of session.events.values()) {
    const end = event.offset_s === undefined ? session.now : event.offset_s;
    if (end < left) continue;
    if (!lanes.has(event.index)) lanes.set(event.index, lanes.size);
    const top = laneTop + lanes.get(event.index) * (laneHeight + 2);
    if (top + laneHeight > canvas.height - 14) continue;
    g.fillStyle = colourOf(session, event.index);
    g.globalAlpha = event.offset_s === undefined ? 1 : 0.5;
    g.fillRect(x(Math.max(left, event.onset_s)), top, Math.max(2, x(end) - x(Math.max(left, event.onset_s))),
               laneHeight);
    g.globalAlpha = 1; g.fillStyle = "#000";
    g.fillText(event.label, x(Math.max(left, event.onset_s)) + 3, top + laneHeight - 3);
  }
}
async function pump(session) {
  if (session.busy) return;
  const minimum = session.stopping ? 1 : Math.round(session.rate * SEND_S);
  if (session.pendingSamples < minimum) {
    if (session.stopping) finish(session);
    return;
  }
  session.busy = true;
  const chunk = take(session, Math.min(session.pendingSamples, session.maxSamples));
  try {
    const answer = await postJson("api/stream/" + session.id, chunk.buffer,
                                  {"X-Sample-Rate": String(session.rate), "Content-Type": "application/octet-stream"});
    showRecords(session, answer.records);
  } catch (error) { fail(session, error); return; }
  session.busy = false;
  pump(session);
}
async function finish(session) {
  session.busy = true;
  try { showRecords(session, (await postJson("api/stream/" + session.id + "/stop")).records); }
  catch (error) { showError(error.message); }
  $("status").textContent = "";
  $("listen").disabled = false;
}
function release(session) {
  if (session.released) return;
  session.released = true;
  session.stream.getTracks().forEach(track => track.stop());
  session.context.close();
}
function fail(session, error) {
  release(session);
  if (live === session) live = null;
  showError(error.message);
  $("listen").textContent = "Listen"; $("listen").disabled = false; $("status").textContent = "";
}
async function startListening() {
  showError("");
  const stream = await navigator.mediaDevices.getUserMedia(
    {audio: {echoCancellation: false, noiseSuppression: false, autoGainControl: false}});
  const context = new AudioContext();
  const session = {stream, context, rate: context.sampleRate, pending: [], pendingSamples: 0, busy: false,
                   stopping: false, history: [], events: new Map(), colours: new Map(), now: 0};
  try {
    const url = URL.createObjectURL(new Blob([WORKLET], {type: "text/javascript"}));
    await context.audioWorklet.addModule(url);
    URL.revokeObjectURL(url);
    const started = await postJson("api/stream");
    Object.assign(session, {id: started.session, window_s: started.window_s, hop_s: started.hop_s,
                            maxSamples: Math.floor(started.max_chunk_bytes / 4)});
  } catch (error) { release(session); throw error; }
  const node = new AudioWorkletNode(context, "capture");
  node.port.onmessage = message => {
    if (session.stopping) return;
    session.pending.push(message.data); session.pendingSamples += message.data.length;
    pump(session);
  };
  context.createMediaStreamSource(stream).connect(node);
  node.connect(context.destination);  // the graph pulls only what reaches the output; the node's output is silent
  await context.resume();
  $("live").hidden = false; $("live-events").replaceChildren(); $("live-top").replaceChildren();
  $("status").textContent = "listening at " + session.rate + " Hz";
  showRecords(session, []);
  return session;
}
$("listen").addEventListener("click", async event => {
  const button = event.target;
  if (live) {
    const session = live;
    live = null; session.stopping = true; release(session);
    button.textContent = "Listen"; button.disabled = true; $("status").textContent = "stopping ...";
    pump(session);
    return;
  }
  button.disabled = true;
  try { live = await startListening(); button.textContent = "Stop"; }
  catch (error) { showError(error.message || String(error)); }
  finally { button.disabled = false; }
});
</script>
</body></html>
"""


def make_server(tagger: Tagger, checkpoint: str, host: str = "127.0.0.1", port: int = 7860,
                max_streams: int = MAX_STREAMS, stream_idle_s: float = STREAM_IDLE_S) -> ThreadingHTTPServer:
    """The page's HTTP server (not yet serving; `port=0` picks a free port: `server.server_address`); its stream
    sessions are `server.streams`."""
    page = (PAGE.replace("__CHECKPOINT__", _html_escape(checkpoint))
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
