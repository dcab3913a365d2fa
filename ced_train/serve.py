"""A local tagging page: upload or record audio in the browser, see its top classes and a per-chunk timeline.

    python -m ced_train.serve --checkpoint PATH [--port 7860] [--host 127.0.0.1] [--top-k 5] [--chunk-seconds 1]

Python's own HTTP server and one self-contained page (no scripts, styles or fonts from elsewhere, no analytics): the
page posts the file's bytes to `POST /api/tag`, which decodes them as `tag` does (any format `ced_train.audio`
reads; browser recordings are WebM/Opus, decoded through ffmpeg), scores the whole clip and each chunk, and answers
`{"file", "duration_s", "top": [{"index", "label", "probability"}], "chunks": [{"start_s", "end_s", "labels"}],
"timeline_png": base64}`, or `{"error": one line}` with status 400. The server listens on localhost only unless
`--host` says otherwise.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from ced_train.audio import AUDIO_EXTENSIONS, SAMPLE_RATE, AudioDecodeError, load_audio
from ced_train.tag import load_tagger, tag_waveform, top_classes

MAX_UPLOAD_BYTES = 200 * 1024 * 1024


class Tagger:
    """A loaded model and its class names; `tag(bytes, filename)` → the `/api/tag` answer. Thread-safe (one lock)."""

    def __init__(self, model: torch.nn.Module, names: list[str], top_k: int = 5, chunk_seconds: float = 1.0) -> None:
        self.model, self.names, self.top_k, self.chunk_seconds = model.eval(), names, top_k, chunk_seconds
        self._lock = threading.Lock()

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
        with self._lock, torch.inference_mode():
            clip = self.model(waveform.unsqueeze(0))[0]
            per_chunk = tag_waveform(self.model, waveform, max(1, round(self.chunk_seconds * SAMPLE_RATE)))
        duration_s = waveform.numel() / SAMPLE_RATE
        top = top_classes(clip, self.names, self.top_k)
        chunks = [{"start_s": i * self.chunk_seconds, "end_s": min((i + 1) * self.chunk_seconds, duration_s),
                   "labels": top_classes(row, self.names, self.top_k)} for i, row in enumerate(per_chunk)]
        return {"file": filename, "duration_s": duration_s, "top": top, "chunks": chunks,
                "timeline_png": timeline_png(per_chunk, top, self.chunk_seconds, duration_s)}


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
<html lang="en"><head><meta charset="utf-8"><title>ced-train tagger</title>
<style>
body { font-family: sans-serif; max-width: 52rem; margin: 2rem auto; color: #222; }
#top li { margin: .2rem 0; list-style: none; }
.bar { display: inline-block; height: .8rem; background: #3b7dd8; vertical-align: middle; margin-right: .5rem; }
#error { color: #b00020; }
#timeline { max-width: 100%; margin-top: 1rem; }
</style></head>
<body>
<h1>ced-train tagger</h1>
<p>Model: <code>__CHECKPOINT__</code> (__CLASSES__ classes)</p>
<p><input type="file" id="file" accept="audio/*">
<button id="record">Record</button> <span id="status"></span></p>
<p id="error"></p>
<h2 id="heading" hidden>Top classes of <span id="name"></span></h2>
<ol id="top"></ol>
<img id="timeline" alt="per-chunk timeline" hidden>
<script>
async function send(blob, name) {
  document.getElementById("status").textContent = "tagging " + name + " ...";
  document.getElementById("error").textContent = "";
  const response = await fetch("api/tag", {method: "POST", body: blob, headers: {"X-Filename": name}});
  const result = await response.json();
  document.getElementById("status").textContent = "";
  if (!response.ok) { document.getElementById("error").textContent = result.error; return; }
  document.getElementById("name").textContent = result.file + " (" + result.duration_s.toFixed(2) + " s)";
  document.getElementById("heading").hidden = false;
  const list = document.getElementById("top");
  list.replaceChildren(...result.top.map(entry => {
    const item = document.createElement("li");
    const bar = document.createElement("span");
    bar.className = "bar"; bar.style.width = (12 * entry.probability) + "rem";
    const label = document.createElement("span");
    label.className = "label"; label.textContent = entry.label;
    item.append(bar, entry.probability.toFixed(3) + "  ", label);
    return item;
  }));
  const image = document.getElementById("timeline");
  image.src = "data:image/png;base64," + result.timeline_png; image.hidden = false;
}
document.getElementById("file").addEventListener("change", event => {
  const file = event.target.files[0];
  if (file) send(file, file.name);
});
let recorder = null;
document.getElementById("record").addEventListener("click", async event => {
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
</script>
</body></html>
"""


def make_server(tagger: Tagger, checkpoint: str, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """The page's HTTP server (not yet serving; `port=0` picks a free port: `server.server_address`)."""
    page = (PAGE.replace("__CHECKPOINT__", _html_escape(checkpoint))
            .replace("__CLASSES__", str(len(tagger.names))).encode("utf-8"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in ("/", "/index.html"):
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
                return
            self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")

        def do_POST(self) -> None:
            if self.path != "/api/tag":
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
                return
            length = int(self.headers.get("Content-Length") or 0)
            name = Path(self.headers.get("X-Filename") or "upload").name
            if not 0 < length <= MAX_UPLOAD_BYTES:
                self._json(HTTPStatus.BAD_REQUEST, {"error": f"{name}: expected 1 byte to "
                                                             f"{MAX_UPLOAD_BYTES // 2**20} MiB, got {length}"})
                return
            try:
                result = tagger.tag(self.rfile.read(length), name)
            except AudioDecodeError as error:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
                return
            self._json(HTTPStatus.OK, result)

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

    return ThreadingHTTPServer((host, port), Handler)


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
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="fully unpickle a checkpoint the safe loader refuses (runs code in it: trusted files only)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.chunk_seconds <= 0:
        parser.error("--top-k must be >= 1 and --chunk-seconds > 0")
    loaded = load_tagger(args.checkpoint, args.labels, args.trust_checkpoint)
    if loaded is None:
        return 2
    model, names = loaded
    try:
        server = make_server(Tagger(model, names, args.top_k, args.chunk_seconds), args.checkpoint, args.host,
                             args.port)
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
