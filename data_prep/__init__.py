"""Dataset preparation CLIs: inputs → webdataset shards + manifest.json + skipped.tsv (see docs/data.md).

- `python -m data_prep.audioset`: AudioSet segment CSVs and downloaded clips.
- `python -m data_prep.folder`: any folder of audio, labels optional.
- `python -m data_prep.synthetic`: the embedded demo dataset, in AudioSet's layout.

Imports neither Lightning, Hydra nor torch.
"""
