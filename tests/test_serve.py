"""The local tagging page (`python -m ced_train.serve`), driven by a real headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs): uploads, and listen mode fed by Chromium's fake microphone."""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from ced_train import serve
from ced_train.audio import RESAMPLE_QUALITY, load_audio
from ced_train.models import load_checkpoint
from ced_train.tag import class_names, load_tagger
from ced_train.windowed import HOP_S, WindowTagger, tag_blocks
from data_prep.synthetic import GENERATORS

FIXTURES = Path(__file__).parent / "fixtures"
DEMO_STUDENT, DEMO_TEACHER = FIXTURES / "demo_student", FIXTURES / "demo_teacher.ckpt"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and "
                                    "chromium-driver (.ci/run installs them)")


@contextlib.contextmanager
def serving(tagger: serve.Tagger, checkpoint: Path, **options):
    """A page server on a free localhost port, serving in a thread: (url, server)."""
    httpd = serve.make_server(tagger, str(checkpoint), port=0, **options)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server():
    model = load_checkpoint(DEMO_STUDENT, pooling="mean")
    tagger = serve.Tagger(model, class_names(model.num_classes, None, str(DEMO_STUDENT)), top_k=3, chunk_seconds=1.0)
    with serving(tagger, DEMO_STUDENT) as (url, _):
        yield url, model, tagger


@pytest.fixture(scope="module")
def teacher():
    """The demo teacher, which detects the synthetic classes (the demo student is weak on isolated events)."""
    model, names = load_tagger(str(DEMO_TEACHER), None, False)
    return serve.Tagger(model, names, top_k=3)


@pytest.fixture(scope="module")
def teacher_server(teacher):
    with serving(teacher, DEMO_TEACHER) as (url, httpd):
        yield url, httpd


def synthetic(parts: list[tuple[str | None, float]], rate: int, seed: int = 0) -> np.ndarray:
    """(class or None for digital silence, seconds) parts, each from `data_prep.synthetic` at peak 0.5, joined."""
    rng, pieces = np.random.default_rng(seed), []
    for name, seconds in parts:
        wave = np.zeros(round(seconds * rate)) if name is None else GENERATORS[name](rng, round(seconds * rate), rate)
        pieces.append(wave if name is None else 0.5 * wave / np.abs(wave).max())
    return np.concatenate(pieces).astype(np.float32)


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """6.5 s at 48 kHz: 1 s of silence, 3 s of Buzz, 2.5 s of Dial tone."""
    return synthetic([(None, 1.0), ("Buzz", 3.0), ("Dial tone", 2.5)], 48000)


@pytest.fixture(scope="module")
def scene_file(scene, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scene") / "scene.flac"
    sf.write(path, scene, 48000)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """3.5 s: a decaying 1 kHz tone burst every 0.5 s over faint noise."""
    rng = np.random.default_rng(0)
    t = np.arange(56000) / 16000
    wave = 0.01 * rng.standard_normal(t.size) + 0.4 * np.sin(2 * np.pi * 1000 * t) * np.exp(-8 * (t % 0.5))
    path = tmp_path_factory.mktemp("clip") / "bursts.flac"
    sf.write(path, wave.astype(np.float32), 16000)
    return path


def post(url: str, data: bytes, name: str) -> tuple[int, dict]:
    return request(url, "api/tag", data, {"X-Filename": name})


def request(url: str, path: str, data: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
    """POST `data` to `url + path` → (status, JSON answer)."""
    message = urllib.request.Request(url + path, data=data, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(message) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def chunk(samples: np.ndarray, url: str, session: str, rate: int | str = 48000) -> tuple[int, dict]:
    return request(url, f"api/stream/{session}", samples.astype("<f4").tobytes(), {"X-Sample-Rate": str(rate)})


def test_api_answers_the_models_own_scores_with_a_timeline(server, clip):
    url, model, _ = server
    status, result = post(url, clip.read_bytes(), clip.name)
    assert status == 200
    waveform = torch.from_numpy(sf.read(clip, dtype="float32")[0])
    with torch.inference_mode():
        expected = model(waveform.unsqueeze(0))[0]
    assert [entry["index"] for entry in result["top"]] == expected.topk(3).indices.tolist()
    np.testing.assert_allclose([entry["probability"] for entry in result["top"]], expected.topk(3).values.numpy(),
                               rtol=0, atol=1e-6)
    assert len(result["chunks"]) == 4 and result["chunks"][-1]["end_s"] == pytest.approx(3.5)
    assert result["timeline_png"].startswith("iVBORw0KGgo")  # base64 of the PNG signature


def test_undecodable_upload_is_a_one_line_error_naming_it(server):
    url, _, _ = server
    status, result = post(url, b"RIFF\x00\x00garbage", "broken.wav")
    assert status == 400 and "broken.wav" in result["error"] and "\n" not in result["error"]
    status, result = post(url, b"hello", "notes.txt")
    assert status == 400 and "notes.txt" in result["error"] and "unsupported extension" in result["error"]


def chromium(tmp_path: Path, *flags: str):
    """A headless Chromium driven by chromedriver, with a fresh profile under `tmp_path`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,900", *flags):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@needs_chromium
def test_a_browser_uploads_a_clip_and_sees_the_top_class_the_timeline_and_the_events(teacher_server, teacher,
                                                                                     scene_file, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = teacher_server
    with torch.inference_mode():
        probs = teacher.model(torch.from_numpy(load_audio(scene_file).waveform)[None])[0]
    expected = teacher.names[int(probs.argmax())]
    driver = chromium(tmp_path)
    try:
        driver.get(url)
        assert "ced-train tagger" in driver.title
        driver.find_element(By.ID, "file").send_keys(str(scene_file))
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#top li .label"))
        labels = [element.text for element in driver.find_elements(By.CSS_SELECTOR, "#top li .label")]
        assert labels[0] == expected and len(labels) == 3
        assert driver.find_element(By.ID, "error").text == ""
        events = [element.text for element in driver.find_elements(By.CSS_SELECTOR, "#events li.closed .label")]
        assert events == ["Buzz", "Dial tone"]
        WebDriverWait(driver, 10).until(
            lambda d: d.execute_script("return document.getElementById('timeline').naturalWidth") > 0)
        screenshot = tmp_path / "serve.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    finally:
        driver.quit()


def test_api_upload_lists_the_events_window_tagger_finds_in_the_decoded_clip(teacher_server, teacher, scene_file):
    url, _ = teacher_server
    status, result = post(url, scene_file.read_bytes(), scene_file.name)
    assert status == 200
    windows = WindowTagger(teacher.model, teacher.names, 3)
    list(tag_blocks(windows, [load_audio(scene_file).waveform]))
    assert result["events"] == [serve.event_json(event) for event in windows.events]
    assert [event["label"] for event in result["events"]] == ["Buzz", "Dial tone"]


def test_a_stream_session_answers_what_window_tagger_finds_in_the_same_audio(teacher_server, teacher, scene):
    url, httpd = teacher_server
    status, started = request(url, "api/stream")
    assert status == 200 and (started["window_s"], started["hop_s"]) == (teacher.window_s, teacher.hop_s)
    records = []
    for start in range(0, len(scene), 14400):  # 0.3 s at 48 kHz
        status, answer = chunk(scene[start : start + 14400], url, started["session"])
        assert status == 200, answer
        records += answer["records"]
    status, stopped = request(url, f"api/stream/{started['session']}/stop")
    assert status == 200 and stopped["seconds"] == pytest.approx(6.5, abs=1e-3)
    records += stopped["records"]

    windows = WindowTagger(teacher.model, teacher.names, 3)
    expected = list(tag_blocks(windows, [soxr.resample(scene, 48000, 16000, quality=RESAMPLE_QUALITY)]))
    assert [record["end_s"] for record in records] == [record["end_s"] for record in expected]
    for got, want in zip(records, expected):
        assert [entry["index"] for entry in got["top"]] == [entry["index"] for entry in want["top"]]
        np.testing.assert_allclose([entry["probability"] for entry in got["top"]],
                                   [entry["probability"] for entry in want["top"]], rtol=0, atol=1e-4)
    events = stopped["events"]
    assert [event["label"] for event in events] == [event.label for event in windows.events] == ["Buzz", "Dial tone"]
    for got, want in zip(events, windows.events):
        assert abs(got["onset_s"] - want.onset_s) <= HOP_S and abs(got["offset_s"] - want.offset_s) <= HOP_S
    closed = [(event["label"], event["onset_s"], event["offset_s"]) for record in records for event in record["closed"]]
    assert closed == [(event["label"], event["onset_s"], event["offset_s"]) for event in events]
    assert len(httpd.streams) == 0


def test_stream_requests_that_cannot_be_read_are_one_line_errors(teacher_server):
    url, _ = teacher_server
    _, started = request(url, "api/stream")
    session, block = started["session"], np.zeros(4800, np.float32)

    def refused(status_and_answer: tuple[int, dict], *words: str) -> None:
        status, answer = status_and_answer
        assert status == 400 and "\n" not in answer["error"], answer
        assert all(word in answer["error"] for word in words), answer

    refused(chunk(block, url, "0123456789abcdef"), "'0123456789abcdef'", "unknown")
    refused(request(url, f"api/stream/{session}", block.tobytes()), "X-Sample-Rate")
    refused(chunk(block, url, session, rate="48k"), "X-Sample-Rate", "'48k'")
    refused(chunk(block, url, session, rate=100), "100 Hz")
    refused(request(url, f"api/stream/{session}", b"\0" * 6, {"X-Sample-Rate": "48000"}), "6 bytes", "multiple of 4")
    refused(chunk(np.array([0.0, np.nan]), url, session), "NaN")
    refused(request(url, f"api/stream/{session}", b"", {"X-Sample-Rate": "48000"}), "got 0")
    connection = http.client.HTTPConnection(*urllib.parse.urlsplit(url).netloc.split(":"))
    connection.putrequest("POST", f"/api/stream/{session}")  # announces a body the server must not wait for
    connection.putheader("Content-Length", str(serve.MAX_CHUNK_BYTES + 4))
    connection.putheader("X-Sample-Rate", "48000")
    connection.endheaders()
    response = connection.getresponse()
    refused((response.status, json.loads(response.read())), str(serve.MAX_CHUNK_BYTES + 4))
    connection.close()
    assert chunk(block, url, session)[0] == 200  # the refusals left the session usable
    refused(chunk(block, url, session, rate=44100), "44100 Hz", "started at 48000 Hz")
    assert request(url, f"api/stream/{session}/stop")[0] == 200


def test_a_stopped_or_expired_stream_session_is_refused_and_sessions_are_bounded(teacher_server, teacher):
    url, _ = teacher_server
    _, started = request(url, "api/stream")
    assert request(url, f"api/stream/{started['session']}/stop")[0] == 200
    for status, answer in (chunk(np.zeros(4800), url, started["session"]),
                           request(url, f"api/stream/{started['session']}/stop")):
        assert status == 400 and "unknown, stopped or expired" in answer["error"]

    with serving(teacher, DEMO_TEACHER, max_streams=1, stream_idle_s=1.0) as (url, httpd):
        _, first = request(url, "api/stream")
        status, answer = request(url, "api/stream")
        assert status == 503 and "all 1 stream sessions are in use" in answer["error"]
        time.sleep(1.2)  # the first session receives nothing for longer than the idle limit
        status, answer = chunk(np.zeros(4800), url, first["session"])
        assert status == 400 and "expired" in answer["error"]
        assert request(url, "api/stream")[0] == 200 and len(httpd.streams) == 1


@needs_chromium
def test_a_browser_listens_to_the_microphone_and_sees_the_class_live_and_its_event(teacher_server, tmp_path):
    """Chromium's fake microphone plays (and loops) a Buzz; listen mode streams it at the AudioContext's rate."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, httpd = teacher_server
    wav = tmp_path / "buzz.wav"
    sf.write(wav, synthetic([("Buzz", 4.0)], 48000, seed=1), 48000, subtype="PCM_16")
    driver = chromium(tmp_path, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                      f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required")

    def labels(selector: str) -> list[str]:
        """The texts of the matching elements, read in one script: the page replaces its lists at every hop, so
        elements found in one call may be gone by the next (a stale element reference)."""
        return driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(element => element.textContent);", selector)

    try:
        driver.get(url)
        listen = driver.find_element(By.ID, "listen")
        listen.click()
        WebDriverWait(driver, 30).until(lambda d: "Buzz" in labels("#live-top li .label")
                                        and "Buzz" in labels("#live-events li .label"))
        assert driver.find_element(By.ID, "error").text == "" and listen.text == "Stop" and len(httpd.streams) == 1
        listen.click()
        WebDriverWait(driver, 10).until(lambda d: listen.text == "Listen" and listen.is_enabled()
                                        and "Buzz" in labels("#live-events li.closed .label"))
        assert driver.find_element(By.ID, "error").text == "" and len(httpd.streams) == 0
        coloured = driver.execute_script("""  // pixels of the curves (above y 175) and of the event bars (below)
            const canvas = document.getElementById('live-timeline'), counts = [0, 0];
            const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            for (let i = 0; i < pixels.length; i += 4) {
              const rgb = [pixels[i], pixels[i + 1], pixels[i + 2]];
              if (Math.max(...rgb) - Math.min(...rgb) > 60) counts[Math.floor(i / 4 / canvas.width) < 175 ? 0 : 1]++;
            }
            return counts;""")
        assert min(coloured) > 100, coloured  # the grid and its labels are grey
        screenshot = tmp_path / "listen.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 20_000
    finally:
        driver.quit()
