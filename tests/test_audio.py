import pickle
import shutil
import subprocess

import numpy as np
import pytest
import soundfile

from ced_train.audio import SAMPLE_RATE, AudioDecodeError, load_audio


def tone(freq_hz: float, seconds: float, rate: int) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * freq_hz * np.arange(int(seconds * rate)) / rate)


def dominant_hz(waveform: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.fft.rfftfreq(len(waveform), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize(
    "ext, fmt, subtype, rate, channels",
    [
        ("wav", "WAV", "PCM_16", 16000, 1),
        ("wav", "WAV", "FLOAT", 48000, 2),
        ("flac", "FLAC", "PCM_24", 44100, 2),
        ("ogg", "OGG", "VORBIS", 22050, 1),
        ("mp3", "MP3", "MPEG_LAYER_III", 32000, 2),
    ],
)
def test_load_audio_gives_16k_mono_float32_with_source_duration(tmp_path, ext, fmt, subtype, rate, channels):
    path = tmp_path / f"clip.{ext}"
    frames = np.stack([tone(1000, 2.5, rate)] * channels, axis=1)
    soundfile.write(path, frames, rate, format=fmt, subtype=subtype)
    source_frames = soundfile.info(path).frames

    decoded = load_audio(path)

    assert decoded.waveform.dtype == np.float32 and decoded.waveform.ndim == 1
    assert (decoded.source_rate, decoded.source_channels) == (rate, channels)
    assert abs(len(decoded.waveform) - source_frames * SAMPLE_RATE / rate) <= 1
    assert abs(dominant_hz(decoded.waveform) - 1000) < 5
    assert 0.4 < np.abs(decoded.waveform).max() < 0.6


def test_downmix_is_the_mean_of_the_channels(tmp_path):
    left, right = tone(500, 1.0, SAMPLE_RATE), tone(2000, 1.0, SAMPLE_RATE) * 0.5
    soundfile.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")

    decoded = load_audio(tmp_path / "stereo.wav")

    np.testing.assert_allclose(decoded.waveform, (left + right) / 2, atol=1e-6)


def test_resampling_keeps_the_tone_and_its_level(tmp_path):
    soundfile.write(tmp_path / "a.wav", tone(3000, 1.0, 44100), 44100, subtype="FLOAT")

    waveform = load_audio(tmp_path / "a.wav").waveform

    assert len(waveform) == SAMPLE_RATE
    reference = tone(3000, 1.0, SAMPLE_RATE)
    middle = slice(1000, -1000)  # away from the resampler's edge transients
    np.testing.assert_allclose(np.sqrt(np.mean(waveform[middle] ** 2)), np.sqrt(np.mean(reference[middle] ** 2)),
                               rtol=0.01)


def test_missing_file_error_names_the_file(tmp_path):
    with pytest.raises(AudioDecodeError) as caught:
        load_audio(tmp_path / "nope.wav")
    assert caught.value.path == tmp_path / "nope.wav"
    assert "nope.wav" in str(caught.value) and caught.value.reason == "no such file"


def test_corrupt_file_error_names_file_and_reason(tmp_path):
    path = tmp_path / "broken.flac"
    path.write_text("<html>Error 404</html>")
    with pytest.raises(AudioDecodeError) as caught:
        load_audio(path)
    assert "broken.flac" in str(caught.value) and "unreadable" in caught.value.reason


def test_nan_samples_are_a_decode_error(tmp_path):
    frames = tone(440, 0.5, SAMPLE_RATE)
    frames[100] = np.nan
    soundfile.write(tmp_path / "nan.wav", frames, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match="NaN"):
        load_audio(tmp_path / "nan.wav")


def test_file_without_frames_decodes_to_empty_waveform(tmp_path):
    soundfile.write(tmp_path / "empty.wav", np.zeros((0, 2)), 44100)
    decoded = load_audio(tmp_path / "empty.wav")
    assert decoded.waveform.shape == (0,) and decoded.source_channels == 2


def test_decode_error_survives_pickling_with_its_fields(tmp_path):
    error = pickle.loads(pickle.dumps(AudioDecodeError(tmp_path / "x.m4a", "ffmpeg not found")))
    assert error.path == tmp_path / "x.m4a" and error.reason == "ffmpeg not found"


def test_m4a_without_ffmpeg_fails_with_ffmpeg_not_found(tmp_path, monkeypatch):
    path = tmp_path / "clip.m4a"
    path.write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(64))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(AudioDecodeError, match="ffmpeg not found") as caught:
        load_audio(path)
    assert caught.value.path == path


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg binary not installed")
@pytest.mark.parametrize("ext, codec", [("m4a", "aac"), ("webm", "libopus")])
def test_formats_soundfile_cannot_read_decode_through_ffmpeg(tmp_path, ext, codec):
    source = tmp_path / "source.wav"
    soundfile.write(source, np.stack([tone(1000, 2.0, 48000)] * 2, axis=1), 48000)
    encoded = tmp_path / f"clip.{ext}"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(source), "-c:a", codec, str(encoded)],
                   check=True)

    decoded = load_audio(encoded)

    assert (decoded.source_rate, decoded.source_channels) == (48000, 2)
    assert abs(len(decoded.waveform) / SAMPLE_RATE - 2.0) < 0.1  # codecs add a few ms of priming
    assert abs(dominant_hz(decoded.waveform) - 1000) < 5


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg binary not installed")
def test_ffmpeg_failure_is_a_decode_error_with_its_message(tmp_path):
    path = tmp_path / "broken.m4a"
    path.write_text("not an mp4 container")
    with pytest.raises(AudioDecodeError, match="ffmpeg failed"):
        load_audio(path)
