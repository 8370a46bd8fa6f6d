# shellcheck shell=bash disable=SC2016 # awk programs, expanded by awk
#
# Shared by the illumos stand-ins (test/omnios/standins): what they were
# called with goes to $STANDIN_LOG, and the system they act on lives under
# $STANDIN_SYS, a scratch root laid out like an illumos one:
#   etc/driver_aliases, etc/name_to_major, etc/path_to_inst  the binding files
#   .kernel/nodes     the device tree as the running kernel has it, one node a
#                     line: PATH NODENAME ALIAS DRIVER ATTACHED BUSY
#                     (DRIVER "-" when unbound; ATTACHED, BUSY 0 or 1; BUSY:
#                     a disk behind it is open, so it cannot detach)
#   .kernel/aliases   the running kernel's alias bindings (DRIVER "ALIAS"),
#                     read from etc/driver_aliases at boot (standins/boot)
#   .kernel/modules   loaded modules: ID NAME DESCRIPTION
#   var/pkg/installed installed package names, one a line
# The tests build such a root, run the project's scripts with standins/bin
# first on PATH, and assert on the log and on the files.

standin_sys=${STANDIN_SYS:?stand-in: STANDIN_SYS is not set}
# The name logged: the command's base name, or for the tools that exist in
# two versions (sysroot/usr/bin/ld and sysroot/usr/gnu/bin/ld) the path
# inside the scratch system, set by the tool before it logs.
standin_name=${standin_name:-$(basename "$0")}

# Logs "name arg..." with every argument that holds a space or a quote put
# in single quotes, as the man pages write them.
standin_log() {
	local line=$standin_name a
	for a in "$@"; do
		case "$a" in
		*[[:space:]\"\']* | '') line="$line '$a'" ;;
		*) line="$line $a" ;;
		esac
	done
	printf '%s\n' "$line" >>"${STANDIN_LOG:?stand-in: STANDIN_LOG is not set}"
	# STANDIN_FAIL: a logged command line (or its start) that is to fail
	# before it changes anything, for the tests of what a script does when
	# a command fails.
	case "$line" in
	"${STANDIN_FAIL:-}"*)
		if [ -n "${STANDIN_FAIL:-}" ]; then
			echo "$standin_name: failed (injected by the test: STANDIN_FAIL)" >&2
			exit 1
		fi
		;;
	esac
}

# Stops loudly on a form of the command the stand-in does not model: a
# script that starts using it must get a stand-in that does.
standin_unmodelled() {
	echo "stand-in $standin_name: not modelled: $*" >&2
	exit 99
}

# The driver that driver_aliases binds alias $1 to, or nothing.
standin_alias_owner() {
	awk -v a="\"$1\"" '$2 == a || $2 == substr(a, 2, length(a) - 2) { print $1; exit }' \
	    "$standin_sys/etc/driver_aliases"
}

standin_driver_installed() {
	awk -v d="$1" '$1 == d { f = 1 } END { exit !f }' "$standin_sys/etc/name_to_major"
}

# Splits an update_drv/add_drv -i list ('"a" "b"') into bare aliases.
standin_split_aliases() {
	local a
	for a in $1; do
		a=${a#\"}
		printf '%s\n' "${a%\"}"
	done
}

# Rewrites .kernel/nodes through an awk program.
standin_nodes_edit() {
	local f=$standin_sys/.kernel/nodes
	awk "$@" "$f" >"$f.new" && mv "$f.new" "$f"
}

standin_module_loaded() {
	awk -v m="$1" '$2 == m { f = 1 } END { exit !f }' "$standin_sys/.kernel/modules"
}

# Loads module $1 (a driver in kernel/drv/amd64 of the scratch root).
standin_module_load() {
	standin_module_loaded "$1" && return 0
	[ -f "$standin_sys/kernel/drv/amd64/$1" ] || return 1
	local id desc
	id=$(awk 'BEGIN { m = 200 } $1 > m { m = $1 } END { print m + 1 }' \
	    "$standin_sys/.kernel/modules")
	desc=$(cat "$standin_sys/.kernel/description.$1" 2>/dev/null || echo "$1 driver")
	echo "$id $1 $desc" >>"$standin_sys/.kernel/modules"
}

# Attaches driver $1 to every node bound to it and not attached, loading
# the module first (what devfsadm -i does, and update_drv -a through it).
standin_attach_driver() {
	grep -q " $1 0 " "$standin_sys/.kernel/nodes" || return 0
	standin_module_load "$1" || return 1
	standin_nodes_edit -v d="$1" '$4 == d { $5 = 1 } { print }'
	standin_path_to_inst
}

# Records an instance in path_to_inst for every attached node that has
# none for its driver (the kernel does so when it assigns instances).
standin_path_to_inst() {
	local p2i=$standin_sys/etc/path_to_inst path drv n
	while read -r path _ _ drv attached _; do
		[ "$attached" = 1 ] || continue
		grep -q "^\"$path\" [0-9]* \"$drv\"\$" "$p2i" && continue
		# One entry a path: a path that changed driver gets a new one.
		awk -v p="\"$path\"" '$1 != p' "$p2i" >"$p2i.new" && mv "$p2i.new" "$p2i"
		n=$(awk -v d="\"$drv\"" '$3 == d { c++ } END { print c + 0 }' "$p2i")
		echo "\"$path\" $n \"$drv\"" >>"$p2i"
	done <"$standin_sys/.kernel/nodes"
}

# ---- boot environments ----------------------------------------------------
# The files of the booted boot environment (BE) are the scratch root itself,
# less what is not in a BE here: .kernel (the running kernel), .config (the
# machine), .be (the other BEs), dev (the disks) and the call log. The
# other BEs are whole copies in .be/root/NAME; .be/current names the booted
# one, .be/next the one activated for the next boot (beadm's R flag), and
# .be/list every BE, oldest first. var/tmp is in the BE: a file written
# there after a clone is not in the clone (the stricter case for a script
# that keeps a record across a reboot into a new BE).
standin_be_excluded=" .kernel .config .be dev calls.log "

standin_be_init() {
	local be=$standin_sys/.be name
	[ -f "$be/current" ] && return 0
	mkdir -p "$be/root"
	name=$(sed 's,.*/,,' "$standin_sys/.config/rootfs" 2>/dev/null)
	echo "${name:-omnios}" >"$be/current"
	cp "$be/current" "$be/next"
	cp "$be/current" "$be/list"
}

standin_be_current() {
	standin_be_init
	cat "$standin_sys/.be/current"
}

# Copies (cp -a) or moves (mv) the top-level BE entries of directory $2
# to directory $3: $1 is the command. The excluded entries stay.
standin_be_transfer_tree() {
	local verb=$1 from=$2 to=$3 e n
	mkdir -p "$to"
	for e in "$from"/* "$from"/.[!.]*; do
		[ -e "$e" ] || [ -L "$e" ] || continue
		n=$(basename "$e")
		case "$standin_be_excluded" in *" $n "*) continue ;; esac
		case "$verb" in
		copy) cp -a "$e" "$to/" ;;
		move) mv "$e" "$to/" ;;
		esac
	done
}

# Copies the top-level entries of BE root $1 to directory $2.
standin_be_copy_tree() { standin_be_transfer_tree copy "$@"; }

# Moves the top-level BE entries of directory $1 to directory $2.
standin_be_move_tree() { standin_be_transfer_tree move "$@"; }

# The name libbe's beCopy() gives a clone of the booted BE when pkg names
# none: the booted BE's name with the next free "-N" (be_auto_be_name in
# usr/src/lib/libbe/common/be_utils.c).
standin_be_auto_name() {
	local cur base n=1
	cur=$(standin_be_current)
	base=$cur
	case "$cur" in *-[0-9]*) [ "${cur##*-}" -eq "${cur##*-}" ] 2>/dev/null && base=${cur%-*} ;; esac
	while grep -qx "$base-$n" "$standin_sys/.be/list"; do n=$((n + 1)); done
	echo "$base-$n"
}
