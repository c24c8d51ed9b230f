#!/usr/bin/env bash
# Install Debian's Chromium if no Chromium is on PATH: tests/test_reports_browser.py renders the reports in it
# (headless, driven over the DevTools pipe; nothing is downloaded by the tests themselves).
set -euo pipefail
for exe in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$exe" >/dev/null 2>&1; then echo "ci: $("$exe" --version 2>/dev/null | head -1)"; exit 0; fi
done
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || exit 1
echo "ci: $(chromium --version 2>/dev/null | head -1)"
