#!/usr/bin/env bash
# Benchmark set-up: install Fashion-MNIST from Debian's package `dataset-fashion-mnist`
# (IDX files in /usr/share/datasets/fashion-mnist) for benchmarks/privacy_utility.py.
# Nothing is downloaded from anywhere else. The --quick modes need none of this.
set -euo pipefail

DATA_DIR=/usr/share/datasets/fashion-mnist
FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

have_all() {
    for stem in "${FILES[@]}"; do
        [[ -f "$DATA_DIR/$stem.gz" || -f "$DATA_DIR/$stem" ]] || return 1
    done
}

if have_all; then
    echo "Fashion-MNIST already installed in $DATA_DIR"
    exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    SUDO=(sudo)
fi
echo "installing Fashion-MNIST: ${SUDO[*]:+${SUDO[*]} }apt-get install -y dataset-fashion-mnist"
"${SUDO[@]}" apt-get install -y dataset-fashion-mnist
have_all || { echo "dataset-fashion-mnist installed, but files are missing in $DATA_DIR" >&2; exit 1; }
echo "Fashion-MNIST installed in $DATA_DIR"
