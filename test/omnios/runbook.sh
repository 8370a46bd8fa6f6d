#!/usr/bin/bash
#
# The rvscsi runbook: run as root inside an OmniOS virtual machine (see
# test/omnios/qemu-omnios.sh for one laid out for it) to install rvscsi,
# hand it the virtio-scsi controllers, use a disk behind one, give them
# back and uninstall it. Prints PASS or FAIL for every step (with its log)
# and exits non-zero when one failed.
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
# illumos moves an attached controller to another driver only at a
# reconfiguration boot (update_drv(8)), so the runbook has three phases
# with such a boot between them. Run it with the same arguments after each
# boot; it finds where it is from "rvscsiadm status" and its own record,
# and says what to do next:
#   1. environment, build (with --source), install, installed, controllers,
#      take                                   then: reboot -- -r
#   2. environment, attach, disks, choose-disk, dd-write-read, dtrace,
#      release                                then: reboot -- -r
#   3. environment, unload, vioscsi-again, uninstall
#
# Logs of every step are kept in ${TMPDIR:-/var/tmp}/rvscsi-runbook.<time>/;
# the record of the phases in /var/tmp/rvscsi-runbook.state (on disk, so
# it outlives the reboots). RUNBOOK_ROOT (default /) is the root of the
# system whose files are read, for the project's tests.
# shellcheck disable=SC2317 # the step functions are called through step()
set -u

p5p=""
src=""
disk=""
yes=0
args=("$@")
while [ $# -gt 0 ]; do
	case "$1" in
	--p5p) p5p=${2:?--p5p needs a file}; shift 2 ;;
	--source) src=${2:?--source needs a directory}; shift 2 ;;
	--disk) disk=${2:?--disk needs a disk}; shift 2 ;;
	--yes) yes=1; shift ;;
	-h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 && !/shellcheck/' "$0"; exit 0 ;;
	*) echo "runbook: unknown argument $1" >&2; exit 2 ;;
	esac
done
if [ -z "$p5p" ] && [ -z "$src" ]; then
	echo "runbook: give --p5p FILE or --source DIR" >&2
	exit 2
fi

R=${RUNBOOK_ROOT:-}
export RVSCSIADM_ROOT=$R
rvscsiadm=$R/usr/sbin/rvscsiadm
record=$R/var/tmp/rvscsi-runbook.state
logs=${TMPDIR:-/var/tmp}/rvscsi-runbook.$(date +%Y%m%d-%H%M%S)
mkdir -p "$logs"
passed=0
failed=0
results=()
again="$0 ${args[*]}"

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

# The summary, what to do next, and the exit status.
finish() {
	echo
	echo "summary:"
	printf '  %s\n' "${results[@]}"
	echo "$passed passed, $failed failed"
	[ -z "${1:-}" ] || echo "next: $1"
	[ "$failed" -eq 0 ]
	exit $?
}

handover_state() {
	[ -x "$rvscsiadm" ] || { echo not-installed; return; }
	"$rvscsiadm" status 2>/dev/null | sed -n 's/^state: //p'
}

# How many nodes the running system binds to driver $1 and has attached:
# prtconf -D names the driver of every bound node, prtconf (without -D)
# marks the ones not attached, in the same order
# (usr/src/cmd/prtconf/pdevinfo.c).
attached_to() {
	paste -d '|' <(prtconf) <(prtconf -D) |
	    awk -F'|' -v d="(driver name: $1)" \
	    'index($2, d) && $1 !~ /driver not attached/ { n++ } END { print n + 0 }'
}

# ---- the steps -----------------------------------------------------------

check_environment() {
	[ "$(uname -s)" = SunOS ] || { echo "not illumos: $(uname -a)"; return 1; }
	[ "$(id -u)" -eq 0 ] || { echo "run as root"; return 1; }
	[ "$(isainfo -k)" = amd64 ] || { echo "not a 64-bit x86 kernel"; return 1; }
	uname -a
	head -n 1 "$R/etc/release" 2>/dev/null
	echo "hand-over state: $(handover_state)"
}

build_from_source() {
	[ -x "$src/pkg/build.sh" ] || { echo "$src is not an rvscsi tree"; return 1; }
	(cd "$src" && ./pkg/build.sh --no-demo) || return 1
	# shellcheck disable=SC2012 # the newest archive by time
	p5p=$(ls -t "$src"/target/pkg/rvscsi-*.p5p 2>/dev/null | head -n 1)
	[ -n "$p5p" ] || { echo "the build made no .p5p"; return 1; }
	echo "built $p5p"
}

install_package() {
	[ -f "$p5p" ] || { echo "no package archive $p5p"; return 1; }
	pkg info -g "$p5p" driver/storage/rvscsi || return 1
	local rc=0
	pkg install -v -g "$p5p" driver/storage/rvscsi || rc=$?
	# 4: nothing to do (already installed at this version; pkg5 EXIT_NOP).
	[ "$rc" -eq 0 ] || [ "$rc" -eq 4 ]
}

check_installed() {
	ls -l "$R/kernel/drv/amd64/rvscsi" "$R/kernel/drv/rvscsi.conf" "$rvscsiadm" || return 1
	grep '^rvscsi ' "$R/etc/name_to_major" || { echo "rvscsi is not in name_to_major"; return 1; }
	pkg verify -v driver/storage/rvscsi
}

find_controllers() {
	"$rvscsiadm" status || return 1
	[ "$(handover_state)" = vioscsi ] || { echo "vioscsi does not hold the aliases"; return 1; }
	[ "$(attached_to vioscsi)" -gt 0 ] || {
		echo "no virtio-scsi controller attached to vioscsi"
		return 1
	}
}

take_controllers() {
	"$rvscsiadm" take || return 1
	case "$(handover_state)" in
	rvscsi | rvscsi-after-reboot) ;;
	*) echo "rvscsiadm take left the state at $(handover_state)"; return 1 ;;
	esac
	echo taken >"$record"
}

# The physical paths of rvscsi instances.
rvscsi_paths() {
	awk '$3 == "\"rvscsi\"" { gsub(/"/, "", $1); print $1 }' "$R/etc/path_to_inst"
}

check_attached() {
	"$rvscsiadm" status
	[ "$(attached_to rvscsi)" -gt 0 ] || {
		echo "no controller is attached to rvscsi (see dmesg)"
		return 1
	}
	prtconf -D | grep 'driver name: rvscsi'
	modinfo | grep -w rvscsi || { echo "rvscsi is not loaded"; return 1; }
	modinfo | grep -w rvscsi | grep -q 'virtio-scsi HBA' ||
		{ echo "unexpected module description"; return 1; }
	dmesg | grep -i rvscsi | tail -n 20
	return 0
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
	"$rvscsiadm" release || return 1
	case "$(handover_state)" in
	vioscsi | vioscsi-after-reboot) ;;
	*) echo "rvscsiadm release left the state at $(handover_state)"; return 1 ;;
	esac
	echo released >"$record"
}

unload_module() {
	local id try
	for try in 1 2 3 4 5; do
		id=$(modinfo | awk '$6 == "rvscsi" { print $1 }')
		[ -n "$id" ] || { echo "rvscsi is not loaded"; return 0; }
		modunload -i "$id" && break
		echo "modunload failed (try $try of 5)"
		sleep 2
	done
	if modinfo | awk '$6 == "rvscsi"' | grep -q .; then
		echo "rvscsi is still loaded (a disk behind it in use?)"
		return 1
	fi
}

back_to_vioscsi() {
	"$rvscsiadm" status
	[ "$(handover_state)" = vioscsi ] || { echo "vioscsi does not hold the aliases"; return 1; }
	[ "$(attached_to vioscsi)" -gt 0 ] || {
		echo "vioscsi has not attached again"
		return 1
	}
	prtconf -D | grep 'driver name: vioscsi'
}

uninstall_package() {
	pkg uninstall -v driver/storage/rvscsi || return 1
	if grep '^rvscsi ' "$R/etc/name_to_major"; then
		echo "rvscsi is still in name_to_major"
		return 1
	fi
	# The package's driver action runs rem_drv, which would have dropped
	# any alias rvscsi still held: vioscsi must still have its own.
	grep '^vioscsi ' "$R/etc/driver_aliases" || { echo "vioscsi has lost its aliases"; return 1; }
	rm -f "$record"
}

# ---- the run -------------------------------------------------------------

echo "rvscsi runbook; logs in $logs"
step environment check_environment || finish
phase_record=$(cat "$record" 2>/dev/null)
state=$(handover_state)
case "$state" in
rvscsi-after-reboot | vioscsi-after-reboot)
	echo "the hand-over waits for a reconfiguration boot ($state)"
	results+=("FAIL  reboot  (not done yet)")
	failed=$((failed + 1))
	finish "reboot -- -r, then run again: $again"
	;;
mixed)
	"$rvscsiadm" status
	results+=("FAIL  hand-over  (interrupted: the aliases are split)")
	failed=$((failed + 1))
	finish "$rvscsiadm take (or release), then run again: $again"
	;;
esac

if [ "$state" != rvscsi ] && [ "$phase_record" != released ]; then
	echo "== phase 1: install and take"
	if [ -n "$src" ]; then
		step build build_from_source || finish
	fi
	step install install_package || finish
	step installed check_installed
	step controllers find_controllers || finish
	step take take_controllers || finish
	if [ "$(handover_state)" != rvscsi ]; then
		finish "reboot -- -r (a reconfiguration boot), then run again: $again"
	fi
	state=rvscsi
fi

if [ "$state" = rvscsi ]; then
	echo "== phase 2: use the disks, release"
	step attach check_attached
	data=0
	if step disks list_disks && step choose-disk choose_disk; then
		data=1
		step dd-write-read dd_pattern
	fi
	if [ "$data" = 0 ]; then
		disk=""
		results+=("FAIL  data  (the data steps did not run)")
		failed=$((failed + 1))
	fi
	step dtrace dtrace_probes
	step release release_controllers || finish
	if [ "$(handover_state)" != vioscsi ]; then
		finish "reboot -- -r (a reconfiguration boot), then run again: $again"
	fi
fi

echo "== phase 3: back to vioscsi, uninstall"
step unload unload_module
step vioscsi-again back_to_vioscsi
step uninstall uninstall_package
finish
