# shellcheck shell=bash disable=SC2034 # the variables are for the scripts that source this
# Sourced by the build scripts on illumos (pkg/build.sh,
# pkg/kernel/build-module.sh, test/scripts/install-deps.sh): where OmniOS
# keeps what the build needs, and the packages that deliver it.
#
# RVSCSI_SYSROOT (default empty: /) is the root of the illumos system these
# are looked up in; the project's tests point it at a scratch system of
# stand-ins (test/omnios/standins, tests/omnios_scripts.rs).

illumos_root=${RVSCSI_SYSROOT:-}

# The illumos link editor and strip, by absolute path: OmniOS also ships
# GNU binutils in /usr/gnu/bin, and with that first on PATH a bare "ld"
# is GNU ld, which reads -N as --omagic and knows no -ztype=kmod. The gate
# delivers them as usr/bin/ld (developer/linker) and usr/bin/strip
# (developer/object-file); usr/ccs/bin/ld and strip are links to them
# (usr/src/pkg/manifests/developer-linker.p5m, developer-object-file.p5m).
ILLUMOS_LD=$illumos_root/usr/bin/ld
ILLUMOS_STRIP=$illumos_root/usr/bin/strip
ILLUMOS_LD_PKG=developer/linker
ILLUMOS_STRIP_PKG=developer/object-file

# libclang for bindgen. OmniOS's clang comes from the extra publisher
# (extra.omnios) as ooce/developer/clang-NN, and omnios-extra's
# build/clang/build-NN.sh installs it under the LLVM of the same major:
# PREFIX=/opt/ooce/llvm-NN, so libclang.so is in /opt/ooce/llvm-NN/lib.
ILLUMOS_CLANG_PKG=${RVSCSI_CLANG_PKG:-ooce/developer/clang-19}
ILLUMOS_EXTRA_PUBLISHER=extra.omnios

# Prints the lib directory of the newest /opt/ooce/llvm-NN that holds
# libclang; fails (printing nothing) when there is none.
illumos_libclang_dir() {
	local d major best="" best_major=-1
	for d in "$illumos_root"/opt/ooce/llvm-*/lib; do
		compgen -G "$d/libclang.so*" >/dev/null || continue
		major=${d%/lib}
		major=${major##*/llvm-}
		case "$major" in '' | *[!0-9]*) continue ;; esac
		if [ "$major" -gt "$best_major" ]; then
			best=$d
			best_major=$major
		fi
	done
	[ -n "$best" ] || return 1
	echo "$best"
}

# pkg install -v PACKAGE...: pkg(1) exits 4 when there is nothing to do
# (pkg5 client.py EXIT_NOP: everything named is installed already), which
# is not a failure; any other failure is reported with its exit status.
# pkg runs as root, through sudo when the caller is not root.
illumos_pkg_install() {
	local rc=0 as_root=()
	[ "$(id -u)" -eq 0 ] || as_root=(sudo)
	"${as_root[@]}" pkg install -v "$@" || rc=$?
	case "$rc" in
	0 | 4) return 0 ;;
	esac
	echo "pkg install $* failed (exit $rc)" >&2
	return 1
}
