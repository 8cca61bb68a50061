#!/usr/bin/env bash
# The training set travels to the GPU machine packed (data/README.md): 42 MB raw, about 19 MB with xz,
# inside the 64 MiB a device call may carry.
#   here:   bash scripts/device-dataset.sh pack     build/dataset/… -> .dataset/ (carry ".dataset")
#   device: bash scripts/device-dataset.sh unpack   .dataset/… -> build/dataset/…, sha256 checked
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RAW=build/dataset/flashipa-dataset.safetensors
PACKED=.dataset/flashipa-dataset.safetensors.xz
case "${1:-}" in
pack)
    [ -f "$RAW" ] || { echo "no $RAW: run scripts/build_dataset.py first" >&2; exit 1; }
    mkdir -p .dataset
    sha256sum "$RAW" | cut -d' ' -f1 > .dataset/sha256
    xz -T0 -6 -c "$RAW" > "$PACKED.tmp" && mv "$PACKED.tmp" "$PACKED"
    echo "packed $(stat -c %s "$RAW") -> $(stat -c %s "$PACKED") bytes";;
unpack)
    [ -f "$PACKED" ] || { echo "no $PACKED: pack it here and carry .dataset" >&2; exit 1; }
    mkdir -p "$(dirname "$RAW")"
    if [ -f "$RAW" ] && [ "$(sha256sum "$RAW" | cut -d' ' -f1)" = "$(cat .dataset/sha256)" ]; then
        echo "$RAW is already unpacked"; exit 0
    fi
    xz -d -c "$PACKED" > "$RAW.tmp"
    [ "$(sha256sum "$RAW.tmp" | cut -d' ' -f1)" = "$(cat .dataset/sha256)" ] || { echo "unpacked data set does not match its sha256" >&2; rm -f "$RAW.tmp"; exit 1; }
    mv "$RAW.tmp" "$RAW"; echo "unpacked $RAW";;
*) echo "usage: $0 pack|unpack" >&2; exit 2;;
esac
