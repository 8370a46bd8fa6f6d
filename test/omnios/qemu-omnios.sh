#!/bin/sh
#
# Boots an OmniOS virtual machine laid out for the rvscsi runbook
# (test/omnios/runbook.sh):
#   - the root disk on virtio-blk, so that no virtio-scsi or PVSCSI
#     controller holds the root pool (rvscsiadm refuses to take one that
#     does);
#   - a transitional virtio-scsi controller (PCI 1af4:1004, vioscsi's alias
#     pci1af4,1004) with a 1 GiB scratch disk at target 0, LUN 0;
#   - a modern-only virtio-scsi controller (1af4:1048) behind a PCI Express
#     root port (alias pci1af4,1048,p) with a 512 MiB scratch disk;
#   - a VMware PVSCSI controller (PCI 15ad:07c0, pvscsi's alias
#     pci15ad,7c0; QEMU's model has LUN 0 only) with a 256 MiB scratch disk
#     at target 0;
#   - user networking with the guest's ssh on 127.0.0.1 port 10022 of the
#     host (--ssh-port to change it), to copy the source tree or the .p5p in.
#
# Usage:
#   test/omnios/qemu-omnios.sh [--iso omnios-rXXXXXX.iso] [--vga] [--vnc]
#                              [--dir DIR] [--ssh-port PORT] [--check]
#                              [--dry-run]
#
# 1. Install (once): --iso with an OmniOS installer image (from
#    https://downloads.omnios.org/media/). The installer runs on the VGA
#    console (the ISO's loader sets console="text,ttya", text first), so
#    this boot shows the VGA screen in this terminal (QEMU's curses
#    display; --vnc shows it on VNC at 127.0.0.1:5900 instead). The serial
#    line goes to DIR/ttya.log, the QEMU monitor to DIR/monitor.sock. In
#    the installer, install onto the 20 GiB virtio-blk disk (c1t0d0 or
#    similar), then in its configuration menu (kayak installer/config-menu)
#    choose:
#      Configure Networking  DHCP on the virtio-net interface (vioif0)
#      Set Root Password     (ssh root logins need it, or Create User)
#      SSH Server            Enabled (the default)
#      Extra Packages Repo   Enabled: the extra.omnios publisher, which
#                            delivers clang (ooce/developer/clang-NN)
#      Serial Console        ttya (115200 8n1), so that later boots can run
#                            on this terminal
#    and reboot.
# 2. Later runs boot the installed disk with its console on ttya, on this
#    terminal (-nographic; Ctrl-a x quits QEMU). If the serial console was
#    not chosen, add --vga (or --vnc) to get the VGA console again.
#
# Everything lives in DIR (default ./omnios-vm). KVM is used when /dev/kvm
# is usable, else TCG (slow, but it works). --check starts QEMU with this
# layout, paused and without display, for a few seconds and stops it: QEMU
# validates every device option at start, so this proves the command line
# (the project's tests run it). --dry-run prints the QEMU command instead
# of running it.
#
# Then, in the guest (as root; git is not in OmniOS's "entire": pkg install
# developer/versioning/git, or copy the tree with scp -P 10022):
#   ./test/omnios/runbook.sh --source <tree> --yes
#   (or --p5p rvscsi-<version>.p5p built elsewhere), and again after each
#   reboot it asks for (a plain reboot: four phases, the last in the new
#   boot environment that pkg uninstall makes).
set -eu

iso=""
dir=./omnios-vm
check=0
dry=0
ssh_port=10022
vga=0
vnc=0
while [ $# -gt 0 ]; do
	case "$1" in
	--iso) iso=${2:?--iso needs an image}; shift 2 ;;
	--dir) dir=${2:?--dir needs a directory}; shift 2 ;;
	--ssh-port) ssh_port=${2:?--ssh-port needs a port}; shift 2 ;;
	--vga) vga=1; shift ;;
	--vnc) vga=1; vnc=1; shift ;;
	--check) check=1; shift ;;
	--dry-run) dry=1; shift ;;
	-h | --help) sed -n '2,/^set -eu/p' "$0" | sed '$d'; exit 0 ;;
	*) echo "qemu-omnios: unknown argument $1" >&2; exit 2 ;;
	esac
done

if [ $dry = 0 ]; then
	mkdir -p "$dir"
	[ -f "$dir/root.qcow2" ] || qemu-img create -f qcow2 "$dir/root.qcow2" 20G
	[ -f "$dir/scratch0.img" ] || qemu-img create -f raw "$dir/scratch0.img" 1G
	[ -f "$dir/scratch1.img" ] || qemu-img create -f raw "$dir/scratch1.img" 512M
	[ -f "$dir/scratch2.img" ] || qemu-img create -f raw "$dir/scratch2.img" 256M
fi

if [ $check = 1 ]; then
	accel="-accel tcg -cpu max"
elif [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
	accel="-accel kvm -cpu host"
else
	[ $dry = 1 ] || echo "qemu-omnios: /dev/kvm not usable, running under TCG (slow)" >&2
	accel="-accel tcg -cpu max"
fi

boot=""
if [ -n "$iso" ]; then
	boot="-drive media=cdrom,file=$iso,readonly=on -boot order=d"
	vga=1
fi

if [ $vga = 1 ]; then
	# The VGA console (the installer's): curses in this terminal, or VNC.
	if [ $vnc = 1 ]; then display="-display vnc=127.0.0.1:0"; else display="-display curses"; fi
	sidelines="-serial file:$dir/ttya.log -monitor unix:$dir/monitor.sock,server,nowait"
	ui="$display $sidelines"
else
	# The installed system with its console on ttya.
	sidelines="-serial none -monitor none"
	ui="-nographic -serial mon:stdio"
fi
run="exec"
if [ $check = 1 ]; then
	# Paused, without a display (the serial line and monitor as chosen);
	# still running after 5 s means QEMU accepted all of it.
	run="timeout 5"
	ui="-S -display none $sidelines"
fi
[ $dry = 0 ] || run="echo"
set +e

# shellcheck disable=SC2086 # accel, boot and ui are word lists on purpose
$run qemu-system-x86_64 \
	-machine q35 $accel -smp 2 -m 4096 \
	-drive if=none,id=root,file="$dir/root.qcow2",format=qcow2 \
	-device virtio-blk-pci,drive=root,bootindex=1 \
	-device virtio-scsi-pci,id=vscsi0 \
	-drive if=none,id=scratch0,file="$dir/scratch0.img",format=raw,cache=none,rerror=report,werror=report \
	-device scsi-hd,bus=vscsi0.0,channel=0,scsi-id=0,lun=0,drive=scratch0 \
	-device pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1 \
	-device virtio-scsi-pci,id=vscsi1,bus=rp1,disable-legacy=on \
	-drive if=none,id=scratch1,file="$dir/scratch1.img",format=raw,cache=none,rerror=report,werror=report \
	-device scsi-hd,bus=vscsi1.0,channel=0,scsi-id=0,lun=0,drive=scratch1 \
	-device pvscsi,id=pvscsi0 \
	-drive if=none,id=scratch2,file="$dir/scratch2.img",format=raw,cache=none,rerror=report,werror=report \
	-device scsi-hd,bus=pvscsi0.0,channel=0,scsi-id=0,lun=0,drive=scratch2 \
	-netdev user,id=net0,hostfwd=tcp:127.0.0.1:"$ssh_port"-:22 \
	-device virtio-net-pci,netdev=net0 \
	$boot \
	$ui
rc=$?
if [ $check = 1 ]; then
	if [ $rc = 124 ]; then
		echo "qemu-omnios: QEMU accepted the layout"
		exit 0
	fi
	echo "qemu-omnios: QEMU refused the layout (exit $rc)" >&2
	exit 1
fi
exit $rc
