#!/bin/bash
# Runs as root inside the sandbox guest, before the user's command.
# Environment (set by imgrement_dm.sandbox.vm):
#   IMGREMENT_KO        the imgrement.ko built for this kernel
#   IMGREMENT_RESULTS   a folder shared read-write with the host
#   IMGREMENT_DISKS     the number of scratch disks attached
#   IMGREMENT_VENV_BIN  the host venv's bin/ (put first on PATH)
#   IMGREMENT_CWD       where to run the command
#   IMGREMENT_CACHE_TAG, IMGREMENT_CACHED_PATHS
#                       a second share of the host root, and the directories
#                       (Python's) to read through it with the guest's page
#                       cache (vm.python_paths says why)
# Arguments: the command to run; none means an interactive shell.
set -u

fail() {
	echo "sandbox guest: $*" >&2
	exit 125
}

# The root share has no cache: lay the cached share over Python's own
# directories, which do not change while the guest runs.  Without it
# everything still works, slower; say so.
cache=/run/imgrement-cache
if mkdir -p "$cache" && mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,msize=524288,access=any,ro \
	"$IMGREMENT_CACHE_TAG" "$cache"; then
	for dir in $IMGREMENT_CACHED_PATHS; do
		mount --bind "$cache$dir" "$dir" || echo "sandbox guest: $dir read uncached" >&2
	done
else
	echo "sandbox guest: the cached share did not mount; Python reads uncached" >&2
fi

modprobe dm-mod || fail "cannot load dm-mod"
insmod "$IMGREMENT_KO" || fail "cannot load $IMGREMENT_KO"
modprobe loop 2>/dev/null || true
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug

udevadm settle --timeout=60 || true
# Scratch disks carry the serials imgrement-scratchN; list them in order.
disks=""
for ((i = 0; i < IMGREMENT_DISKS; i++)); do
	link=/dev/disk/by-id/virtio-imgrement-scratch$i
	for _ in $(seq 50); do
		[ -e "$link" ] && break
		sleep 0.2
	done
	[ -e "$link" ] || fail "scratch disk $i did not appear as $link"
	disks="$disks $(readlink -f "$link")"
done
export IMGREMENT_SCRATCH_DISKS="${disks# }"
export IMGREMENT_IN_SANDBOX=1
export PATH="$IMGREMENT_VENV_BIN:$PATH"
export PYTHONDONTWRITEBYTECODE=1
mkdir -p "$IMGREMENT_RESULTS"
cd "$IMGREMENT_CWD" || fail "cannot enter $IMGREMENT_CWD"

if [ $# -eq 0 ]; then
	echo "imgrement sandbox: kernel $(uname -r), scratch disks: ${IMGREMENT_SCRATCH_DISKS:-none}"
	echo "target loaded; try: imgrement-dm wrap ${IMGREMENT_SCRATCH_DISKS%% *}"
	exec bash -i
fi
"$@"
