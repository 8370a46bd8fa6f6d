#!/usr/bin/env bash
# Assembles the rvscsi IPS package from the built and checked module.
#
#   pkg/package.sh
#
# Needs target/kernel/rvscsi (pkg/kernel/build-module.sh). Writes
#   target/pkg/proto/        the files, laid out as they are installed
#   target/pkg/rvscsi.p5m    the manifest with its macros filled
# and, where the IPS tools are (illumos), checks the manifest with pkglint,
# publishes it into a scratch repository with pkgsend and writes
#   target/pkg/rvscsi-<version>.p5p   (pkg install -g <file> driver/storage/rvscsi)
# Elsewhere the proto area and manifest are the result; a project test
# (tests/package.rs) parses and checks them.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

version=$(awk -F'"' '/^version *=/ { print $2; exit }' Cargo.toml)
branch=${PKGBRANCH:-0}
publisher=${PKGPUBLISHER:-rvscsi}
out=target/pkg
proto=$out/proto
module=target/kernel/rvscsi

[ -f "$module" ] || { echo "package: $module is missing (pkg/kernel/build-module.sh builds it)" >&2; exit 1; }

# The man page must be lint-clean (mandoc's own checks; the only messages
# allowed are the ones about the build machine: illumos section names and
# manuals that are not installed here).
if command -v mandoc >/dev/null 2>&1; then
    lint=$(mandoc -T lint -W style pkg/rvscsi.4D 2>&1 |
        grep -v -e 'referenced manual not found' -e 'unknown manual section: Dt ... 4D' || true)
    if [ -n "$lint" ]; then
        echo "package: rvscsi.4D is not lint-clean:" >&2
        echo "$lint" >&2
        exit 1
    fi
else
    echo "package: mandoc not found; cannot check the man page (test/scripts/install-deps.sh installs it)" >&2
    exit 1
fi

# cp and chmod, not install(1): on illumos root's PATH finds the SysV
# /usr/sbin/install, whose operands after the file are directories it
# SEARCHES for a file of the same name, then /bin, /usr/bin, /etc, /lib
# and /usr/lib, overwriting the first one found
# (usr/src/cmd/install.d/install.sh).
put() {
    local mode=$1 src=$2 dest=$3
    cp "$src" "$dest"
    chmod "$mode" "$dest"
}
rm -rf "$proto"
mkdir -p "$proto/kernel/drv/amd64" "$proto/usr/sbin" "$proto/usr/share/man/man4d"
put 0755 "$module" "$proto/kernel/drv/amd64/rvscsi"
put 0644 pkg/rvscsi.conf "$proto/kernel/drv/rvscsi.conf"
put 0555 pkg/rvscsiadm "$proto/usr/sbin/rvscsiadm"
put 0444 pkg/rvscsi.4D "$proto/usr/share/man/man4d/rvscsi.4d"
put 0444 docs/LICENSE "$proto/LICENSE"

manifest=$out/rvscsi.p5m
if command -v pkgmogrify >/dev/null 2>&1; then
    pkgmogrify -DPKGVERS="$version" -DPKGBRANCH="$branch" -DPKGPUBLISHER="$publisher" \
        pkg/rvscsi.p5m >"$manifest"
else
    sed -e "s/\$(PKGVERS)/$version/g" -e "s/\$(PKGBRANCH)/$branch/g" \
        -e "s/\$(PKGPUBLISHER)/$publisher/g" pkg/rvscsi.p5m >"$manifest"
fi
# shellcheck disable=SC2016 # the manifest's macro syntax, literally
if grep -n '\$(' "$manifest"; then
    echo "package: unfilled macros in $manifest" >&2
    exit 1
fi

if command -v pkgsend >/dev/null 2>&1 && command -v pkgrecv >/dev/null 2>&1; then
    pkglint "$manifest"
    repo=$out/repo
    rm -rf "$repo"
    pkgrepo create "$repo"
    pkgrepo -s "$repo" set publisher/prefix="$publisher"
    pkgsend publish -s "$repo" -d "$proto" "$manifest"
    archive=$out/rvscsi-$version.p5p
    rm -f "$archive"
    pkgrecv -s "$repo" -a -d "$archive" driver/storage/rvscsi
    echo "package: wrote $archive"
else
    echo "package: no IPS tools here; wrote the proto area $proto and the manifest $manifest"
fi
