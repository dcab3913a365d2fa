#!/usr/bin/env bash
# Download into .whl/ the wheels that benchmarks/gpu_check.py needs on the lent GPU machine and that its image lacks
# (it has torch, lightning, timm, h5py, scikit-learn, numpy, PyYAML, packaging, tqdm; it reaches no registry).
# Run here, in the repo root; .whl/ is git-ignored and travels with `carry: [".whl"]` (docs/performance.md).
#
#   bash benchmarks/device_wheels.sh
#
# What they are for: `ced_train.stages` imports hydra and omegaconf (-> antlr4), `ced_train.audio` and data_prep
# import soundfile (-> cffi -> pycparser) and soxr. webdataset and wandb are not imported by anything gpu_check runs.
# Versions are the development venv's; the device has Python 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/*.whl  # one version of each: two stop the install there
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d .whl hydra-core==1.3.8 omegaconf==2.3.1 soundfile==0.14.0 soxr==1.1.0 cffi==2.1.1 pycparser==3.12
# antlr4-python3-runtime 4.9.3 (the 4.9.* that omegaconf 2.3 pins) is published as a source archive only; it is pure
# Python, so the wheel pip builds from it here installs on any Python 3.
"$PYTHON" -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
du -ch .whl/*.whl | tail -n 1
