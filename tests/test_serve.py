"""The local tagging page (`python -m ced_train.serve`), driven by a real headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs)."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ced_train import serve
from ced_train.models import load_checkpoint
from ced_train.tag import class_names

DEMO_STUDENT = Path(__file__).parent / "fixtures" / "demo_student"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server():
    model = load_checkpoint(DEMO_STUDENT, pooling="mean")
    tagger = serve.Tagger(model, class_names(model.num_classes, None, str(DEMO_STUDENT)), top_k=3, chunk_seconds=1.0)
    httpd = serve.make_server(tagger, str(DEMO_STUDENT), port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", model, tagger
    httpd.shutdown()
    httpd.server_close()


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
    request = urllib.request.Request(url + "api/tag", data=data, headers={"X-Filename": name}, method="POST")
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


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


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                    "(.ci/run installs them)")
def test_a_browser_uploads_a_clip_and_sees_the_top_class_and_the_timeline(server, clip, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, model, tagger = server
    waveform = torch.from_numpy(sf.read(clip, dtype="float32")[0])
    with torch.inference_mode():
        expected = tagger.names[int(model(waveform.unsqueeze(0))[0].argmax())]
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        assert "ced-train tagger" in driver.title
        driver.find_element(By.ID, "file").send_keys(str(clip))
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#top li .label"))
        labels = [element.text for element in driver.find_elements(By.CSS_SELECTOR, "#top li .label")]
        assert labels[0] == expected and len(labels) == 3
        assert driver.find_element(By.ID, "error").text == ""
        WebDriverWait(driver, 10).until(
            lambda d: d.execute_script("return document.getElementById('timeline').naturalWidth") > 0)
        screenshot = tmp_path / "serve.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    finally:
        driver.quit()
