#!/usr/bin/env bash
# The wheels a GPU machine with only torch/torchvision preinstalled (Python 3.12, x86-64 Linux,
# no package index) lacks to run the project, into .device_wheels/ (ignored by git).
# benchmarks/device_check.py installs them there with `pip install --no-index --find-links`.
#
# Versions are the ones the test suite passes with; the folder must stay under 60 MiB.
# Then it checks that the folder is complete: pip resolves every package below offline from the
# folder plus what a torch install already brings (numpy, pillow, fsspec, jinja2, …).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.device_wheels
LIMIT_MIB=60
TARGET=(--only-binary=:all: --implementation cp --python-version 3.12
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64
        --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)

# What the project needs beyond torch, torchvision, numpy and pillow (and scikit-image,
# scikit-learn and matplotlib, taken as present: EXTRA_PACKAGES="..." adds more).
PACKAGES=(
    openslide-python==1.4.7 openslide-bin==4.0.1.2
    tifffile==2026.3.3 imagecodecs==2026.3.6
    zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 donfig packaging
    typing-extensions
    dask==2026.8.0 distributed==2026.8.0
    toolz cloudpickle partd locket pyyaml importlib-metadata zipp lazy-importer click
    msgpack tblib zict sortedcontainers psutil tornado urllib3 tqdm
    ${EXTRA_PACKAGES:-}
)
# Already on a machine with torch and torchvision: only used to check the folder is complete.
WITH_TORCH=(numpy pillow fsspec jinja2 markupsafe)

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --quiet "${TARGET[@]}" --no-deps -d "$DEST" "${PACKAGES[@]}"

check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
"$PY" -m pip download --quiet "${TARGET[@]}" --no-deps -d "$check/torch" "${WITH_TORCH[@]}"
"$PY" -m pip download --quiet --no-index "${TARGET[@]}" -d "$check/resolved" \
    --find-links "$DEST" --find-links "$check/torch" "${PACKAGES[@]}" \
    || { echo "the wheel folder is incomplete: see pip's message above" >&2; exit 1; }

ls -l "$DEST" | awk 'NR > 1 {printf "%10.1f KiB  %s\n", $5 / 1024, $9}'
bytes=$(du -sb "$DEST" | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
echo "$DEST: $(ls "$DEST" | wc -l) wheels, $mib MiB (limit $LIMIT_MIB MiB)"
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "over the $LIMIT_MIB MiB limit" >&2
    exit 1
fi
