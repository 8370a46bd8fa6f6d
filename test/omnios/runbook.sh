#!/usr/bin/bash
#
# The rvscsi runbook: run as root inside an OmniOS virtual machine (see
# test/omnios/qemu-omnios.sh for one laid out for it) to install rvscsi,
# hand it the virtio-scsi controllers (from vioscsi) and the VMware PVSCSI
# controllers (from pvscsi), use a disk behind one of each family, detach
# and attach the driver again, give the controllers back to the in-tree
# drivers and uninstall it.
# Prints PASS or FAIL for every step (with its log) and exits non-zero
# when one failed.
#
# Usage:
#   runbook.sh (--p5p FILE | --source DIR) [--disk cXtYdZ]
#              [--pvscsi-disk cXtYdZ] [--yes]
#
#   --p5p FILE    install this package archive (made by pkg/build.sh on
#                 illumos: target/pkg/rvscsi-<version>.p5p)
#   --source DIR  build it first from the rvscsi tree in DIR
#                 (DIR/pkg/build.sh --no-demo; needs network for rustup and
#                 the Rust crates)
#   --disk D      the scratch disk to use behind a virtio-scsi controller
#                 (default: the first disk behind an rvscsi controller that
#                 was not pvscsi's)
#   --pvscsi-disk D  the scratch disk to use behind a PVSCSI controller
#                 (default: the first disk behind an rvscsi controller that
#                 was pvscsi's)
#   --yes         allow writing to those disks: 8 MiB at offset 1 MiB are
#                 overwritten. Without it the data steps are skipped
#                 (reported as FAIL, so that an unattended run cannot pass
#                 without them).
#
# An attached controller keeps its driver until it detaches, and at every
# boot the kernel binds each device from /etc/driver_aliases (update_drv(8);
# bind_node() in usr/src/uts/common/os/devcfg.c), so the hand-over takes a
# reboot; removing the package takes another, into the new boot environment
# that pkg(1) makes for it. The runbook has four phases with a reboot
# between them. Run it with the same arguments after each boot; it finds
# where it is from "rvscsiadm status", pkg(1), beadm(8) and its own record,
# and says what to do next:
#   1. environment, build (with --source), install, installed, controllers,
#      take                                   then: reboot
#   2. environment, attach, disks, choose-disk, dd-write-read,
#      choose-disk-pvscsi, dd-write-read-pvscsi, dtrace, detach, reattach,
#      disks-again, release
#                                             then: reboot
#   3. environment, not-loaded, in-tree-again, uninstall
#                                             then: reboot (into the new BE)
#   4. environment, uninstalled, in-tree-final
#
# The controllers step records which controller each in-tree driver had
# (its physical path) in /var/tmp/rvscsi-runbook.controllers: the later
# phases check each of them, and tell the families apart by it (a PCI
# node's name comes from its subsystem IDs, which QEMU sets to its own for
# the PVSCSI device, so the name does not say).
#
# Logs of every step are kept in ${TMPDIR:-/var/tmp}/rvscsi-runbook.<time>/;
# the record of the phases in /var/tmp/rvscsi-runbook.state (on disk, so
# it outlives the reboots), beside the record of the controllers. A record written after pkg(1) cloned the boot
# environment is not in the clone, so what a record says about a new BE is
# checked against the BE that is booted (beadm list). RUNBOOK_ROOT
# (default /) is the root of the system whose files are read, for the
# project's tests.
# shellcheck disable=SC2317 # the step functions are called through step()
set -u

p5p=""
src=""
disk=""
pvdisk=""
yes=0
args=("$@")
while [ $# -gt 0 ]; do
	case "$1" in
	--p5p) p5p=${2:?--p5p needs a file}; shift 2 ;;
	--source) src=${2:?--source needs a directory}; shift 2 ;;
	--disk) disk=${2:?--disk needs a disk}; shift 2 ;;
	--pvscsi-disk) pvdisk=${2:?--pvscsi-disk needs a disk}; shift 2 ;;
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
controllers=$R/var/tmp/rvscsi-runbook.controllers
# The in-tree drivers whose controllers rvscsi takes (rvscsiadm's table).
intree="vioscsi pvscsi"
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

# The physical paths of the instances of driver $1 (path_to_inst(5)).
instances_of() {
	awk -v d="\"$1\"" '$3 == d { gsub(/"/, "", $1); print $1 }' "$R/etc/path_to_inst"
}

# Whether the node at physical path $1 is bound to driver $2 and attached:
# its instance of $2 (path_to_inst) in prtconf's lines, as attached_to.
attached_at() {
	local inst
	inst=$(awk -v p="\"$1\"" -v d="\"$2\"" '$1 == p && $3 == d { print $2; exit }' \
	    "$R/etc/path_to_inst")
	[ -n "$inst" ] || return 1
	paste -d '|' <(prtconf) <(prtconf -D) |
	    awk -F'|' -v w="instance #$inst (driver name: $2)" \
	    'index($2, w) && $1 !~ /driver not attached/ { f = 1 } END { exit !f }'
}

# Checks that every recorded controller ("DRIVER PATH" lines of
# $controllers) is attached to driver $1, or to its own driver when $1 is
# empty.
recorded_attached() {
	local d p want bad=0
	[ -s "$controllers" ] || { echo "no record of the controllers ($controllers)"; return 1; }
	while read -r d p; do
		want=${1:-$d}
		if attached_at "$p" "$want"; then
			echo "the $d controller $p is attached to $want"
		else
			echo "the $d controller $p is not attached to $want"
			bad=1
		fi
	done <"$controllers"
	[ "$bad" = 0 ]
}

# ---- the steps -----------------------------------------------------------

check_environment() {
	[ "$(uname -s)" = SunOS ] || { echo "not illumos: $(uname -a)"; return 1; }
	[ "$(id -u)" -eq 0 ] || { echo "run as root"; return 1; }
	[ "$(isainfo -k)" = amd64 ] || { echo "not a 64-bit x86 kernel"; return 1; }
	uname -a
	head -n 1 "$R/etc/release" 2>/dev/null
	echo "hand-over state: $(handover_state)"
	echo "boot environment: $(booted_be) (active on reboot: $(next_be))"
}

build_from_source() {
	[ -x "$src/pkg/build.sh" ] || { echo "$src is not an rvscsi tree"; return 1; }
	(cd "$src" && ./pkg/build.sh --no-demo) || return 1
	# shellcheck disable=SC2012 # the newest archive by time
	p5p=$(ls -t "$src"/target/pkg/rvscsi-*.p5p 2>/dev/null | head -n 1)
	[ -n "$p5p" ] || { echo "the build made no .p5p"; return 1; }
	echo "built $p5p"
}

# The booted boot environment, and the one active on the next boot
# (beadm list -H: "NAME;UUID;FLAGS;...", N booted, R next boot;
# usr/src/cmd/beadm/beadm.c print_be_nodes).
booted_be() {
	beadm list -H 2>/dev/null | awk -F';' '$3 ~ /N/ { print $1; exit }'
}
next_be() {
	beadm list -H 2>/dev/null | awk -F';' '$3 ~ /R/ { print $1; exit }'
}

# The BE that pkg(1) made, from its "New BE: NAME" line (pkg5 bootenv.py
# activate_image), or nothing.
new_be_of() {
	sed -n 's/^New BE: *\([^ ]*\).*/\1/p' "$1" | tail -n 1
}

install_package() {
	[ -f "$p5p" ] || { echo "no package archive $p5p"; return 1; }
	pkg info -g "$p5p" driver/storage/rvscsi || return 1
	local rc=0 be
	pkg install -v -g "$p5p" driver/storage/rvscsi >"$logs/pkg-install.out" 2>&1 || rc=$?
	cat "$logs/pkg-install.out"
	# 4: nothing to do (already installed at this version; pkg5 EXIT_NOP).
	[ "$rc" -eq 0 ] || [ "$rc" -eq 4 ] || return 1
	# A new install is done in place. An update of the module (another
	# version installed already) replaces a reboot-needed file, so pkg
	# puts it in a new boot environment and leaves the running one as it
	# was: the new version is there only after a reboot into it.
	be=$(new_be_of "$logs/pkg-install.out")
	if [ -n "$be" ]; then
		[ "$(next_be)" = "$be" ] || { echo "pkg made BE $be but it is not active on reboot"; return 1; }
		echo "install-new-be $be" >"$record"
		echo "the update is in the new boot environment $be"
	fi
	return 0
}

check_installed() {
	ls -l "$R/kernel/drv/amd64/rvscsi" "$R/kernel/drv/rvscsi.conf" "$rvscsiadm" || return 1
	grep '^rvscsi ' "$R/etc/name_to_major" || { echo "rvscsi is not in name_to_major"; return 1; }
	pkg verify -v driver/storage/rvscsi
}

# The controllers of each in-tree driver, attached, recorded for the later
# phases: one of each family at least.
find_controllers() {
	"$rvscsiadm" status || return 1
	[ "$(handover_state)" = in-tree ] || { echo "the in-tree drivers do not hold the aliases"; return 1; }
	local d p bad=0
	: >"$controllers.new"
	for d in $intree; do
		for p in $(instances_of "$d"); do
			if attached_at "$p" "$d"; then
				echo "$d $p" >>"$controllers.new"
			fi
		done
		if ! grep -q "^$d " "$controllers.new"; then
			case "$d" in
			vioscsi) echo "no virtio-scsi controller attached to vioscsi" ;;
			pvscsi) echo "no PVSCSI controller attached to pvscsi (the VM needs one, and the" \
			    "in-tree driver/storage/pvscsi package to drive it first)" ;;
			esac
			bad=1
		fi
	done
	cat "$controllers.new"
	[ "$bad" = 0 ] || { rm -f "$controllers.new"; return 1; }
	mv "$controllers.new" "$controllers"
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
	recorded_attached rvscsi || return 1
	modinfo | grep -w rvscsi || { echo "rvscsi is not loaded"; return 1; }
	modinfo | grep -w rvscsi | grep -q 'virtio/pvscsi HBA' ||
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
	done | sort -u >"$logs/rvscsi-disks"
	# Those behind the controllers that were pvscsi's.
	local p
	awk '$1 == "pvscsi" { print $2 }' "$controllers" 2>/dev/null | while read -r p; do
		awk -v c="$p/" '
			/^ *[0-9]+\. c[0-9]/ { d = $2; next }
			index($0, c) && d != "" { print d; d = "" }' \
			"$logs/format.out"
	done | sort -u >"$logs/pvscsi-disks"
	echo "disks behind rvscsi:"
	cat "$logs/rvscsi-disks"
	echo "of which behind a PVSCSI controller:"
	cat "$logs/pvscsi-disks"
	[ -s "$logs/rvscsi-disks" ]
}

# usable_disk D: D is behind rvscsi, in no pool, not mounted, and --yes
# allows writing to it.
usable_disk() {
	local d=$1
	grep -qx "$d" "$logs/rvscsi-disks" ||
		{ echo "$d is not behind an rvscsi controller"; return 1; }
	if zpool status -P 2>/dev/null | grep -q "/dev/dsk/$d"; then
		echo "$d is part of a ZFS pool: refusing to write to it"
		return 1
	fi
	if mount | grep -q "/dev/dsk/$d"; then
		echo "$d has a mounted file system: refusing to write to it"
		return 1
	fi
	[ "$yes" = 1 ] || { echo "pass --yes to allow writing 8 MiB to $d"; return 1; }
	echo "using $d"
}

# A disk behind a virtio-scsi controller: one not behind a PVSCSI one.
choose_disk() {
	[ -n "$disk" ] || disk=$(grep -vxF -f "$logs/pvscsi-disks" "$logs/rvscsi-disks" | head -n 1)
	[ -n "$disk" ] || { echo "no disk behind a virtio-scsi controller to use"; return 1; }
	! grep -qx "$disk" "$logs/pvscsi-disks" ||
		{ echo "$disk is behind a PVSCSI controller"; return 1; }
	usable_disk "$disk"
}

choose_pvscsi_disk() {
	[ -n "$pvdisk" ] || pvdisk=$(head -n 1 "$logs/pvscsi-disks")
	[ -n "$pvdisk" ] || { echo "no disk behind a PVSCSI controller to use"; return 1; }
	grep -qx "$pvdisk" "$logs/pvscsi-disks" ||
		{ echo "$pvdisk is not behind a PVSCSI controller"; return 1; }
	usable_disk "$pvdisk"
}

# dd_pattern D: 8 MiB of random data written to disk D at offset 1 MiB and
# read back.
dd_pattern() {
	local raw=/dev/rdsk/${1}p0
	dd if=/dev/urandom of="$logs/pattern.$1" bs=1024k count=8 || return 1
	dd if="$logs/pattern.$1" of="$raw" bs=1024k seek=1 count=8 || return 1
	dd if="$raw" of="$logs/readback.$1" bs=1024k skip=1 count=8 || return 1
	local a b
	a=$(digest -a sha256 "$logs/pattern.$1")
	b=$(digest -a sha256 "$logs/readback.$1")
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
	in-tree | in-tree-after-reboot) ;;
	*) echo "rvscsiadm release left the state at $(handover_state)"; return 1 ;;
	esac
	echo released >"$record"
}

rvscsi_module_id() {
	modinfo | awk '$6 == "rvscsi" { print $1; exit }'
}

# The system log lines written since line $1 of /var/adm/messages (where
# syslogd puts the kernel's messages; dmesg(8) prints the end of it).
messages_since() {
	tail -n +"$(($1 + 1))" "$R/var/adm/messages" 2>/dev/null
}

messages_lines() {
	wc -l <"$R/var/adm/messages" 2>/dev/null || echo 0
}

# modunload runs the driver's whole teardown on the real kernel:
# moduninstall() (usr/src/uts/common/os/modctl.c) detaches every instance
# first (detach_driver: ndi_devi_unconfig_driver with NDI_DETACH_DRIVER,
# which unconfigures the iport and its disks), answers EBUSY if one stays
# attached, and only then calls _fini. No disk behind rvscsi is open here
# (choose-disk refused pools and mounts, the dd steps have ended). The
# system log must then hold no warning from rvscsi, in particular not
# that the device did not finish its reset ("kept, not freed").
detach_driver() {
	local id before n
	id=$(rvscsi_module_id)
	[ -n "$id" ] || { echo "rvscsi is not loaded"; return 1; }
	before=$(messages_lines)
	modunload -i "$id" || { echo "modunload -i $id failed (a disk behind rvscsi in use?)"; return 1; }
	sleep 1 # syslogd writes what the kernel logged
	[ -z "$(rvscsi_module_id)" ] || { echo "rvscsi is still loaded"; return 1; }
	n=$(attached_to rvscsi)
	[ "$n" -eq 0 ] || { echo "$n controller(s) still attached to rvscsi"; return 1; }
	prtconf -D | grep 'driver name: rvscsi'
	messages_since "$before" >"$logs/detach-messages"
	echo "system log while detaching:"
	cat "$logs/detach-messages"
	if grep -i 'rvscsi' "$logs/detach-messages" | grep -qi 'warning\|kept, not freed'; then
		echo "rvscsi warned while detaching"
		return 1
	fi
}

# devfsadm -i loads the driver and attaches it to the nodes bound to it
# (devfsadm(8)): the controllers and their disks come back.
reattach_driver() {
	local before
	before=$(messages_lines)
	devfsadm -i rvscsi || return 1
	[ "$(attached_to rvscsi)" -gt 0 ] || { echo "no controller attached to rvscsi again"; return 1; }
	modinfo | grep -w rvscsi || { echo "rvscsi is not loaded"; return 1; }
	sleep 1
	messages_since "$before"
	if messages_since "$before" | grep -i 'rvscsi' | grep -qi 'warning'; then
		echo "rvscsi warned while attaching"
		return 1
	fi
}

disks_again() {
	cp "$logs/rvscsi-disks" "$logs/rvscsi-disks.before"
	list_disks || return 1
	if ! cmp -s "$logs/rvscsi-disks.before" "$logs/rvscsi-disks"; then
		echo "the disks behind rvscsi differ from before the detach:"
		diff "$logs/rvscsi-disks.before" "$logs/rvscsi-disks"
		return 1
	fi
}

# After the release and the reboot nothing binds rvscsi, so nothing loads
# it.
check_not_loaded() {
	local n
	n=$(attached_to rvscsi)
	[ "$n" -eq 0 ] || { echo "$n controller(s) still attached to rvscsi"; return 1; }
	if [ -n "$(rvscsi_module_id)" ]; then
		modinfo | grep -w rvscsi
		echo "rvscsi is still loaded"
		return 1
	fi
	echo "rvscsi is not loaded"
}

# Each controller is its in-tree driver's again.
back_to_in_tree() {
	"$rvscsiadm" status
	[ "$(handover_state)" = in-tree ] || { echo "the in-tree drivers do not hold the aliases"; return 1; }
	recorded_attached || return 1
	prtconf -D | grep -e 'driver name: vioscsi' -e 'driver name: pvscsi'
}

# pkg uninstall removes the module, a reboot-needed file, so it runs in a
# new boot environment (pkg5: actuator.py reboot_needed(), api.py
# __set_be_creation): the clone is changed (its driver action runs
# "rem_drv -b <clone>"), activated for the next boot, and the running
# system keeps rvscsi until the reboot into it.
uninstall_package() {
	local be
	echo "uninstalling $(booted_be)" >"$record"
	pkg uninstall -v driver/storage/rvscsi >"$logs/pkg-uninstall.out" 2>&1 || {
		cat "$logs/pkg-uninstall.out"
		return 1
	}
	cat "$logs/pkg-uninstall.out"
	be=$(new_be_of "$logs/pkg-uninstall.out")
	[ -n "$be" ] || { echo "pkg uninstall made no new boot environment"; return 1; }
	[ "$be" != "$(booted_be)" ] || { echo "the new BE $be is the booted one"; return 1; }
	[ "$(next_be)" = "$be" ] || { echo "the new BE $be is not active on reboot"; return 1; }
	echo "uninstalled $be" >"$record"
	echo "rvscsi is removed in the boot environment $be, active on reboot"
}

# After the reboot into the BE the uninstall made.
check_uninstalled() {
	local want
	want=$(awk '$1 == "uninstalled" { print $2 }' "$record" 2>/dev/null)
	echo "booted: $(booted_be)"
	if [ -n "$want" ] && [ "$(booted_be)" != "$want" ]; then
		echo "booted $(booted_be), not $want"
		return 1
	fi
	if pkg list -q driver/storage/rvscsi; then
		echo "driver/storage/rvscsi is still installed"
		return 1
	fi
	if grep '^rvscsi ' "$R/etc/name_to_major"; then
		echo "rvscsi is still in name_to_major"
		return 1
	fi
	if grep '^rvscsi ' "$R/etc/driver_aliases"; then
		echo "rvscsi still has aliases"
		return 1
	fi
	for f in "$R/kernel/drv/amd64/rvscsi" "$R/kernel/drv/rvscsi.conf" "$rvscsiadm"; do
		[ ! -e "$f" ] || { echo "$f is still there"; return 1; }
	done
	[ -z "$(rvscsi_module_id)" ] || { echo "rvscsi is loaded"; return 1; }
}

# The package's driver action ran rem_drv, which would have dropped any
# alias rvscsi still held: vioscsi and pvscsi must have their own and their
# controllers.
check_in_tree_final() {
	local d
	for d in $intree; do
		grep "^$d " "$R/etc/driver_aliases" || { echo "$d has lost its aliases"; return 1; }
	done
	recorded_attached || return 1
	prtconf -D | grep -e 'driver name: vioscsi' -e 'driver name: pvscsi'
}

# ---- the run -------------------------------------------------------------

waiting_for_reboot() {
	results+=("FAIL  reboot  (not done yet: $1)")
	failed=$((failed + 1))
	finish "reboot, then run again: $again"
}

echo "rvscsi runbook; logs in $logs"
step environment check_environment || finish
read -r phase_record record_be 2>/dev/null <"$record" || true
phase_record=${phase_record:-}
record_be=${record_be:-}
booted=$(booted_be)

# A new boot environment waiting for its reboot (the record is in the BE
# that wrote it; in the new BE it is absent or older, or, if /var/tmp is
# shared by the BEs, names the BE that is now booted).
case "$phase_record" in
install-new-be)
	if [ "$booted" != "$record_be" ]; then
		echo "the updated package is in the boot environment $record_be"
		waiting_for_reboot "into $record_be"
	fi
	rm -f "$record"
	phase_record=""
	;;
uninstalled)
	if [ "$booted" != "$record_be" ]; then
		echo "rvscsi is removed in the boot environment $record_be"
		waiting_for_reboot "into $record_be"
	fi
	;;
esac

if ! pkg list -q driver/storage/rvscsi 2>/dev/null &&
    { [ "$phase_record" = uninstalling ] || [ "$phase_record" = uninstalled ]; }; then
	echo "== phase 4: after the uninstall"
	step uninstalled check_uninstalled
	step in-tree-final check_in_tree_final
	[ "$failed" -ne 0 ] || rm -f "$record" "$controllers"
	finish
fi

state=$(handover_state)
case "$state" in
rvscsi-after-reboot | in-tree-after-reboot)
	echo "the hand-over waits for a reboot ($state)"
	waiting_for_reboot "$state"
	;;
mixed)
	"$rvscsiadm" status
	results+=("FAIL  hand-over  (interrupted: the aliases are split)")
	failed=$((failed + 1))
	finish "$rvscsiadm take (or release), then run again: $again"
	;;
esac

if [ "$state" != rvscsi ] && [ "$phase_record" != released ] &&
    [ "$phase_record" != uninstalling ]; then
	echo "== phase 1: install and take"
	if [ -n "$src" ]; then
		step build build_from_source || finish
	fi
	step install install_package || finish
	read -r phase_record record_be 2>/dev/null <"$record" || true
	if [ "${phase_record:-}" = install-new-be ]; then
		finish "reboot (into the boot environment $record_be), then run again: $again"
	fi
	step installed check_installed
	step controllers find_controllers || finish
	step take take_controllers || finish
	if [ "$(handover_state)" != rvscsi ]; then
		finish "reboot, then run again: $again"
	fi
	state=rvscsi
fi

if [ "$state" = rvscsi ]; then
	echo "== phase 2: use the disks, detach and attach again, release"
	step attach check_attached
	data=0
	if step disks list_disks; then
		if step choose-disk choose_disk; then
			data=$((data + 1))
			step dd-write-read dd_pattern "$disk"
		else
			disk=""
		fi
		if step choose-disk-pvscsi choose_pvscsi_disk; then
			data=$((data + 1))
			step dd-write-read-pvscsi dd_pattern "$pvdisk"
		fi
	else
		disk=""
	fi
	if [ "$data" != 2 ]; then
		results+=("FAIL  data  (the data steps did not run for both families)")
		failed=$((failed + 1))
	fi
	step dtrace dtrace_probes
	if step detach detach_driver; then
		step reattach reattach_driver && step disks-again disks_again
	fi
	# rvscsi must be attached for release to leave it something to give
	# back at the reboot; a failed reattach still releases.
	step release release_controllers || finish
	if [ "$(handover_state)" != in-tree ]; then
		finish "reboot, then run again: $again"
	fi
fi

echo "== phase 3: back to the in-tree drivers, uninstall"
step not-loaded check_not_loaded
step in-tree-again back_to_in_tree || finish
step uninstall uninstall_package || finish
finish "reboot (into the boot environment $(next_be)), then run again: $again"
