#!/bin/bash
# Do the sandbox's virtio disks share one backend's bandwidth?  The cost
# bench's writes-drop stores its records on a second virtio disk while fio
# writes the traced one; if the two disks draw on the same host bandwidth,
# a workload that uses all of it leaves the store only what the split gives
# the consumer's way of writing.  fio, 1 MiB sequential O_DIRECT writes at queue depth 4
# (seqwrite-1m's shape), on each disk alone and on both at once; then the
# way a consumer stores (large writes, one at a time: 4 MiB, a sixteenth of
# the bench's 64 MiB buffer, and 32 MiB) beside it.  Each disk is
# written once first, unreported: the first write of a sparse image file
# on the host ran at a sixth of the later ones' speed.
#   imgrement-dm sandbox --disk 4G --disk 4G --memory 4G --results build/share \
#       -- bash tests/bench/cost/share.sh
set -euo pipefail
read -r a b _ <<< "$IMGREMENT_SCRATCH_DISKS"
run() {  # label disk [fio options]: prints the label and MiB/s
	local label=$1 disk=$2
	shift 2
	fio --name="$label" --filename="$disk" --rw=write --bs=1m --iodepth=4 \
		--ioengine=libaio --direct=1 --size=1g --output-format=terse \
		--terse-version=3 "$@" | awk -F';' -v l="$label" '{printf "%s %d MiB/s\n", l, $48 / 1024}'
}
run warm-a "$a" >/dev/null
run warm-b "$b" >/dev/null
# the same 4 s for every job, so two at once overlap all the time
t=(--time_based --runtime=4)
for r in 1 2 3; do
	run "round $r: alone a" "$a" "${t[@]}"
	run "round $r: alone b" "$b" "${t[@]}"
	run "round $r: both, a" "$a" "${t[@]}" & run "round $r: both, b" "$b" "${t[@]}"; wait
	for bs in 4m 32m; do
		run "round $r: beside $bs writes, a" "$a" "${t[@]}" &
		run "round $r: $bs writes beside, b" "$b" "${t[@]}" --bs=$bs --iodepth=1; wait
	done
done
