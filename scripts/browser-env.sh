#!/usr/bin/env bash
# Chromium and chromedriver for the dashboard's browser test (tests/tests/dashboard.rs), from Debian's
# `chromium` and `chromium-driver`: installed when missing, then chromedriver's path is printed (for
# PRETRAIN_CHROMEDRIVER). Installing needs root, or sudo.
set -euo pipefail
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "browser-env: installing chromium and chromium-driver" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >&2 ||
        { $sudo apt-get update -q >&2 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >&2; }
fi
command -v chromedriver
