// SPDX-License-Identifier: GPL-2.0
/*
 * insncount: a QEMU TCG plugin that counts the guest instructions executed
 * between two markers, on every vCPU, kernel and user alike.
 *
 * A guest marks the start and the end of a measured run by executing
 * "nopw 0x1d5a7e0K(%rax,%rax,1)" (66 0f 1f 84 00 0K 7e 5a 1d): a 9-byte
 * NOP no compiler emits, recognised when its block is translated (QEMU
 * 7.2's plugin API cannot read registers, so the instruction itself is the
 * message).  K = 0 starts a window, K = 1 ends it and appends the count of
 * instructions executed since the start, all vCPUs summed, as one line to
 * the file named by the plugin's "out" argument:
 *
 *	qemu-system-x86_64 -plugin insncount.so,out=counts.txt,profile=prof.txt ...
 *
 * K = 2 starts a profiled window: when it ends, every translated block that
 * ran in it is appended to the "profile" file as "ADDRESS COUNT" (its guest
 * virtual address, the instructions it executed), after a line "# window N"
 * (N: the count file's line of that window, from 1).  The host maps the
 * addresses to the guest kernel's symbols (/proc/kallsyms).
 *
 * Counting is per translated block: at each block's start its instruction
 * count is added to the counter of the vCPU running it (one counter per
 * vCPU, so no two vCPUs write the same word).  A block left early by an
 * exception or interrupt is counted whole: a few instructions, the same in
 * every run of the same work.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define MAX_VCPUS 64
#define MARK_LEN 9

enum { MARK_START = 0, MARK_STOP = 1, MARK_PROFILE = 2 };

/* one cache line a vCPU: no false sharing between vCPUs' counters */
static struct { uint64_t n; char pad[56]; } counts[MAX_VCPUS];
static uint64_t window_start;
static FILE *out;
static FILE *profile_out;
static uint64_t windows;
static int profiling;

/* a translated block: where it is and what it ran in a profiled window */
struct block {
	uint64_t vaddr;
	uint64_t n;
	uint64_t ran;
};
static struct block **blocks;
static size_t nblocks, blocks_cap;
static pthread_mutex_t blocks_lock = PTHREAD_MUTEX_INITIALIZER;

static const unsigned char mark_prefix[] = { 0x66, 0x0f, 0x1f, 0x84, 0x00 };
static const unsigned char mark_magic[] = { 0x7e, 0x5a, 0x1d };

static uint64_t total(void)
{
	uint64_t sum = 0;
	int i;

	for (i = 0; i < MAX_VCPUS; i++)
		sum += __atomic_load_n(&counts[i].n, __ATOMIC_RELAXED);
	return sum;
}

static void block_run(unsigned int vcpu, void *udata)
{
	struct block *b = udata;

	counts[vcpu % MAX_VCPUS].n += b->n;
	if (__atomic_load_n(&profiling, __ATOMIC_RELAXED))
		__atomic_fetch_add(&b->ran, b->n, __ATOMIC_RELAXED);
}

static void profile_dump(void)
{
	size_t i;

	pthread_mutex_lock(&blocks_lock);
	fprintf(profile_out, "# window %" PRIu64 "\n", windows);
	for (i = 0; i < nblocks; i++) {
		uint64_t ran = __atomic_exchange_n(&blocks[i]->ran, 0, __ATOMIC_RELAXED);

		if (ran)
			fprintf(profile_out, "%" PRIx64 " %" PRIu64 "\n", blocks[i]->vaddr, ran);
	}
	pthread_mutex_unlock(&blocks_lock);
	fflush(profile_out);
}

static void profile_reset(void)
{
	size_t i;

	pthread_mutex_lock(&blocks_lock);
	for (i = 0; i < nblocks; i++)
		__atomic_store_n(&blocks[i]->ran, 0, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&blocks_lock);
}

static void mark_run(unsigned int vcpu, void *udata)
{
	uint64_t now = total();

	(void)vcpu;
	if ((uintptr_t)udata == MARK_START || (uintptr_t)udata == MARK_PROFILE) {
		if ((uintptr_t)udata == MARK_PROFILE && profile_out) {
			profile_reset();
			__atomic_store_n(&profiling, 1, __ATOMIC_RELAXED);
		}
		window_start = total();
		return;
	}
	windows++;
	fprintf(out, "%" PRIu64 "\n", now - window_start);
	fflush(out);
	if (__atomic_load_n(&profiling, __ATOMIC_RELAXED)) {
		__atomic_store_n(&profiling, 0, __ATOMIC_RELAXED);
		profile_dump();
	}
}

static struct block *block_new(uint64_t vaddr, uint64_t n)
{
	struct block *b = calloc(1, sizeof(*b));

	if (!b)
		abort();
	b->vaddr = vaddr;
	b->n = n;
	pthread_mutex_lock(&blocks_lock);
	if (nblocks == blocks_cap) {
		blocks_cap = blocks_cap ? 2 * blocks_cap : 65536;
		blocks = realloc(blocks, blocks_cap * sizeof(*blocks));
		if (!blocks)
			abort();
	}
	blocks[nblocks++] = b;
	pthread_mutex_unlock(&blocks_lock);
	return b;
}

static int mark_kind(struct qemu_plugin_insn *insn)
{
	const unsigned char *b = qemu_plugin_insn_data(insn);

	if (qemu_plugin_insn_size(insn) != MARK_LEN ||
	    memcmp(b, mark_prefix, sizeof(mark_prefix)) ||
	    memcmp(b + 6, mark_magic, sizeof(mark_magic)))
		return -1;
	return b[5] <= MARK_PROFILE ? b[5] : -1;
}

static void block_translated(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
	size_t n = qemu_plugin_tb_n_insns(tb);
	size_t i;

	(void)id;
	qemu_plugin_register_vcpu_tb_exec_cb(tb, block_run, QEMU_PLUGIN_CB_NO_REGS,
					     block_new(qemu_plugin_tb_vaddr(tb), n));
	for (i = 0; i < n; i++) {
		struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
		int kind = mark_kind(insn);

		if (kind >= 0)
			qemu_plugin_register_vcpu_insn_exec_cb(insn, mark_run,
							       QEMU_PLUGIN_CB_NO_REGS,
							       (void *)(uintptr_t)kind);
	}
}

static void finish(qemu_plugin_id_t id, void *p)
{
	(void)id;
	(void)p;
	if (out)
		fclose(out);
	if (profile_out)
		fclose(profile_out);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
					   int argc, char **argv)
{
	const char *path = NULL, *profile = NULL;
	int i;

	(void)info;
	for (i = 0; i < argc; i++) {
		if (!strncmp(argv[i], "out=", 4))
			path = argv[i] + 4;
		else if (!strncmp(argv[i], "profile=", 8))
			profile = argv[i] + 8;
	}
	if (!path) {
		fprintf(stderr, "insncount: give out=FILE (where the counts go)\n");
		return -1;
	}
	out = fopen(path, "a");
	if (!out) {
		perror(path);
		return -1;
	}
	if (profile) {
		profile_out = fopen(profile, "a");
		if (!profile_out) {
			perror(profile);
			return -1;
		}
	}
	qemu_plugin_register_vcpu_tb_trans_cb(id, block_translated);
	qemu_plugin_register_atexit_cb(id, finish, NULL);
	return 0;
}
