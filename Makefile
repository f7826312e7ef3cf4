# imgrement-dm: top-level build, test and demo.
#
#   make           create .venv with the package and the imgrement-dm CLI
#   make test      host tests, then the guest suite, one sandbox boot per kernel
#   make test-deb  the .deb packages on a booted Debian machine (in make test too)
#   make test-debug  the full guest suite on the debug kernel (KASAN, lockdep, ...)
#   make test-canary the guest suite on experimental's newest kernel (not claimed)
#   make demo      wrap a scratch disk in the sandbox and show what the target saw
#   make demo-sqlite  crashcheck's acknowledgement oracle on SQLite, in the sandbox
#   make bench     fio through raw, dm-linear and imgrement, the peers, and
#                  bench-cost and bench-scale; docs/benchmarks.md
#   make bench-cost   the cost of each configuration in counted guest instructions
#   make bench-scale  the capture tools on 1-8 GiB captures, on the host
#   make lint      ruff and mypy (the target is built with W=1 and sparse,
#                  warnings failing the build, on every guest boot)
#
# Everything kernel-side runs in a QEMU guest (see README); the first run
# downloads a Debian kernel and a build root into ~/.cache/imgrement-dm.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KERNEL ?= 6.1
RESULTS := build/test-results

.DEFAULT_GOAL := all

all: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py VERSION imgrement_dm/_ffi_build.py imgrement_dm/_stream.c dm_target/imgrement_record.h \
		scripts/install-host-deps
	scripts/install-host-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# compat: a plain path in a .pth, not setuptools' import finder, which
	# cost every Python start 22-25 ms on the host, 20 to 35 times that in a
	# TCG guest (the guest suite starts Python hundreds of times); the
	# default mode where a setuptools no longer has compat.
	$(BIN)/pip install --quiet -e '.[sandbox,dev,plot]' --config-settings editable_mode=compat \
		|| $(BIN)/pip install --quiet -e '.[sandbox,dev,plot]'
	touch $@

lint: all
	$(BIN)/ruff check imgrement_dm tests
	$(BIN)/mypy

test-host: all
	mkdir -p $(RESULTS)
	$(BIN)/pytest tests/host -p no:cacheprovider --junitxml=$(RESULTS)/host.xml

# One boot per kernel.  The debug kernel (Debian's 6.1 source with KASAN,
# lockdep, UBSAN, kmemleak; built once) runs the stress tests, where the
# checkers see their races, in every run, and one of DEBUG_SHARDS shards of
# the rest (tests/guest/shards.py): the commit count (git rev-list --count
# HEAD) modulo DEBUG_SHARDS picks it, so the debug kernel runs the whole
# suite over every DEBUG_SHARDS landings in a row; all of it at once does not
# fit in CI.  One distro kernel runs the whole suite and the others the
# smoke suite; the commit count modulo 4 picks from ROTATION, so each runs
# whole every fourth landing (docs/testing.md has the figures that decided
# this).  On 6.1 "whole" is run-suite's main: all but the stress tests, which
# run on the debug kernel, 6.1 too, in every run.
# FULL_KERNEL=5.10 picks the whole-suite kernel by hand, DEBUG_SHARD=2 the
# debug kernel's shard; KERNELS=all runs the full suite everywhere (the debug
# kernel too); make test-debug on the debug kernel alone.  Each boot's JUnit
# XML comes back through the shared results folder and is checked: every
# boot must have run, with no failure and nothing skipped.
ALL_KERNELS := 6.1 5.10 6.12 7.2
ROTATION := 6.1 7.2 5.10 6.12
COMMITS := $(shell git rev-list --count HEAD 2>/dev/null || echo 0)
FULL_KERNEL ?= $(word $(shell echo $$(( $(COMMITS) % 4 + 1 ))),$(ROTATION))
KERNELS ?= default
_whole = $(if $(filter 6.1,$(1)),main,full)
_suite = $(if $(filter all,$(KERNELS)),full,$(if $(filter $(FULL_KERNEL),$(1)),$(call _whole,$(1)),smoke))
DEBUG_SHARDS := 5
DEBUG_SHARD ?= $(shell echo $$(( $(COMMITS) % $(DEBUG_SHARDS) )))
GUEST_RUNS ?= $(foreach k,$(ALL_KERNELS),$(k):$(call _suite,$(k))) \
	debug:$(if $(filter all,$(KERNELS)),full,shard-$(DEBUG_SHARD)/$(DEBUG_SHARDS))
WHOLE_NOTE = whole suite on $(FULL_KERNEL) ($(if $(filter file,$(origin FULL_KERNEL)),commit count \
	$(COMMITS) mod 4 picks it from $(ROTATION),given as FULL_KERNEL)), smoke suite on the other distro \
	kernels; on the debug kernel the stress tests and shard $(DEBUG_SHARD) of $(DEBUG_SHARDS) \
	($(if $(filter file,$(origin DEBUG_SHARD)),commit count $(COMMITS) mod $(DEBUG_SHARDS),given as DEBUG_SHARD))

# Every test boot: Debian 5.10 zeroes each page it allocates (init_on_alloc,
# on by default) so slowly under emulation that a process start took 5 times
# as long as with it off (ten forks 2.4 s against 0.4; 6.1 and later are
# unaffected); off, allocations are not zeroed, which hides nothing our
# tests look for and exposes memory the target forgot to initialise.
GUEST_APPEND ?= init_on_alloc=0

test-guest: all
	mkdir -p $(RESULTS)
	rm -f $(RESULTS)/guest-*.xml $(RESULTS)/hang-*
	# pytest's assertion-rewritten test modules, written here: the guest cannot
	# write them and would rewrite all in every boot (0.8 s of host CPU)
	env -u PYTHONDONTWRITEBYTECODE IMGREMENT_HOST_COLLECT=1 $(BIN)/pytest tests/guest \
		--collect-only -q -p no:cacheprovider -p no:hypothesispytest >/dev/null
	@echo "guest runs (kernel:suite): $(GUEST_RUNS)"
	$(if $(filter default,$(KERNELS)),$(if $(filter file,$(origin GUEST_RUNS)),@echo "$(WHOLE_NOTE)"))
	rc=0; n=0; for run in $(GUEST_RUNS); do \
		k=$${run%%:*}; suite=$${run#*:}; \
		echo "== kernel $$k: $$suite suite"; n=$$((n + 1)); \
		$(BIN)/imgrement-dm sandbox --kernel $$k --disk 256M --disk 256M \
			--append "$(GUEST_APPEND)" --results $(RESULTS) -- tests/guest/run-suite $$suite || rc=1; \
	done; \
	$(BIN)/python tests/check_junit.py --expect-guest $$n $(RESULTS) || rc=1; \
	exit $$rc

# The full guest suite on the debug kernel alone.
test-debug: all
	$(MAKE) test-guest GUEST_RUNS=debug:full

# The canary: the newest kernel Debian ships (experimental's release
# candidates, in a sid root), not one we claim and not in make test: it shows
# what the next kernel line breaks before it reaches sid.  CANARY_SUITE=smoke
# for the short run.
CANARY_SUITE ?= full
test-canary: all
	$(MAKE) test-guest GUEST_RUNS=canary:$(CANARY_SUITE)

# System integration: the DKMS package builds for the default kernel (in that
# kernel's Debian root; needs root, like the sandbox); make install and the
# .deb packages, each on a booted Debian machine (tests/system/).
test-system: all
	mkdir -p $(RESULTS)
	$(BIN)/pytest tests/system -p no:cacheprovider --junitxml=$(RESULTS)/system.xml

# The .deb packages on the Debian machine alone: install, kernel upgrade, a
# second boot on the new kernel, purge (tests/system/test_deb.py).
test-deb: all
	mkdir -p $(RESULTS)
	$(BIN)/pytest tests/system/test_deb.py -p no:cacheprovider --junitxml=$(RESULTS)/deb.xml

test: lint test-host test-system test-guest

# fio in one guest boot: raw, dm-linear and imgrement in each capture mode on a
# virtio disk and a RAM disk; ratios to dm-linear in build/bench/results.json
# and docs/benchmarks.md; then the peers, each paired with a dm-linear over the
# same disk.  Under software emulation the first part took about 30 minutes
# when last timed; the peers 73 without bpftrace, whose 30 set-ups took 18 more
# (3 repetitions of 2 pairs: BENCH_PEER_REPS, BENCH_PEER_PAIRS; BENCH_PEER_CONFIGS
# picks peers).
# Under emulation the guest kernel finds the vCPUs' TSCs unsynchronized and
# falls back to the HPET, whose every read (each clock_gettime of fio, each
# timestamp of the target and of the block layer) traps into QEMU; real
# machines use the TSC, and so does the bench. BENCH_APPEND= keeps the HPET.
BENCH_APPEND ?= tsc=reliable clocksource=tsc
# The second and third disks hold the peers' logs (dm-log-writes' raw log,
# record's capture file on ext4). make bench-peers runs only the peer table.
bench: all
	scripts/install-host-deps --bench
	mkdir -p build/bench
	rm -f build/bench/bench-raw.json build/bench/stream-*.rec
	$(BIN)/imgrement-dm sandbox --kernel $(KERNEL) --disk 1G --disk 8G --disk 8G --memory 8G \
		--append "$(BENCH_APPEND)" --results build/bench -- python tests/bench/guest_bench.py $(BENCH_ONLY)
	$(BIN)/python tests/bench/report.py build/bench docs/benchmarks.md
	$(MAKE) bench-cost
	$(MAKE) bench-scale

# The cost in guest instructions (tests/bench/cost/): the guest runs under a
# QEMU TCG plugin that counts the instructions of every vCPU between two
# marker instructions around each fio run of a fixed number of I/Os; the
# peer table's configurations and workloads, COST_REPS runs each.  Writes
# build/bench/results-cost.json and the section that leads docs/benchmarks.md.
# brd's 35 cells took 60 minutes here (6 Dec 2026, COST_ENV="COST_DISKS=brd");
# the virtio disk's, the default's second half, about 4.5 minutes a 4 KiB
# write cell (its three 4 KiB write workloads, 21 cells, 93 minutes with the
# boot) and under 2 a seqwrite-1m or randrw cell (14 cells, 27 minutes).
COST_ENV ?=
bench-cost: all
	scripts/install-host-deps --bench
	tests/bench/cost/build
	rm -f build/bench/cost-counts.txt build/bench/cost-runs.json build/bench/cost-profile.txt
	$(BIN)/imgrement-dm sandbox --kernel $(KERNEL) --disk 1G --disk 4G --disk 4G --memory 12G \
		--append "$(BENCH_APPEND) nokaslr" --results build/bench \
		--qemu-arg=-plugin \
		--qemu-arg=$(CURDIR)/build/bench/cost/insncount.so,out=$(CURDIR)/build/bench/cost-counts.txt,profile=$(CURDIR)/build/bench/cost-profile.txt \
		-- env INSNMARK=$(CURDIR)/build/bench/cost/insnmark $(COST_ENV) \
		python -m tests.bench.cost.cost_guest
	$(BIN)/python -m tests.bench.cost.cost_report build/bench docs/benchmarks.md

# The capture tools at scale, on the host (tests/bench/scale.py): captures of
# 1, 2, 4 and 8 GiB (SCALE_GIB) applied, replayed, diffed and exported, time
# and peak RSS each, against cp; crashcheck's listing of 1,000 to 100,000
# fsynced writes. About 20 GB of scratch space in build/bench/scale-work.
SCALE_GIB ?= 1 2 4 8
bench-scale: all
	mkdir -p build/bench
	$(BIN)/python tests/bench/scale.py build/bench docs/benchmarks.md $(SCALE_GIB)

bench-peers:
	$(MAKE) bench BENCH_ONLY=peers

# Debian packages (imgrement-dkms, imgrement-dm) in build/deb/, built with
# Debian's own tooling from a copy of the tree (tracked files and new ones),
# the changelog written from VERSION; lintian must pass.  Needs root for apt
# (the build dependencies), like the other targets.  PATH is Debian's own, so
# that pybuild finds Debian's python3 and not one a user put first in PATH.
DEB_VERSION := $(shell cat VERSION)
deb:
	scripts/install-host-deps --deb
	rm -rf build/deb && mkdir -p build/deb/imgrement-dm-$(DEB_VERSION)
	git ls-files -co --exclude-standard -z | \
		tar --null -T - -c | tar -x -C build/deb/imgrement-dm-$(DEB_VERSION)
	scripts/deb-changelog $(DEB_VERSION) >build/deb/imgrement-dm-$(DEB_VERSION)/debian/changelog
	cd build/deb/imgrement-dm-$(DEB_VERSION) && \
		env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b
	lintian --fail-on error,warning \
		build/deb/*.changes

demo: all
	$(BIN)/imgrement-dm sandbox --kernel $(KERNEL) --disk 256M --results build/demo \
		-- scripts/demo-guest

# crashcheck in the sandbox: the unsafe rename pattern found, the fsync'd one
# passing (docs/crashcheck.md).
demo-crash: all
	$(BIN)/imgrement-dm sandbox --kernel $(KERNEL) --disk 64M --results build/demo \
		-- scripts/demo-crash-guest

# crashcheck's acknowledgement oracle on SQLite in the sandbox: DELETE mode
# with synchronous=FULL loses the last acknowledged row, EXTRA none.
demo-sqlite: all
	$(BIN)/imgrement-dm sandbox --kernel $(KERNEL) --disk 64M --results build/demo \
		-- scripts/demo-sqlite-guest

# Install on a real machine (root): the module through DKMS (rebuilt on kernel
# upgrades), the CLI in its own venv, the udev rule and systemd unit (inert
# until a policy exists: see udev/autowrap.conf.example).
PREFIX ?= /usr/local
TARGET_VERSION := $(shell cat VERSION)
SRCDIR := /usr/src/imgrement-$(TARGET_VERSION)
APPDIR := /opt/imgrement-dm

install:
	scripts/install-host-deps --install
	install -d $(SRCDIR)
	install -m 644 dm_target/*.c dm_target/*.h dm_target/Kbuild dm_target/Makefile $(SRCDIR)/
	sed 's/#MODULE_VERSION#/$(TARGET_VERSION)/' dm_target/dkms.conf >$(SRCDIR)/dkms.conf
	dkms add -m imgrement -v $(TARGET_VERSION) 2>/dev/null || true
	dkms install -m imgrement -v $(TARGET_VERSION)
	$(PYTHON) -m venv $(APPDIR)
	$(APPDIR)/bin/pip install --quiet .
	ln -sf $(APPDIR)/bin/imgrement-dm $(PREFIX)/bin/imgrement-dm
	install -d /etc/imgrement-dm /usr/share/imgrement-dm/udev
	install -m 644 udev/autowrap.conf.example /etc/imgrement-dm/
	install -m 644 udev/60-imgrement-autowrap.rules udev/imgrement-autowrap@.service \
		/usr/share/imgrement-dm/udev/
	install -D -m 644 README.md /usr/share/doc/imgrement-dm/README.md
	$(PREFIX)/bin/imgrement-dm autowrap enable
	@echo "installed: modprobe dm-imgrement, then imgrement-dm wrap DEVICE"

uninstall:
	-$(PREFIX)/bin/imgrement-dm autowrap disable
	-modprobe -r imgrement
	-dkms remove -m imgrement -v $(TARGET_VERSION) --all
	rm -rf $(SRCDIR) $(APPDIR) $(PREFIX)/bin/imgrement-dm /etc/imgrement-dm/autowrap.conf.example \
		/usr/share/imgrement-dm /usr/share/doc/imgrement-dm
	@if [ -e /etc/imgrement-dm/autowrap.conf ]; then \
		echo "kept your policy /etc/imgrement-dm/autowrap.conf (remove it by hand)"; \
	else rmdir /etc/imgrement-dm 2>/dev/null || true; fi

clean:
	rm -rf build dm_target/*.o dm_target/*.ko dm_target/*.mod* dm_target/.*.cmd \
		dm_target/Module.symvers dm_target/modules.order imgrement_dm/_kernel_ffi*

distclean: clean
	rm -rf $(VENV)

.PHONY: deb test-deb test-canary demo-crash demo-sqlite all lint test test-host test-system test-guest test-debug bench bench-cost bench-scale bench-peers demo install uninstall clean distclean
