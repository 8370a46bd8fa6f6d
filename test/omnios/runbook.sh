#!/usr/bin/bash
#
# The rvscsi runbook: run as root inside an OmniOS virtual machine (see
# test/omnios/qemu-omnios.sh for one laid out for it) to install rvscsi,
# hand it a virtio-scsi controller, use a disk behind it, and give it back.
# Prints PASS or FAIL for every step and exits non-zero when one failed.
#
# Usage:
#   runbook.sh (--p5p FILE | --source DIR) [--disk cXtYdZ] [--yes]
#
#   --p5p FILE    install this package archive (made by pkg/build.sh on
#                 illumos: target/pkg/rvscsi-<version>.p5p)
#   --source DIR  build it first from the rvscsi tree in DIR
#                 (DIR/pkg/build.sh --no-demo; needs network for rustup and
#                 the Rust crates)
#   --disk D      the scratch disk to use (default: the first disk behind
#                 an rvscsi controller)
#   --yes         allow writing to that disk: 8 MiB at offset 1 MiB are
#                 overwritten. Without it the data steps are skipped
#                 (reported as FAIL, so that an unattended run cannot pass
#                 without them).
#
# Logs of every step are kept in ${TMPDIR:-/var/tmp}/rvscsi-runbook.<time>/.
set -u

p5p=""
src=""
disk=""
yes=0
while [ $# -gt 0 ]; do
	case "$1" in
	--p5p) p5p=$2; shift 2 ;;
	--source) src=$2; shift 2 ;;
	--disk) disk=$2; shift 2 ;;
	--yes) yes=1; shift ;;
	-h|--help) sed -n '2,27p' "$0"; exit 0 ;;
	*) echo "runbook: unknown argument $1" >&2; exit 2 ;;
	esac
done
if [ -z "$p5p" ] && [ -z "$src" ]; then
	echo "runbook: give --p5p FILE or --source DIR" >&2
	exit 2
fi

logs=${TMPDIR:-/var/tmp}/rvscsi-runbook.$(date +%Y%m%d-%H%M%S)
mkdir -p "$logs"
passed=0
failed=0
results=()

# step NAME COMMAND...: runs COMMAND with its output in $logs/NAME.log.
step() {
	local name=$1
	shift
	if "$@" >"$logs/$name.log" 2>&1; then
		results+=("PASS  $name")
		passed=$((passed + 1))
		echo "PASS  $name"
		return 0
	fi
	results+=("FAIL  $name  (see $logs/$name.log)")
	failed=$((failed + 1))
	echo "FAIL  $name  (see $logs/$name.log)"
	sed 's/^/      | /' "$logs/$name.log" | tail -n 15
	return 1
}

note() {
	echo "$*"
}

# ---- the steps -----------------------------------------------------------

check_environment() {
	[ "$(uname -s)" = SunOS ] || { echo "not illumos: $(uname -a)"; return 1; }
	[ "$(id -u)" -eq 0 ] || { echo "run as root"; return 1; }
	[ "$(isainfo -k)" = amd64 ] || { echo "not a 64-bit x86 kernel"; return 1; }
	uname -a
	cat /etc/release 2>/dev/null | head -n 1
}

build_from_source() {
	[ -x "$src/pkg/build.sh" ] || { echo "$src is not an rvscsi tree"; return 1; }
	(cd "$src" && ./pkg/build.sh --no-demo) || return 1
	p5p=$(ls -t "$src"/target/pkg/rvscsi-*.p5p 2>/dev/null | head -n 1)
	[ -n "$p5p" ] || { echo "the build made no .p5p"; return 1; }
	echo "built $p5p"
	# The module check ran as part of the build; show it again.
	(cd "$src" && cargo run --quiet --release -p rvscsi-modcheck -- target/kernel/rvscsi)
}

install_package() {
	[ -f "$p5p" ] || { echo "no package archive $p5p"; return 1; }
	pkg info -g "$p5p" driver/storage/rvscsi || return 1
	pkg install -v -g "$p5p" driver/storage/rvscsi
	rc=$?
	# 4: nothing to do (already installed at this version).
	[ $rc -eq 0 ] || [ $rc -eq 4 ]
}

check_installed() {
	ls -l /kernel/drv/amd64/rvscsi /kernel/drv/rvscsi.conf /usr/sbin/rvscsiadm || return 1
	grep '^rvscsi ' /etc/name_to_major || { echo "rvscsi is not in name_to_major"; return 1; }
	pkg verify -v driver/storage/rvscsi
}

find_controllers() {
	/usr/sbin/rvscsiadm status
	grep -E '"(vioscsi|rvscsi)"$' /etc/path_to_inst || {
		echo "no virtio-scsi controller known to the system"
		return 1
	}
}

take_controllers() {
	/usr/sbin/rvscsiadm take
}

# The physical paths of attached rvscsi instances.
rvscsi_paths() {
	awk '$3 == "\"rvscsi\"" { gsub(/"/, "", $1); print $1 }' /etc/path_to_inst
}

check_attached() {
	prtconf -D | grep -i 'driver name: rvscsi' || {
		echo "no node is attached to rvscsi; if the controller was busy under"
		echo "vioscsi, reboot (the aliases are rvscsi's now) and run again"
		return 1
	}
	modinfo | grep -w rvscsi || { echo "rvscsi is not loaded"; return 1; }
	modinfo | grep -w rvscsi | grep -q 'virtio-scsi HBA' ||
		{ echo "unexpected module description"; return 1; }
	dmesg | grep -i rvscsi | tail -n 20
}

list_disks() {
	format </dev/null >"$logs/format.out" 2>&1
	cat "$logs/format.out"
	local ctl
	for ctl in $(rvscsi_paths); do
		# format prints each disk's physical path on the line after it.
		awk -v c="$ctl/" '
			/^ *[0-9]+\. c[0-9]/ { d = $2; next }
			index($0, c) && d != "" { print d; d = "" }' \
			"$logs/format.out"
	done >"$logs/rvscsi-disks"
	echo "disks behind rvscsi:"
	cat "$logs/rvscsi-disks"
	[ -s "$logs/rvscsi-disks" ]
}

choose_disk() {
	[ -n "$disk" ] || disk=$(head -n 1 "$logs/rvscsi-disks")
	[ -n "$disk" ] || { echo "no disk to use"; return 1; }
	grep -qx "$disk" "$logs/rvscsi-disks" ||
		{ echo "$disk is not behind an rvscsi controller"; return 1; }
	if zpool status -P 2>/dev/null | grep -q "/dev/dsk/$disk"; then
		echo "$disk is part of a ZFS pool: refusing to write to it"
		return 1
	fi
	if mount | grep -q "/dev/dsk/$disk"; then
		echo "$disk has a mounted file system: refusing to write to it"
		return 1
	fi
	[ "$yes" = 1 ] || { echo "pass --yes to allow writing 8 MiB to $disk"; return 1; }
	echo "using $disk"
}

dd_pattern() {
	local raw=/dev/rdsk/${disk}p0
	dd if=/dev/urandom of="$logs/pattern" bs=1024k count=8 || return 1
	dd if="$logs/pattern" of="$raw" bs=1024k seek=1 count=8 || return 1
	dd if="$raw" of="$logs/readback" bs=1024k skip=1 count=8 || return 1
	local a b
	a=$(digest -a sha256 "$logs/pattern")
	b=$(digest -a sha256 "$logs/readback")
	echo "written  $a"
	echo "read     $b"
	[ "$a" = "$b" ]
}

dtrace_probes() {
	dtrace -l -n 'sdt:rvscsi::' | tee "$logs/probes" || return 1
	local p
	for p in rvscsi-cmd-start rvscsi-cmd-done rvscsi-cmd-timeout \
	    rvscsi-cmd-abort rvscsi-reset; do
		grep -qw "$p" "$logs/probes" || { echo "probe $p missing"; return 1; }
	done
	[ -n "$disk" ] || return 0
	local n
	n=$(dtrace -q -n 'sdt:rvscsi::rvscsi-cmd-done { @n = count(); }
	    END { printa("%@d\n", @n); }' \
	    -c "dd if=/dev/rdsk/${disk}p0 of=/dev/null bs=1024k count=4" |
	    tail -n 1)
	echo "rvscsi-cmd-done fired $n times during a 4 MiB read"
	[ "${n:-0}" -gt 0 ]
}

release_controllers() {
	/usr/sbin/rvscsiadm release
}

unload_module() {
	local id i
	for i in 1 2 3 4 5; do
		id=$(modinfo | awk '$6 == "rvscsi" { print $1 }')
		[ -n "$id" ] || { echo "rvscsi is not loaded"; return 0; }
		modunload -i "$id" && break
		sleep 2
	done
	if modinfo | awk '$6 == "rvscsi"' | grep -q .; then
		echo "rvscsi is still loaded (a disk behind it in use?)"
		return 1
	fi
}

back_to_vioscsi() {
	devfsadm -i vioscsi
	prtconf -D | grep -i 'driver name: vioscsi' || {
		echo "vioscsi has not attached again; a reboot completes the hand-back"
		return 1
	}
}

# ---- the run -------------------------------------------------------------

note "rvscsi runbook; logs in $logs"
step environment check_environment || exit 1
if [ -n "$src" ]; then
	step build build_from_source || exit 1
fi
step install install_package || exit 1
step installed check_installed
step controllers find_controllers || exit 1
step take take_controllers
step attach check_attached
data=0
if step disks list_disks && step choose-disk choose_disk; then
	data=1
	step dd-write-read dd_pattern
fi
[ "$data" = 1 ] || disk=""
step dtrace dtrace_probes
step release release_controllers
step unload unload_module
step vioscsi-again back_to_vioscsi

echo
echo "summary:"
printf '  %s\n' "${results[@]}"
if [ "$data" = 0 ]; then
	echo "  (the data steps did not run)"
	failed=$((failed + 1))
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
