#!/usr/bin/env bash
# Make sure headless Chromium and its WebDriver (the report's browser tests need both) are on PATH,
# installing Debian's packages when they are missing (as root, or through sudo).
# Called by `make test` and, through it, by .ci/run.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-chromium: chromium or chromedriver is missing and there is no apt-get;" \
       "install Chromium and ChromeDriver and put both on PATH" >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
  echo "ensure-chromium: chromium or chromedriver is missing and this user cannot install packages;" \
       "run as root: apt-get update && apt-get install -y chromium chromium-driver" >&2
  exit 1
fi
echo "ensure-chromium: installing Debian's chromium and chromium-driver (once) ..." >&2
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
