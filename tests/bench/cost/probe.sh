#!/bin/bash
# The repeatability probe: the same fio run, five times, counted in guest
# instructions between insnmark start and stop.
set -euo pipefail
mark=$1
modprobe brd rd_nr=1 rd_size=262144
dmsetup create probelin --table "0 $((262144 * 2)) linear /dev/ram0 0"
udevadm settle
for dev in /dev/ram0 /dev/mapper/probelin; do
	for i in 1 2 3 4 5; do
		"$mark" start
		fio --name=p --filename="$dev" --rw=randwrite --bs=4k --iodepth=1 --direct=1 \
			--ioengine=psync --number_ios=20000 --randrepeat=1 --size=200M \
			--output=/dev/null
		"$mark" stop
		echo "$dev run $i" >> "$IMGREMENT_RESULTS/probe-labels.txt"
	done
done
dmsetup remove probelin
