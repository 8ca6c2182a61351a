#!/bin/sh
# The worker's entry point: chooses where Hugging Face models come from, then runs the handler.
#
# RunPod mounts a network volume, and its cached models ("Model" on the endpoint), at
# /runpod-volume; cached models sit in /runpod-volume/huggingface-cache/hub in the Hugging Face
# cache layout. HF_HOME=/runpod-volume/huggingface-cache makes that directory the hub cache, so
# a cached model loads from there and a download lands on the volume (kept for the next cold
# worker) instead of the container disk. Without /runpod-volume the image's cache (HF_HOME as
# built, with a prebaked model if any) and the container disk are used.
set -eu
VOLUME=${RUNPOD_VOLUME_DIR:-/runpod-volume}
if [ -d "$VOLUME" ]; then
    CACHE="$VOLUME/huggingface-cache"
    if mkdir -p "$CACHE/hub" 2>/dev/null && [ -w "$CACHE/hub" ]; then
        export HF_HOME="$CACHE"
        export GPU_CORE_CACHE_DIR="$CACHE/influence-dashboard"
    elif [ -d "$CACHE/hub" ]; then
        # RunPod's model cache alone (read-only): cached models from it, others downloaded to
        # the container disk would need a writable cache, which this one is not.
        export HF_HUB_CACHE="$CACHE/hub"
    fi
fi
echo "worker start: HF_HOME=${HF_HOME} HF_HUB_CACHE=${HF_HUB_CACHE:-\$HF_HOME/hub}" >&2
exec python -u handler.py
