#!/usr/bin/env bash
# `make data`: install the offline default dataset, Fashion-MNIST from the Debian package
# dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist; see data/README.md).
# Never fails the build: where apt cannot run it says what to do instead, and the tests that need
# the files skip with that reason.
set -euo pipefail

FOLDER=/usr/share/datasets/fashion-mnist
PACKAGE=dataset-fashion-mnist

if [ -d "$FOLDER" ]; then
    echo "Fashion-MNIST: already installed in $FOLDER"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo)
else
    SUDO=none
fi

if ! command -v apt-get >/dev/null || [ "${SUDO[*]}" = none ]; then
    cat >&2 <<MSG
Fashion-MNIST: cannot run apt-get here (no apt, or no root/sudo). Either
  - run: sudo apt-get install $PACKAGE
  - or put the four idx files (train-images-idx3-ubyte.gz, ...) in data/fashion_mnist/
  - or let torchvision download it once: biotune.load_dataset("fashion_mnist", download=True)
MSG
    exit 0
fi

echo "Fashion-MNIST: installing the Debian package $PACKAGE"
"${SUDO[@]}" apt-get install -y "$PACKAGE" || {
    "${SUDO[@]}" apt-get update && "${SUDO[@]}" apt-get install -y "$PACKAGE"
}
echo "Fashion-MNIST: installed in $FOLDER"
