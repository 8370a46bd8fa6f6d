#!/usr/bin/env bash
# Makes sure a Rust toolchain able to build the project (edition 2024:
# Rust 1.85 or newer, with rustfmt and clippy) is on PATH. Uses rustup when
# present; otherwise Debian's rustc-web/cargo-web (1.85 on bookworm).
set -euo pipefail

need_major=1
need_minor=85

version_ok() {
    local v
    v=$("$1" --version 2>/dev/null | awk '{print $2}') || return 1
    local major=${v%%.*} rest=${v#*.}
    local minor=${rest%%.*}
    [ "$major" -gt "$need_major" ] || { [ "$major" -eq "$need_major" ] && [ "$minor" -ge "$need_minor" ]; }
}

if command -v rustup >/dev/null 2>&1; then
    rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
if command -v cargo >/dev/null 2>&1 && version_ok cargo; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
    echo "ensure-rust: installing Debian's rustc-web and cargo-web" >&2
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd=sudo
    $sudo_cmd apt-get update -qq
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rustc-web cargo-web
    if version_ok /usr/bin/cargo; then
        echo "ensure-rust: using /usr/bin/cargo ($(/usr/bin/cargo --version))" >&2
        exit 0
    fi
fi
echo "ensure-rust: no Rust >= ${need_major}.${need_minor} toolchain found; install one with rustup (https://rustup.rs)" >&2
exit 1
