#!/bin/sh
#
# Boots an OmniOS virtual machine laid out for the rvscsi runbook
# (test/omnios/runbook.sh):
#   - the root disk on virtio-blk, so that no virtio-scsi controller holds
#     the root pool (rvscsiadm refuses to take one that does);
#   - a transitional virtio-scsi controller (PCI 1af4:1004, vioscsi's alias
#     pci1af4,1004) with a 1 GiB scratch disk at target 0, LUN 0;
#   - a modern-only virtio-scsi controller (1af4:1048) behind a PCI Express
#     root port (alias pci1af4,1048,p) with a 512 MiB scratch disk;
#   - user networking with the guest's ssh on host port 10022, to copy the
#     source tree or the .p5p in.
#
# Usage:
#   test/omnios/qemu-omnios.sh [--iso omnios-rXXXXXX.iso] [--dir DIR] [--check]
#
# --check starts QEMU with this layout, paused and without display, for a
# few seconds and stops it: QEMU validates every device option at start,
# so this proves the command line (the project's tests run it).
#
# First run with --iso (an OmniOS installer image from
# https://downloads.omnios.org/media/) and install OmniOS onto the 20 GiB
# virtio-blk disk; later runs boot that disk. Everything lives in DIR
# (default ./omnios-vm). KVM is used when /dev/kvm is usable, else TCG
# (slow, but it works).
#
# Then, in the guest (as root):
#   scp -P 10022 ... or git clone the tree, and run
#   ./test/omnios/runbook.sh --source <tree> --yes
#   (or --p5p rvscsi-<version>.p5p built elsewhere).
set -eu

iso=""
dir=./omnios-vm
check=0
while [ $# -gt 0 ]; do
	case "$1" in
	--iso) iso=$2; shift 2 ;;
	--dir) dir=$2; shift 2 ;;
	--check) check=1; shift ;;
	-h|--help) sed -n '2,30p' "$0"; exit 0 ;;
	*) echo "qemu-omnios: unknown argument $1" >&2; exit 2 ;;
	esac
done

mkdir -p "$dir"
[ -f "$dir/root.qcow2" ] || qemu-img create -f qcow2 "$dir/root.qcow2" 20G
[ -f "$dir/scratch0.img" ] || qemu-img create -f raw "$dir/scratch0.img" 1G
[ -f "$dir/scratch1.img" ] || qemu-img create -f raw "$dir/scratch1.img" 512M

if [ $check = 1 ]; then
	accel="-accel tcg -cpu max"
elif [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
	accel="-accel kvm -cpu host"
else
	echo "qemu-omnios: /dev/kvm not usable, running under TCG (slow)" >&2
	accel="-accel tcg -cpu max"
fi

boot=""
if [ -n "$iso" ]; then
	boot="-drive media=cdrom,file=$iso,readonly=on -boot order=d"
fi

run=exec
ui="-nographic -serial mon:stdio"
if [ $check = 1 ]; then
	# Paused, headless; still running after 5 s means it accepted all of it.
	run="timeout 5"
	ui="-S -display none -serial none -monitor none"
fi
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
	-netdev user,id=net0,hostfwd=tcp::10022-:22 \
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
