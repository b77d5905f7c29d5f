#!/usr/bin/env bash
# Install what the browser tests (tests/browser) need: a Chromium and Playwright.
#
#   scripts/install-browser.sh VENV_DIR
#
# Idempotent and best-effort: it never fails the build because a browser cannot
# be installed (the browser tests then skip with the reason).
#
#   1. Chromium: if no Chromium is found (RAPPORT_CHROMIUM, /usr/bin/chromium,
#      chromium or chromium-browser on PATH) and apt-get is usable (root on
#      Debian/Ubuntu), `apt-get install chromium` (running `apt-get update` when
#      the package is not known yet). Playwright drives this Chromium directly,
#      so `playwright install` (which downloads its own browsers) is not needed.
#   2. Playwright's Python package into VENV_DIR, unless it already imports.
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
VENV_DIR="${1%/}"
PY="$VENV_DIR/bin/python"
log() { echo "[install-browser] $*"; }

find_chromium() {
    local c
    for c in "${RAPPORT_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser \
             "$(command -v chromium 2>/dev/null)" "$(command -v chromium-browser 2>/dev/null)"; do
        if [[ -n "$c" && -x "$c" ]]; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

# ------------------------------------------------------------------ Chromium
if chromium_path="$(find_chromium)"; then
    log "Chromium found: $chromium_path"
elif [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show chromium >/dev/null 2>&1; then
        log "apt-get update"
        apt-get update -qq || log "warning: apt-get update failed"
    fi
    log "apt-get install chromium chromium-driver"
    if apt-get install -y -qq chromium chromium-driver >/dev/null; then
        log "Chromium installed: $(find_chromium || echo '?')"
    else
        log "warning: could not install Chromium; the browser tests will be skipped"
    fi
else
    log "no Chromium and no usable apt-get (not root, or not Debian): the browser tests will be skipped"
fi

# ------------------------------------------------------------------ Playwright
if [[ ! -x "$PY" ]]; then
    log "warning: $PY not found; not installing Playwright"
    exit 0
fi
if "$PY" -c "import playwright.async_api" >/dev/null 2>&1; then
    log "Playwright already installed in $VENV_DIR"
else
    log "pip install playwright into $VENV_DIR"
    "$PY" -m pip install -q playwright || log "warning: could not install Playwright; the browser tests will be skipped"
fi
exit 0
