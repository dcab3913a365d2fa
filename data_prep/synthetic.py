"""The embedded demo dataset: AudioSet's file layout with clips synthesised by numpy.

    python -m data_prep.synthetic --out DIR [--train N] [--eval M] [--seed S] [--workers W]

writes
    DIR/class_labels_indices.csv          the full 527-class AudioSet label file
    DIR/balanced_train_segments.csv       official segment-CSV format, labels from the 14 synthesised classes
    DIR/eval_segments.csv
    DIR/audio/balanced_train/, DIR/audio/eval/   one file per row, as downloaders leave them: WAV (16/24-bit, float),
                                          FLAC, OGG/Vorbis, MP3; 16 to 48 kHz; mono or stereo; several naming schemes;
                                          some rows without a file, some files corrupt or empty; some clips < 10 s
    DIR/synthetic.json                    settings and per-row ground truth (events with onsets, the defect if any)
    DIR/balanced_train_events.tsv, DIR/eval_events.tsv
                                          the events of the readable files as DCASE task 4 truth (`filename  onset
                                          offset  event_label`, tab-separated; filename relative to DIR/audio/<split>/,
                                          seconds from the clip's start, AudioSet display names): what event
                                          detection is scored against (ced_train.sed_metrics)

so that `data_prep.audioset` prepares it exactly as it prepares real AudioSet. Every class is one that exists in
AudioSet and that numpy can render honestly, with its own spectral and temporal signature in a 64-bin log-mel; each
clip holds 1 to 3 classes, often overlapping. Equal settings give identical CSVs and identical decoded audio (not
identical bytes: libsndfile gives each OGG stream a random serial number and stamps float WAVs with the time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from ced_train import __version__
from ced_train.events import write_truth_tsv
from ced_train.labels import default_label_file, load_class_labels
from data_prep.sharding import available_cpus, process_pool

TOOL = "data_prep.synthetic"
SPLITS = {"balanced_train": "balanced_train_segments.csv", "eval": "eval_segments.csv"}
CLIP_S = 10.0
FADE_S = 0.01
Generator = Callable[[np.random.Generator, int, int], np.ndarray]


def _phase(freq_hz: np.ndarray | float, n: int, sr: int) -> np.ndarray:
    """Phase of an oscillator whose frequency may change per sample."""
    return 2 * np.pi * np.cumsum(np.broadcast_to(freq_hz, (n,))) / sr


def _pulse_train(n: int, sr: int, onsets_s: np.ndarray, pulse: np.ndarray) -> np.ndarray:
    out = np.zeros(n)
    for onset in (onsets_s * sr).astype(int):
        end = min(n, onset + len(pulse))
        out[onset:end] += pulse[: end - onset]
    return out


def sine_wave(rng, n, sr):
    return np.sin(_phase(rng.uniform(2000, 5000), n, sr) + rng.uniform(0, 2 * np.pi))


def chirp_tone(rng, n, sr):
    """Repeated fast exponential up-sweeps (unlike the siren's slow wail)."""
    sweep_s, gap_s = rng.uniform(0.15, 0.5), rng.uniform(0.05, 0.3)
    f0, f1 = rng.uniform(300, 800), rng.uniform(3000, 6000)
    t = np.arange(n) / sr % (sweep_s + gap_s)
    freq = f0 * (f1 / f0) ** np.minimum(t / sweep_s, 1.0)
    return np.sin(_phase(freq, n, sr)) * (t < sweep_s)


def white_noise(rng, n, sr):
    return rng.standard_normal(n)


def pink_noise(rng, n, sr):
    n_fft = 1 << max(0, n - 1).bit_length()  # a power of two: event lengths can have large prime factors (slow FFT)
    spectrum = np.fft.rfft(rng.standard_normal(n_fft))
    spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))  # power ~ 1/f
    spectrum[0] = 0
    return np.fft.irfft(spectrum, n_fft)[:n]


def beep_bleep(rng, n, sr):
    """Short electronic tone bursts with gaps."""
    on_s, off_s = rng.uniform(0.08, 0.2), rng.uniform(0.1, 0.6)
    t = np.arange(n) / sr % (on_s + off_s)
    return np.sin(_phase(rng.uniform(1000, 2500), n, sr)) * (t < on_s)


def siren(rng, n, sr):
    """Wail: a slow sinusoidal pitch sweep with harmonics."""
    t = np.arange(n) / sr
    freq = rng.uniform(900, 1200) + rng.uniform(300, 500) * np.sin(2 * np.pi * t / rng.uniform(1.5, 4.0))
    phase = _phase(freq, n, sr)
    return sum(a * np.sin(k * phase) for k, a in ((1, 1.0), (2, 0.5), (3, 0.25)))


def clicking(rng, n, sr):
    """Irregular broadband clicks (Poisson onsets)."""
    onsets = np.cumsum(rng.exponential(1 / rng.uniform(3, 10), size=int(n / sr * 12) + 1))
    pulse = rng.standard_normal(int(0.003 * sr)) * np.exp(-np.arange(int(0.003 * sr)) / (0.0007 * sr))
    return _pulse_train(n, sr, onsets[onsets < n / sr], pulse)


def tick(rng, n, sr):
    """Clock-like: regular, short resonant ticks around 3 to 5 kHz."""
    period_s = rng.uniform(0.25, 1.0)
    m = np.arange(int(0.006 * sr))
    pulse = np.sin(2 * np.pi * rng.uniform(3000, 5000) * m / sr) * np.exp(-m / (0.0012 * sr))
    return _pulse_train(n, sr, np.arange(rng.uniform(0, period_s), n / sr, period_s), pulse)


def buzz(rng, n, sr):
    """Band-limited sawtooth at 90 to 220 Hz: one period synthesised, then repeated."""
    period = int(round(sr / rng.uniform(90, 220)))
    harmonics = np.arange(1, min(period // 2, int(7000 * period / sr)) + 1)
    cycle = (np.sin(2 * np.pi * np.outer(np.arange(period), harmonics) / period) / harmonics).sum(axis=1)
    return np.resize(cycle, n)


def hum(rng, n, sr):
    """Mains hum: 50 or 60 Hz and a few harmonics, slowly wobbling in level."""
    phase = _phase(rng.choice([50.0, 60.0]), n, sr)
    wobble = 1 + 0.2 * np.sin(2 * np.pi * np.arange(n) / sr * rng.uniform(0.2, 1.0))
    return wobble * sum(a * np.sin(k * phase) for k, a in enumerate((1.0, 0.6, 0.4, 0.25, 0.15, 0.1), start=1))


def dial_tone(rng, n, sr):
    """North-American precise tone plan: 350 Hz + 440 Hz, continuous."""
    return np.sin(_phase(350.0, n, sr)) + np.sin(_phase(440.0, n, sr))


def busy_signal(rng, n, sr):
    """480 Hz + 620 Hz, 0.5 s on, 0.5 s off."""
    on = (np.arange(n) / sr + rng.uniform(0, 1.0)) % 1.0 < 0.5
    return (np.sin(_phase(480.0, n, sr)) + np.sin(_phase(620.0, n, sr))) * on


def whistle(rng, n, sr):
    """A whistled tune: notes of 0.15 to 0.6 s at 1 to 2.2 kHz with glides and vibrato, and a little breath."""
    note_ends = np.cumsum(rng.uniform(0.15, 0.6, size=int(n / sr / 0.15) + 2))
    notes = rng.uniform(1000, 2200, size=len(note_ends))
    t = np.arange(n) / sr
    contour = notes[np.searchsorted(note_ends, t)]
    glide = int(0.04 * sr)  # moving average of the note contour: 40 ms glides between notes
    summed = np.cumsum(np.pad(contour, (glide, glide), mode="edge"))
    contour = ((summed[glide:] - summed[:-glide]) / glide)[glide // 2 : glide // 2 + n]
    freq = contour * (1 + 0.02 * np.sin(2 * np.pi * rng.uniform(4.5, 6.5) * t))
    return np.sin(_phase(freq, n, sr)) + 0.03 * rng.standard_normal(n)


def ding(rng, n, sr):
    """Struck bell: inharmonic partials with exponential decays; one to three strikes."""
    f0, tau_s = rng.uniform(600, 1500), rng.uniform(0.4, 1.2)
    m = np.arange(min(n, int(5 * tau_s * sr)))
    strike = sum(a * np.sin(2 * np.pi * f0 * r * m / sr) * np.exp(-m / (tau_s / d * sr))
                 for r, a, d in ((1.0, 1.0, 1.0), (2.76, 0.5, 1.5), (5.40, 0.25, 2.0), (8.93, 0.12, 3.0)))
    onsets = np.arange(rng.integers(1, 4)) * rng.uniform(0.8, 1.5)
    return _pulse_train(n, sr, onsets[onsets < n / sr], strike)


# AudioSet display name → generator. Ranges are chosen so that classes stay apart in a 64-bin log-mel: the steady
# tones differ in frequency (hum < dial tone < busy signal < whistle/beep < sine), the rest in temporal pattern.
GENERATORS: dict[str, Generator] = {
    "Sine wave": sine_wave, "Chirp tone": chirp_tone, "White noise": white_noise, "Pink noise": pink_noise,
    "Beep, bleep": beep_bleep, "Siren": siren, "Clicking": clicking, "Tick": tick, "Buzz": buzz, "Hum": hum,
    "Dial tone": dial_tone, "Busy signal": busy_signal, "Whistle": whistle, "Ding": ding,
}
NOISE_CLASSES = frozenset({"White noise", "Pink noise"})
SAMPLE_RATES = ((16000, 0.3), (22050, 0.15), (32000, 0.15), (44100, 0.25), (48000, 0.15))
# (extension, soundfile format, subtype, weight); MP3 encoding is slow, so it is kept rarer and at lower rates.
FORMATS = (("wav", "WAV", "PCM_16", 0.30), ("wav", "WAV", "FLOAT", 0.06), ("wav", "WAV", "PCM_24", 0.04),
           ("flac", "FLAC", "PCM_16", 0.20), ("flac", "FLAC", "PCM_24", 0.05), ("ogg", "OGG", "VORBIS", 0.15),
           ("mp3", "MP3", "MPEG_LAYER_III", 0.10))
DEFECT_FRACTIONS = {"missing": 0.03, "corrupt": 0.02, "empty": 0.01}
_ERROR_PAGE = ("<!DOCTYPE html><html><head><title>Error 410 (Gone)</title></head>"
               "<body><p>Video {ytid} is no longer available.</p></body></html>\n")


@dataclass(frozen=True)
class ClipSpec:
    split: str
    index: int
    seed: int
    ytid: str
    start_s: float
    defect: str | None


def _choice(rng: np.random.Generator, weighted: Sequence[tuple]) -> tuple:
    weights = np.array([item[-1] for item in weighted])
    return weighted[rng.choice(len(weighted), p=weights / weights.sum())]


def render_clip(spec: ClipSpec, audio_dir: Path) -> dict:
    """Synthesise and write one clip (or its defect); return its ground-truth record. Runs in worker processes."""
    rng = np.random.default_rng([spec.seed, spec.index, 0 if spec.split == "eval" else 1])
    duration_s = CLIP_S if rng.random() > 0.12 else round(rng.uniform(4.0, 9.5), 3)
    end_s = round(spec.start_s + duration_s, 3)
    (sr, _), (ext, fmt, subtype, _) = _choice(rng, SAMPLE_RATES), _choice(rng, FORMATS)
    if ext == "mp3":
        sr = min(sr, 32000)
    if spec.defect == "empty":  # a WAV header and no frames, as an interrupted conversion leaves it
        ext, fmt, subtype = "wav", "WAV", "PCM_16"
    channels = 2 if rng.random() < 0.4 else 1
    n = int(round(duration_s * sr))
    names = list(GENERATORS)
    classes = [names[i] for i in rng.choice(len(names), size=rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]), replace=False)]
    mix, events = np.zeros(n), []
    for name in classes:
        event_s = rng.uniform(min(2.0, duration_s), duration_s)
        onset_s = rng.uniform(0, duration_s - event_s)
        start, length = int(onset_s * sr), int(event_s * sr)
        event = GENERATORS[name](rng, length, sr)
        fade = np.minimum(1.0, np.minimum(np.arange(length), np.arange(length)[::-1]) / (FADE_S * sr))
        gain_db = rng.uniform(-18, -6) if name in NOISE_CLASSES else rng.uniform(-12, 0)
        mix[start : start + length] += event * fade / (np.abs(event).max() + 1e-12) * 10 ** (gain_db / 20)
        events.append({"class": name, "onset_s": round(onset_s, 3), "duration_s": round(event_s, 3),
                       "gain_db": round(gain_db, 1)})
    mix *= rng.uniform(0.25, 0.9) / (np.abs(mix).max() + 1e-12)
    frames = mix[:, None] * (rng.uniform(0.6, 1.0, size=channels) if channels > 1 else 1.0)
    short_start = f"{spec.start_s:.3f}".rstrip("0").rstrip(".")
    stem = _choice(rng, ((f"{spec.ytid}_{spec.start_s:.3f}", 3), (f"{spec.ytid}_{short_start}", 2),
                         (f"{spec.ytid}_{spec.start_s:.3f}_{end_s:.3f}", 2), (spec.ytid, 2),
                         (f"Y{spec.ytid}_{spec.start_s:.3f}_{end_s:.3f}", 1)))[0]
    relative = Path("part-1" if rng.random() < 0.25 else ".") / f"{stem}.{ext}"
    path = audio_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.defect == "corrupt" and ext == "flac":  # a download cut off after the header
        soundfile.write(path, frames.astype(np.float32), sr, format=fmt, subtype=subtype)
        path.write_bytes(path.read_bytes()[:64])
    elif spec.defect == "corrupt":  # a failed download that saved the server's error page under the audio name
        path.write_text(_ERROR_PAGE.format(ytid=spec.ytid))
    elif spec.defect == "empty":
        soundfile.write(path, np.zeros((0, channels)), sr, format=fmt, subtype=subtype)
    elif spec.defect != "missing":
        soundfile.write(path, frames.astype(np.float32), sr, format=fmt, subtype=subtype)
    return {"ytid": spec.ytid, "start_s": spec.start_s, "end_s": end_s, "labels": classes,
            "file": None if spec.defect == "missing" else relative.as_posix(), "defect": spec.defect,
            "format": f"{ext}/{subtype}", "sample_rate": sr, "channels": channels, "events": events}


def clip_specs(seed: int, sizes: dict[str, int]) -> list[ClipSpec]:
    """Unique YouTube-like ids and start times for all splits, and which rows get which defect."""
    rng = np.random.default_rng([seed, 2])
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"))
    specs, used = [], set()
    for split, size in sizes.items():
        defects = [None] * size
        slots = iter(rng.permutation(size))
        for defect, fraction in DEFECT_FRACTIONS.items():
            for _ in range(min(size, max(1, round(fraction * size))) if size >= 10 else 0):
                defects[next(slots)] = defect
        for index in range(size):
            ytid = "".join(rng.choice(alphabet, size=11))
            while ytid in used:
                ytid = "".join(rng.choice(alphabet, size=11))
            used.add(ytid)
            start_s = float(rng.integers(0, 30) * 10) if rng.random() < 0.85 else round(rng.uniform(0, 300), 3)
            specs.append(ClipSpec(split, index, seed, ytid, start_s, defects[index]))
    return specs


def write_segments_csv(path: Path, rows: list[dict], mid_of: dict[str, str], seed: int) -> None:
    positives = sum(len(r["labels"]) for r in rows)
    unique = len({label for r in rows for label in r["labels"]})
    with open(path, "w", newline="", encoding="utf-8") as handle:
        handle.write(f"# Segments csv created by {TOOL} (seed {seed})\n")
        handle.write(f"# num_ytids={len(rows)}, num_segs={len(rows)}, num_unique_labels={unique}, "
                     f"num_positive_labels={positives}\n")
        handle.write("# YTID, start_seconds, end_seconds, positive_labels\n")
        for r in rows:
            mids = ",".join(mid_of[label] for label in r["labels"])
            handle.write(f'{r["ytid"]}, {r["start_s"]:.3f}, {r["end_s"]:.3f}, "{mids}"\n')


def generate(out: Path, train: int, eval_: int, seed: int, workers: int) -> dict:
    """Write the dataset into `out` (which must not exist); return the content of synthetic.json."""
    classes = load_class_labels()
    mid_of = {name: classes.mids[classes.names.index(name)] for name in GENERATORS}
    sizes = {"balanced_train": train, "eval": eval_}
    specs = clip_specs(seed, sizes)
    jobs = [(spec, out / "audio" / spec.split) for spec in specs]
    if workers > 1:
        with process_pool(workers) as pool:
            records = pool.starmap(render_clip, jobs, chunksize=4)
    else:
        records = [render_clip(*job) for job in jobs]
    rows = {split: [r for spec, r in zip(specs, records) if spec.split == split] for split in sizes}
    (out / "audio" / "eval").mkdir(parents=True, exist_ok=True)
    (out / "audio" / "balanced_train").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(default_label_file(), out / "class_labels_indices.csv")
    for split, csv_name in SPLITS.items():
        write_segments_csv(out / csv_name, rows[split], mid_of, seed)
        write_truth_tsv(out / f"{split}_events.tsv", {
            r["file"]: sorted((e["onset_s"], round(e["onset_s"] + e["duration_s"], 3), e["class"]) for e in r["events"])
            for r in rows[split] if r["defect"] is None})
    info = {
        "tool": TOOL, "tool_version": __version__, "settings": {"train": train, "eval": eval_, "seed": seed},
        "classes": [{"name": name, "mid": mid_of[name], "index": classes.index_of_mid[mid_of[name]]}
                    for name in GENERATORS],
        "rows": rows,
    }
    (out / "synthetic.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {TOOL}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    parser.add_argument("--train", type=int, default=240, help="rows of balanced_train_segments.csv (default 240)")
    parser.add_argument("--eval", type=int, default=80, help="rows of eval_segments.csv (default 80)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=available_cpus(),
                        help="processes rendering clips (default: the CPUs available)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing synthetic dataset in --out")
    args = parser.parse_args(argv)
    if args.train < 0 or args.eval < 0:
        parser.error("--train and --eval must be >= 0")
    settings = {"train": args.train, "eval": args.eval, "seed": args.seed}
    out: Path = args.out
    marker = out / "synthetic.json"
    if marker.is_file():
        existing = json.loads(marker.read_text())["settings"]
        if existing == settings and not args.overwrite:
            print(f"{out} already holds the synthetic dataset with {settings}; nothing to do")
            return 0
        if not args.overwrite:
            print(f"{TOOL}: error: {out} holds a synthetic dataset made with {existing}, not {settings}; "
                  f"pass --overwrite to replace it", file=sys.stderr)
            return 2
    elif out.exists() and any(out.iterdir()):
        print(f"{TOOL}: error: {out} exists and is not a synthetic dataset (no synthetic.json); "
              f"choose an empty or new --out", file=sys.stderr)
        return 2
    start = time.perf_counter()
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info = generate(tmp, args.train, args.eval, args.seed, args.workers)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    rows = [r for split in info["rows"].values() for r in split]
    defects = Counter(r["defect"] for r in rows if r["defect"])
    formats = Counter(r["format"].split("/")[0] for r in rows if r["file"])
    print(f"wrote {args.train} + {args.eval} rows ({', '.join(f'{k} {v}' for k, v in sorted(formats.items()))}; "
          f"defects: {', '.join(f'{k} {v}' for k, v in sorted(defects.items())) or 'none'}) "
          f"of {len(GENERATORS)} classes to {out} in {time.perf_counter() - start:.1f} s")
    print(f"next: python -m data_prep.audioset --segments {out}/balanced_train_segments.csv "
          f"--audio-dir {out}/audio/balanced_train --class-labels {out}/class_labels_indices.csv --out SHARDS_DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
