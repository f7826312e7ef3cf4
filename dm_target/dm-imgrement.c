// SPDX-License-Identifier: GPL-2.0
/*
 * dm-imgrement: a pass-through device-mapper target that records every bio
 * reaching the device below it, with its data.
 *
 * Semantics.  The target maps its range linearly onto one underlying block
 * device, as dm-linear does; the I/O itself is never changed, delayed or
 * failed for the sake of the trace.  For every bio it writes one record:
 * operation, flags, start sector and size, each segment, submit and
 * completion time, completion status and the submitting task; and, by
 * capture mode, a copy of the data.  Writes are copied in .map, exactly as
 * submitted (the pages may change once the bio completes); reads are copied
 * in .end_io, once the device below has filled them.
 *
 * Records go into a bounded buffer allocated when the table is loaded and
 * are read from /sys/kernel/debug/imgrement/<dm name>/records (debugfs.c).
 * Space is reserved when a bio is mapped and the record is published when it
 * completes, so records appear in submission order.  The format is in
 * imgrement_record.h and docs/record-format.md.
 *
 * Overflow.  When a record does not fit, the overflow policy decides:
 *   drop  the record is dropped and counted, and its sequence number is
 *         skipped; the bio goes on at once (the default: tracing never
 *         slows the disk).
 *   wait  lossless: the bio waits, in order, on a list, and a work item
 *         records and submits it once readers have freed space (.map never
 *         sleeps; bios that arrive while others wait queue behind them).
 *         .map splits a bio that carries data to at most a quarter of the
 *         buffer (dm_accept_partial_bio, by the policy in force when it is
 *         mapped), so every record fits in an empty one.  A disk must never
 *         hang on a missing reader: with no reader open the record is
 *         dropped at once.  The bound is per bio: no bio waits longer than
 *         wait_ms (plus the time the work item takes to run).  When the
 *         oldest waiting bio has waited wait_ms, the device falls back to
 *         dropping, with a rate-limited kernel warning, until the buffer has
 *         drained to a quarter; so a reader that frees space now and then,
 *         but too slowly, cannot keep the N-th bio waiting N x wait_ms.  The
 *         first sequence number lost in wait mode is kept in status
 *         (lost_from) until reset-stats; the stream shows the gap.  A
 *         REQ_NOWAIT bio that would wait fails with BLK_STS_AGAIN instead
 *         (its submitter retries without NOWAIT).
 *
 * Suspend.  Nothing waits across a suspend: presuspend stops waiting,
 * records each waiting bio whose record fits and drops (counts, lost_from,
 * a gap in the stream) the record of each that does not, and submits them
 * all, so dmsetup suspend, a reload or a removal returns at once however
 * slow the reader is.  Until resume (or a cancelled suspend) no bio waits.
 * The destructor then finds the waiting list empty by construction.
 *
 * Ioctls.  The target has no .prepare_ioctl, so device-mapper refuses
 * (ENOTTY) every ioctl that it would otherwise hand to the device below:
 * SG_IO and the other SCSI and NVMe passthrough commands.  A passthrough
 * WRITE would change the disk with no bio and so no record; a tracer must
 * not let a write past unseen.  The block layer's own ioctls (BLKDISCARD,
 * BLKZEROOUT, BLKFLSBUF, sizes) become bios and are recorded like any
 * other.  Send passthrough commands (smartctl, sg_*) to the disk itself.
 * Persistent reservations (IOC_PR_*) are not all refused: device-mapper
 * hands registration (and on newer kernels the other commands too) to the
 * disk through .iterate_devices, not through the target, so they may reach
 * it unrecorded.  They change which hosts may write, never the data.
 *
 * Features: REQ_NOWAIT bios are accepted where the kernel has
 * DM_TARGET_NOWAIT (.map never sleeps).  Integrity metadata and inline
 * encryption are not passed through: the device below generates and checks
 * its own protection information, and fscrypt falls back to encrypting
 * above the mapped device, so the trace holds ciphertext, never keys.
 * Zoned devices are refused when the table is loaded.
 *
 * Status:
 *   INFO:  bios=N bytes=N records=N dropped=N capture=MODE buffer=BYTES
 *          used=BYTES log=on|off overflow=drop|wait waiting=N waited=N
 *          fallbacks=N lost_from=SEQ|-
 *   TABLE: the table arguments, as given (with the current capture mode
 *          and log setting, if they were given or changed by message)
 *
 * Messages:
 *   mark <label>                  put a mark record in the stream; replies
 *                                 with the mark's sequence number
 *   capture meta|writes|all       change what is copied, at once
 *   log on|off                    also print each bio to the kernel log,
 *                                 rate-limited
 *   overflow drop|wait            change the overflow policy, at once
 *   reset-stats                   zero the INFO counters
 */

#include <linux/module.h>
#include <linux/init.h>
#include <linux/bio.h>
#include <linux/slab.h>
#include <linux/sched.h>
#include <linux/ratelimit.h>
#include <linux/log2.h>
#include <linux/workqueue.h>
#include <linux/device-mapper.h>

#include "compat.h"
#include "imgrement.h"

#define DM_MSG_PREFIX "imgrement"

#define IMGREMENT_DEFAULT_BUFFER_KB	(16 * 1024)
#define IMGREMENT_MIN_BUFFER_KB		64
#define IMGREMENT_MAX_BUFFER_KB		(1024 * 1024)
#define IMGREMENT_DEFAULT_WAIT_MS	5000
#define IMGREMENT_MIN_WAIT_MS		10
#define IMGREMENT_MAX_WAIT_MS		60000	/* under the hung-task watchdog's */

/*
 * The largest record: header, one segment per 512 bytes at worst (U16_MAX
 * at most) and the payload.  Sizes are computed in u64 and compared with the
 * buffer (at most 1 GiB) before they become a u32 reservation.
 */
#define IMGREMENT_MAX_SEGMENTS		U16_MAX

/* Which optional arguments were given, so TABLE status gives them back. */
enum {
	OPT_CAPTURE,
	OPT_BUFFER,
	OPT_LOG,
	OPT_OVERFLOW,
	OPT_WAIT_MS,
};

/* One target (one table line). */
struct imgrement_c {
	struct dm_target *ti;
	struct dm_dev *dev;
	sector_t start;			/* offset into dev, in sectors */
	struct imgrement_dev *idev;	/* the stream, shared across reloads */
	u32 buffer_kb;
	unsigned long opts;		/* OPT_* bits given in the table or by
					 * message: atomic bitops */
	int capture;			/* enum imgrement_capture; READ_ONCE */
	bool log;			/* READ_ONCE */
	int overflow;			/* enum imgrement_overflow; READ_ONCE */
	u32 wait_ms;			/* how long one bio may wait */
	u32 split_sectors;		/* wait mode: the largest data bio */
	struct ratelimit_state log_rs;
};

/* Who submitted a bio, and when: taken in .map, even if it is recorded later. */
struct imgrement_origin {
	u64 submit_ns;
	pid_t pid, tid;
	char comm[TASK_COMM_LEN];
};

/* Per-bio state, from .map to .end_io. */
struct imgrement_io {
	struct imgrement_bio_record *rec;	/* NULL: dropped */
	struct bvec_iter iter;			/* the bio's data, for reads */
	bool copy_at_end;			/* copy the payload in end_io */
	struct imgrement_c *ic;			/* for a bio that waits */
	unsigned long queued;			/* jiffies: when it began to wait */
	struct imgrement_origin from;		/* for a bio that waits */
};

/* Records and submits bios that wait for space (lossless mode). */
static struct workqueue_struct *imgrement_wq;

static LIST_HEAD(imgrement_devs);
static DEFINE_MUTEX(imgrement_devs_lock);

const char *imgrement_capture_name(enum imgrement_capture capture)
{
	switch (capture) {
	case IMGREMENT_CAPTURE_META:
		return "meta";
	case IMGREMENT_CAPTURE_WRITES:
		return "writes";
	case IMGREMENT_CAPTURE_ALL:
		return "all";
	}
	return "?";
}

const char *imgrement_overflow_name(enum imgrement_overflow overflow)
{
	return overflow == IMGREMENT_OVERFLOW_WAIT ? "wait" : "drop";
}

static int parse_overflow(const char *s)
{
	if (!strcmp(s, "drop"))
		return IMGREMENT_OVERFLOW_DROP;
	if (!strcmp(s, "wait"))
		return IMGREMENT_OVERFLOW_WAIT;
	return -EINVAL;
}

static int parse_capture(const char *s)
{
	if (!strcmp(s, "meta"))
		return IMGREMENT_CAPTURE_META;
	if (!strcmp(s, "writes"))
		return IMGREMENT_CAPTURE_WRITES;
	if (!strcmp(s, "all"))
		return IMGREMENT_CAPTURE_ALL;
	return -EINVAL;
}

static int parse_on_off(const char *s)
{
	if (!strcmp(s, "on"))
		return 1;
	if (!strcmp(s, "off"))
		return 0;
	return -EINVAL;
}

/*
 * Find the stream of @md, or make it.  A reload finds the one its old table
 * uses; its buffer size cannot change while the device exists.
 */
static void imgrement_defer_work(struct work_struct *work);
static void imgrement_on_space(struct imgrement_ring *ring);
static void imgrement_readers_changed(struct imgrement_dev *dev, int delta);
static void imgrement_dev_release(struct kref *kref);

static const struct imgrement_stream_ops imgrement_stream_ops = {
	.readers_changed = imgrement_readers_changed,
	.release = imgrement_dev_release,
};

static struct imgrement_dev *imgrement_dev_get(struct dm_target *ti, u32 buffer_kb)
{
	struct mapped_device *md = dm_table_get_md(ti->table);
	struct imgrement_dev *dev;
	int ret;

	mutex_lock(&imgrement_devs_lock);
	list_for_each_entry(dev, &imgrement_devs, list) {
		if (dev->md != md)
			continue;
		if (dev->ring.size != buffer_kb * 1024) {
			ti->error = "The buffer size of an existing device cannot change";
			dev = ERR_PTR(-EINVAL);
		} else {
			refcount_inc(&dev->users);
		}
		goto out;
	}

	dev = kzalloc(sizeof(*dev), GFP_KERNEL);
	if (!dev) {
		ti->error = "Cannot allocate device state";
		dev = ERR_PTR(-ENOMEM);
		goto out;
	}
	ret = imgrement_ring_init(&dev->ring, buffer_kb * 1024);
	if (ret) {
		ti->error = "Cannot allocate the record buffer";
		kfree(dev);
		dev = ERR_PTR(ret);
		goto out;
	}
	refcount_set(&dev->users, 1);
	kref_init(&dev->kref);
	mutex_init(&dev->name_lock);
	spin_lock_init(&dev->defer_lock);
	bio_list_init(&dev->deferred);
	INIT_DELAYED_WORK(&dev->defer_work, imgrement_defer_work);
	atomic_set(&dev->readers, 0);
	atomic64_set(&dev->lost_from, -1);
	/*
	 * Stalls and recoveries are counted in status; the log gets at most
	 * four lines a minute per device, the rest summed up at removal.
	 */
	ratelimit_state_init(&dev->stall_rs, 60 * HZ, 4);
	ratelimit_set_flags(&dev->stall_rs, RATELIMIT_MSG_ON_RELEASE);
	dev->ops = &imgrement_stream_ops;
	dev->ring.on_space = imgrement_on_space;
	dev->md = md;
	dev->devt = disk_devt(dm_disk(md));
	if (dm_copy_name_and_uuid(md, dev->name, NULL))
		strscpy(dev->name, dm_disk(md)->disk_name, sizeof(dev->name));
	imgrement_debugfs_add(dev);
	list_add(&dev->list, &imgrement_devs);
out:
	mutex_unlock(&imgrement_devs_lock);
	return dev;
}

static void imgrement_dev_release(struct kref *kref)
{
	struct imgrement_dev *dev = container_of(kref, struct imgrement_dev, kref);

	imgrement_ring_exit(&dev->ring);
	mutex_destroy(&dev->name_lock);
	kfree(dev);
}

static void imgrement_dev_put(struct imgrement_dev *dev)
{
	mutex_lock(&imgrement_devs_lock);
	if (!refcount_dec_and_test(&dev->users)) {
		mutex_unlock(&imgrement_devs_lock);
		return;
	}
	list_del(&dev->list);
	mutex_unlock(&imgrement_devs_lock);

	/*
	 * No bio is in flight (dm waited for them), and presuspend, which dm
	 * calls before any table goes, let every waiting bio go on: none waits.
	 */
	WARN_ON_ONCE(!bio_list_empty(&dev->deferred));
	cancel_delayed_work_sync(&dev->defer_work);
	ratelimit_state_exit(&dev->stall_rs);
	/* Readers drain what is left, then see end of file. */
	imgrement_ring_close(&dev->ring);
	imgrement_debugfs_remove(dev);
	kref_put(&dev->kref, imgrement_dev_release);
}

/*
 * Keep the debugfs directory named after the device across renames.  A
 * rename reaches no target hook, so this runs at resume, the first hook dm
 * calls after one that the device goes through anyway (a reload, LVM's
 * suspend and resume); until then the directory keeps the old name, and
 * its "dev" file (major:minor) is how readers find it.  .status stays a
 * plain report.  The usual case, a name unchanged, takes only the device's
 * own lock.
 */
static void imgrement_dev_sync_name(struct imgrement_dev *dev)
{
	char name[DM_NAME_LEN];
	bool same;

	if (dm_copy_name_and_uuid(dev->md, name, NULL))
		return;
	mutex_lock(&dev->name_lock);
	same = !strcmp(dev->name, name);
	mutex_unlock(&dev->name_lock);
	if (same)
		return;
	/* The global lock keeps directory names unique across devices. */
	mutex_lock(&imgrement_devs_lock);
	mutex_lock(&dev->name_lock);
	imgrement_debugfs_rename(dev, name);
	mutex_unlock(&dev->name_lock);
	mutex_unlock(&imgrement_devs_lock);
}

/* Parse one optional argument; each may be given once. */
static int imgrement_parse_opt(struct imgrement_c *ic, const char *arg, u32 *buffer_kb,
			       char **error)
{
	int v;

	if (!strncmp(arg, "capture:", 8) && !test_bit(OPT_CAPTURE, &ic->opts)) {
		v = parse_capture(arg + 8);
		if (v < 0) {
			*error = "Invalid capture mode: expected capture:meta, capture:writes or capture:all";
			return -EINVAL;
		}
		ic->capture = v;
		__set_bit(OPT_CAPTURE, &ic->opts);
	} else if (!strncmp(arg, "buffer_kb:", 10) && !test_bit(OPT_BUFFER, &ic->opts)) {
		if (kstrtou32(arg + 10, 10, buffer_kb) ||
		    *buffer_kb < IMGREMENT_MIN_BUFFER_KB ||
		    *buffer_kb > IMGREMENT_MAX_BUFFER_KB) {
			*error = "Invalid buffer_kb: expected 64 to 1048576";
			return -EINVAL;
		}
		__set_bit(OPT_BUFFER, &ic->opts);
	} else if (!strncmp(arg, "log:", 4) && !test_bit(OPT_LOG, &ic->opts)) {
		v = parse_on_off(arg + 4);
		if (v < 0) {
			*error = "Invalid log setting: expected log:on or log:off";
			return -EINVAL;
		}
		ic->log = v;
		__set_bit(OPT_LOG, &ic->opts);
	} else if (!strncmp(arg, "overflow:", 9) && !test_bit(OPT_OVERFLOW, &ic->opts)) {
		v = parse_overflow(arg + 9);
		if (v < 0) {
			*error = "Invalid overflow policy: expected overflow:drop or overflow:wait";
			return -EINVAL;
		}
		ic->overflow = v;
		__set_bit(OPT_OVERFLOW, &ic->opts);
	} else if (!strncmp(arg, "wait_ms:", 8) && !test_bit(OPT_WAIT_MS, &ic->opts)) {
		if (kstrtou32(arg + 8, 10, &ic->wait_ms) ||
		    ic->wait_ms < IMGREMENT_MIN_WAIT_MS ||
		    ic->wait_ms > IMGREMENT_MAX_WAIT_MS) {
			*error = "Invalid wait_ms: expected 10 to 60000";
			return -EINVAL;
		}
		__set_bit(OPT_WAIT_MS, &ic->opts);
	} else {
		*error = "Unknown or repeated optional argument";
		return -EINVAL;
	}
	return 0;
}

/*
 * Construct a mapping:
 *   <device> [<offset> [<#opt_args> <opt_args>...]]
 *
 * <device>     the block device to watch: a path or major:minor
 * <offset>     first sector of the device to map (default 0); the mapped
 *              range must lie inside the device
 * <opt_args>, each one word:
 *   capture:meta|writes|all   what to copy besides metadata (default writes)
 *   buffer_kb:<N>             record buffer size in KiB, 64 to 1048576
 *                             (default 16384); fixed while the device exists
 *   log:on|off                print each bio to the kernel log (default off)
 *   overflow:drop|wait        when a record does not fit, drop it (default)
 *                             or make the bio wait for space (lossless)
 *   wait_ms:<N>               in wait mode, the longest a bio waits before
 *                             the device falls back to dropping: 10 to
 *                             60000 (default 5000)
 */
static int imgrement_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	static const struct dm_arg _args[] = {
		{0, 5, "Invalid optional argument count: 0 to 5 options may follow it"},
	};
	struct dm_arg_set as = { .argc = argc, .argv = argv };
	const char *path, *arg;
	struct imgrement_c *ic;
	unsigned long long start = 0;
	unsigned int nr_opts = 0;
	u32 buffer_kb = IMGREMENT_DEFAULT_BUFFER_KB;
	int ret;

	path = dm_shift_arg(&as);
	if (!path) {
		ti->error = "Invalid argument count: expected <device> [<offset> [<#opts> <opts>...]]";
		return -EINVAL;
	}
	/* kstrto*() refuse overflow, which sscanf() would silently wrap. */
	arg = dm_shift_arg(&as);
	if (arg && kstrtoull(arg, 10, &start)) {
		ti->error = "Invalid offset: expected a sector number";
		return -EINVAL;
	}
	if (start != (sector_t)start) {
		ti->error = "Offset too large";
		return -EINVAL;
	}
	if (as.argc && dm_read_arg_group(_args, &as, &nr_opts, &ti->error))
		return -EINVAL;
	if (as.argc != nr_opts) {
		ti->error = "Invalid optional argument count: it must equal the arguments that follow";
		return -EINVAL;
	}

	ic = kzalloc(sizeof(*ic), GFP_KERNEL);
	if (!ic) {
		ti->error = "Cannot allocate context";
		return -ENOMEM;
	}
	ic->ti = ti;
	ic->start = start;
	ic->capture = IMGREMENT_CAPTURE_WRITES;
	ic->overflow = IMGREMENT_OVERFLOW_DROP;
	ic->wait_ms = IMGREMENT_DEFAULT_WAIT_MS;
	/* At most 20 bios in any 5 seconds reach the kernel log. */
	ratelimit_state_init(&ic->log_rs, 5 * HZ, 20);
	ratelimit_set_flags(&ic->log_rs, RATELIMIT_MSG_ON_RELEASE);

	while ((arg = dm_shift_arg(&as))) {
		ret = imgrement_parse_opt(ic, arg, &buffer_kb, &ti->error);
		if (ret)
			goto bad;
	}
	ic->buffer_kb = buffer_kb;
	/*
	 * Wait mode: every record must fit in an empty buffer, so .map splits
	 * data bios to a quarter of it, which with its segments stays under half.
	 */
	ic->split_sectors = rounddown_pow_of_two(buffer_kb * 1024 / 4) >> SECTOR_SHIFT;

	ret = dm_get_device(ti, path, dm_table_get_mode(ti->table), &ic->dev);
	if (ret) {
		ti->error = "Device lookup failed";
		goto bad;
	}
	if (ic->start > imgrement_bdev_nr_sectors(ic->dev->bdev) ||
	    ti->len > imgrement_bdev_nr_sectors(ic->dev->bdev) - ic->start) {
		ti->error = "Mapping extends past the end of the device";
		ret = -EINVAL;
		goto bad_put;
	}

	ic->idev = imgrement_dev_get(ti, buffer_kb);
	if (IS_ERR(ic->idev)) {
		ret = PTR_ERR(ic->idev);
		goto bad_put;
	}

	ti->num_flush_bios = 1;
	/* (see compat.h: 5.10's loop over overlayfs claims discard it cannot do) */
	ti->num_discard_bios = imgrement_discard_broken(ic->dev->bdev) ? 0 : 1;
	ti->num_secure_erase_bios = 1;
	ti->num_write_zeroes_bios = 1;
	ti->per_io_data_size = sizeof(struct imgrement_io);
	/* Bios that waited are submitted (and so accounted) from the work item. */
	imgrement_accounts_remapped_io(ti);
	/* Swap bios can wait too: dm limits how many are in flight. */
	imgrement_limit_swap_bios(ti);
	ti->private = ic;
	return 0;

bad_put:
	dm_put_device(ti, ic->dev);
bad:
	kfree(ic);
	return ret;
}

static void imgrement_dtr(struct dm_target *ti)
{
	struct imgrement_c *ic = ti->private;

	/* Says how many log lines the rate limit held back (MSG_ON_RELEASE). */
	ratelimit_state_exit(&ic->log_rs);
	imgrement_dev_put(ic->idev);
	dm_put_device(ti, ic->dev);
	kfree(ic);
}

static u8 record_op(struct bio *bio)
{
	switch (bio_op(bio)) {
	case REQ_OP_READ:
		return IMGREMENT_OP_READ;
	case REQ_OP_WRITE:
		if (!bio_has_data(bio) && (bio->bi_opf & REQ_PREFLUSH))
			return IMGREMENT_OP_FLUSH;
		return IMGREMENT_OP_WRITE;
	case REQ_OP_FLUSH:
		return IMGREMENT_OP_FLUSH;
	case REQ_OP_DISCARD:
		return IMGREMENT_OP_DISCARD;
	case REQ_OP_SECURE_ERASE:
		return IMGREMENT_OP_SECURE_ERASE;
	case REQ_OP_WRITE_ZEROES:
		return IMGREMENT_OP_WRITE_ZEROES;
	case REQ_OP_ZONE_APPEND:
		return IMGREMENT_OP_ZONE_APPEND;
	default:
		if (op_is_zone_mgmt(bio_op(bio)))
			return IMGREMENT_OP_ZONE_MGMT;
		return IMGREMENT_OP_OTHER;
	}
}

/*
 * The record's flag for each request flag it keeps, by the flag's bit in
 * bi_opf (the bits differ between kernels; their names do not); the flags
 * it does not keep are 0 here.  record_flags() looks up only the flag bits
 * a bio has set, usually two (a direct write's REQ_SYNC and REQ_IDLE):
 * testing all eleven one by one cost a traced bio about 50 instructions in
 * the cost bench's profile.  32 entries: any bit of a u32 bi_opf has one.
 */
static const u16 record_flag_of_bit[32] = {
	[__REQ_FUA] = IMGREMENT_F_FUA,
	[__REQ_PREFLUSH] = IMGREMENT_F_PREFLUSH,
	[__REQ_SYNC] = IMGREMENT_F_SYNC,
	[__REQ_META] = IMGREMENT_F_META,
	[__REQ_PRIO] = IMGREMENT_F_PRIO,
	[__REQ_RAHEAD] = IMGREMENT_F_RAHEAD,
	[__REQ_BACKGROUND] = IMGREMENT_F_BACKGROUND,
	[__REQ_NOWAIT] = IMGREMENT_F_NOWAIT,
	[__REQ_NOUNMAP] = IMGREMENT_F_NOUNMAP,
	[__REQ_IDLE] = IMGREMENT_F_IDLE,
	[__REQ_NOMERGE] = IMGREMENT_F_NOMERGE,
};

static u32 record_flags(struct bio *bio)
{
	unsigned long bits = (__force u32)(bio->bi_opf & ~REQ_OP_MASK);
	u32 f = 0;

	BUILD_BUG_ON(__REQ_NR_BITS > 32);
	for (; bits; bits &= bits - 1)
		f |= record_flag_of_bit[__ffs(bits)];
	return f;
}

static char op_letter(u8 op)
{
	static const char letters[] = "RWFDEZAM";

	return op < sizeof(letters) - 1 ? letters[op] : '?';
}

/* The prototype's shape, with 64-bit sectors; rate-limited per target. */
static void log_bio(struct imgrement_c *ic, struct bio *bio, u8 op, sector_t sector)
{
	struct bvec_iter iter;
	struct bio_vec bv;
	unsigned int i = 0;
	u64 done = 0;		/* bytes before this segment: sectors stay exact */

	if (!__ratelimit(&ic->log_rs))
		return;
	pr_info("imgrement: %c, bytes to transfer: %u, delta count: %u\n",
		op_letter(op), bio->bi_iter.bi_size,
		bio_has_data(bio) ? bio_segments(bio) : 0);
	if (!bio_has_data(bio))
		return;
	bio_for_each_segment(bv, bio, iter) {
		sector_t first = sector + (done >> SECTOR_SHIFT);
		sector_t last = sector + ((done + bv.bv_len - 1) >> SECTOR_SHIFT);

		if (i == 8) {
			pr_info("imgrement: (%u more segments not shown)\n",
				bio_segments(bio) - i);
			break;
		}
		pr_info("imgrement: bv #%u: len %u, offset %u, %u sectors (%llu..%llu)\n",
			i, bv.bv_len, bv.bv_offset, bv.bv_len >> SECTOR_SHIFT,
			(unsigned long long)first, (unsigned long long)last);
		done += bv.bv_len;
		i++;
	}
}

/* Copy the data described by @iter into @dst. */
static void copy_payload(struct bio *bio, struct bvec_iter iter, char *dst)
{
	struct bvec_iter it;
	struct bio_vec bv;

	__bio_for_each_segment(bv, bio, it, iter) {
		imgrement_memcpy_from_bvec(dst, &bv);
		dst += bv.bv_len;
	}
}

/*
 * The bio's segments are the pieces bio_for_each_segment() gives: each
 * bvec of the bio's range (the bvecs are multi-page: contiguous pages merge
 * into one) cut at page boundaries.  The record keeps them as runs (see
 * struct imgrement_segment): a bvec is one run, and it continues the run
 * before it when that one ended a page and it starts one.  A 1 MiB write of
 * whole pages is thus one 16-byte entry where 256 segments cost the record
 * 4 KiB, record_bio about 8,000 instructions and the consumer as many again
 * to store it (the cost bench's profile); a reader cuts a run into its
 * segments by arithmetic.
 *
 * walk_runs() walks the bvec array itself, from bi_iter's bvec and the bytes
 * done in it, as the iterator does, once: it writes the first @max runs to
 * @out and returns how many there are.  record_bio() gives it a few entries
 * on the stack, which hold every run of most bios, so it knows the record's
 * size and its entries from one walk (two walks, one to count and one to
 * fill, cost a 1 MiB write of 256 one-page bvecs about 4,900 instructions);
 * a bio of more runs is walked again into its record.  A bio that does not
 * advance through its bvecs (5.10's WRITE_SAME repeats one over bi_size) is
 * left to the iterator, each of its segments an entry of its own.
 */
#define IMGREMENT_STACK_RUNS	4

static inline void put_segment(struct imgrement_segment *seg, unsigned int len,
			       unsigned int offset, sector_t sector, u64 done)
{
	seg->len = cpu_to_le32(len);
	seg->offset = cpu_to_le32(offset);
	/*
	 * The bio's sector plus the bytes before it, counted in bytes, since
	 * a segment need not be whole sectors (an O_DIRECT buffer that
	 * crosses a page gives, say, 64 + 448 bytes).
	 */
	seg->sector = cpu_to_le64(sector + (done >> SECTOR_SHIFT));
}

static unsigned int walk_runs(struct bio *bio, sector_t sector,
			      struct imgrement_segment *out, unsigned int max)
{
	const struct bio_vec *bv = bio->bi_io_vec + bio->bi_iter.bi_idx;
	unsigned int skip = bio->bi_iter.bi_bvec_done;
	unsigned int size = bio->bi_iter.bi_size;
	unsigned int left = size;
	unsigned int run_left = 0, run_offset = 0;
	unsigned int run_end = 1;	/* in-page end of the open run; 1: none */
	unsigned int n = 0;

	if (!bio_has_data(bio))
		return 0;
	if (unlikely(bio_no_advance_iter(bio))) {
		struct bvec_iter iter;
		struct bio_vec one;
		u64 done = 0;

		bio_for_each_segment(one, bio, iter) {
			if (n < max)
				put_segment(out + n, one.bv_len, one.bv_offset, sector, done);
			n++;
			done += one.bv_len;
		}
		return n;
	}
	for (; left; bv++, skip = 0) {
		unsigned int len = min(left, bv->bv_len - skip);
		unsigned int offset = offset_in_page(bv->bv_offset + skip);

		/* an empty segment is a run of its own: nothing continues it */
		if (run_end || offset || !len) {
			/* the open run (the bytes from run_left to left) is whole */
			if (n && n <= max)
				put_segment(out + n - 1, run_left - left, run_offset,
					    sector, size - run_left);
			n++;
			run_left = left;
			run_offset = offset;
		}
		run_end = len ? offset_in_page(offset + len) : 1;
		left -= len;
	}
	if (n && n <= max)
		put_segment(out + n - 1, run_left, run_offset, sector, size - run_left);
	return n;
}

/*
 * The submitter's command name, NUL-padded, read without task_lock() as the
 * scheduler's tracepoints read it: a rename racing with the bio can give a
 * mix of the two names, never a run past the buffer (the copy stops at the
 * first NUL and at 15 bytes, and pads with NULs itself, since some kernels
 * rename with strlcpy, which leaves the old name's tail behind the NUL).
 * get_task_comm() cost a traced bio about 100 instructions more in the
 * cost bench's profile (the lock, __get_task_comm, strscpy_pad, strscpy).
 */
static void copy_comm(char *dst)
{
	const char *src = current->comm;
	unsigned int i;
	char c;

	BUILD_BUG_ON(sizeof(current->comm) != IMGREMENT_COMM_LEN);
	for (i = 0; i < IMGREMENT_COMM_LEN - 1; i++) {
		c = READ_ONCE(src[i]);
		if (!c)
			break;
		dst[i] = c;
	}
	for (; i < IMGREMENT_COMM_LEN; i++)
		dst[i] = '\0';
}

static void take_origin(struct imgrement_origin *from)
{
	from->submit_ns = ktime_get_ns();
	from->pid = task_tgid_nr(current);
	from->tid = task_pid_nr(current);
	copy_comm(from->comm);
}

/* A record was dropped: in wait mode, the capture is incomplete from @seq on. */
static void note_drop(struct imgrement_c *ic, u64 seq)
{
	atomic64_inc(&ic->idev->dropped);
	if (READ_ONCE(ic->overflow) == IMGREMENT_OVERFLOW_WAIT)
		atomic64_cmpxchg(&ic->idev->lost_from, -1, seq);
}

/*
 * Reserve and fill the record of @bio (at @sector on the traced device),
 * submitted as @from says.  Returns false only when it does not fit and
 * !@may_drop; a record that does not fit otherwise is dropped and counted.
 */
static bool record_bio(struct imgrement_c *ic, struct bio *bio, sector_t sector,
		       bool may_drop, const struct imgrement_origin *from)
{
	struct imgrement_io *io = dm_per_bio_data(bio, sizeof(struct imgrement_io));
	int capture = READ_ONCE(ic->capture);
	u8 op = record_op(bio);
	struct imgrement_segment runs[IMGREMENT_STACK_RUNS];
	unsigned int nr_segs = walk_runs(bio, sector, runs, IMGREMENT_STACK_RUNS);
	u32 payload = 0, rflags = 0;
	struct imgrement_bio_record *rec;
	u64 seq, bytes;

	/* Records are whole 8-byte units; the header alone is never empty. */
	BUILD_BUG_ON(sizeof(*rec) % 8 || sizeof(struct imgrement_segment) % 8);

	io->rec = NULL;
	io->copy_at_end = false;
	if (op == IMGREMENT_OP_WRITE && capture != IMGREMENT_CAPTURE_META)
		payload = bio->bi_iter.bi_size;
	else if (op == IMGREMENT_OP_READ && capture == IMGREMENT_CAPTURE_ALL)
		payload = bio->bi_iter.bi_size;
	if (nr_segs > IMGREMENT_MAX_SEGMENTS)
		nr_segs = IMGREMENT_MAX_SEGMENTS;	/* a 256 MiB bio: keep the first ones */

	/* In u64: a bio of almost 4 GiB plus its segments would wrap a u32. */
	bytes = sizeof(*rec) + (u64)nr_segs * sizeof(struct imgrement_segment) + payload;
	if (payload && bytes > ic->idev->ring.size && may_drop) {
		/*
		 * Drop mode, a bio too large for its data ever to be kept (wait
		 * mode splits bios so this cannot happen): keep what happened,
		 * flagged, rather than nothing.
		 */
		bytes -= payload;
		payload = 0;
		rflags = IMGREMENT_R_NO_ROOM;
	}
	/* Larger than the buffer (at most 1 GiB): reserving fails, as it must. */
	rec = (struct imgrement_bio_record *)imgrement_ring_reserve(&ic->idev->ring,
								    min_t(u64, bytes, U32_MAX & ~7U),
								    may_drop, &seq);
	if (!rec) {
		if (!may_drop)
			return false;
		note_drop(ic, seq);
		return true;
	}
	rec->sector = cpu_to_le64(sector);
	rec->bytes = cpu_to_le32(bio->bi_iter.bi_size);
	rec->op = op;
	rec->raw_op = (__force u8)bio_op(bio);
	rec->nr_segments = cpu_to_le16(nr_segs);
	rec->flags = cpu_to_le32(record_flags(bio));
	rec->rflags = cpu_to_le32(payload ? IMGREMENT_R_PAYLOAD : rflags);
	rec->complete_ns = 0;
	rec->status = 0;
	rec->payload_len = cpu_to_le32(payload);
	if (from) {
		rec->submit_ns = cpu_to_le64(from->submit_ns);
		rec->pid = cpu_to_le32(from->pid);
		rec->tid = cpu_to_le32(from->tid);
		memcpy(rec->comm, from->comm, sizeof(rec->comm));
	} else {
		rec->submit_ns = cpu_to_le64(ktime_get_ns());
		rec->pid = cpu_to_le32(task_tgid_nr(current));
		rec->tid = cpu_to_le32(task_pid_nr(current));
		copy_comm(rec->comm);
	}
	/*
	 * One run (most bios) as a struct, not a memcpy() of a length known
	 * only here: the call cost a traced bio about 20 instructions.
	 */
	if (nr_segs == 1)
		*(struct imgrement_segment *)(rec + 1) = runs[0];
	else if (nr_segs > IMGREMENT_STACK_RUNS)
		walk_runs(bio, sector, (struct imgrement_segment *)(rec + 1), nr_segs);
	else if (nr_segs)
		memcpy(rec + 1, runs, nr_segs * sizeof(*runs));
	/*
	 * Zero the padding after the payload: no stale bytes reach readers.
	 * Most records have none: the header and the runs are whole 8-byte
	 * units, and so is a payload of whole sectors.
	 */
	if (le32_to_cpu(rec->hdr.size) != bytes)
		memset((char *)rec + bytes, 0, le32_to_cpu(rec->hdr.size) - bytes);

	if (payload && op == IMGREMENT_OP_WRITE) {
		/* As submitted: the pages may change once the bio completes. */
		copy_payload(bio, bio->bi_iter,
			     (char *)rec + sizeof(*rec) +
			     nr_segs * sizeof(struct imgrement_segment));
	} else if (payload) {
		/* A read: the data exists only once the device has filled it. */
		io->iter = bio->bi_iter;
		io->copy_at_end = true;
	}
	io->rec = rec;
	return true;
}

static void imgrement_remap(struct imgrement_c *ic, struct bio *bio)
{
	bio_set_dev(bio, ic->dev->bdev);
	if (bio_sectors(bio) || op_is_zone_mgmt(bio_op(bio)))
		bio->bi_iter.bi_sector = ic->start +
			dm_target_offset(ic->ti, bio->bi_iter.bi_sector);
}

/* Waiting is worth it only with a reader to free space, and not after a stall. */
static bool imgrement_may_wait(struct imgrement_dev *idev)
{
	if (unlikely(test_bit(IMGREMENT_FALLBACK, &idev->state))) {
		if (imgrement_ring_used(&idev->ring) > idev->ring.size / 4)
			return false;
		/* The reader caught up: lossless again (lost_from stays). */
		if (test_and_clear_bit(IMGREMENT_FALLBACK, &idev->state) &&
		    __ratelimit(&idev->stall_rs))
			DMINFO("%s: the reader caught up; bios wait for space again",
			       idev->name);
	}
	return atomic_read(&idev->readers) > 0;
}

/*
 * Wait mode, in .map: record @bio now if it fits and nothing waits before
 * it; otherwise put it on the waiting list (or fail a NOWAIT bio).  Returns
 * true when the bio goes on now (recorded, or dropped for lack of a reader
 * or because the device is suspending).
 */
static bool imgrement_record_or_defer(struct imgrement_c *ic, struct bio *bio)
{
	struct imgrement_dev *idev = ic->idev;
	struct imgrement_io *io = dm_per_bio_data(bio, sizeof(struct imgrement_io));
	unsigned long flags;

	io->rec = NULL;		/* per-bio data comes uninitialised: end_io reads it */
	io->copy_at_end = false;
	if (!imgrement_may_wait(idev))
		return record_bio(ic, bio, bio->bi_iter.bi_sector, true, NULL);
	if (!READ_ONCE(idev->nr_deferred) &&
	    record_bio(ic, bio, bio->bi_iter.bi_sector, false, NULL))
		return true;
	if (bio->bi_opf & REQ_NOWAIT) {
		bio_wouldblock_error(bio);	/* io->rec is NULL: end_io has nothing */
		return false;
	}
	io->ic = ic;
	io->queued = jiffies;
	take_origin(&io->from);
	spin_lock_irqsave(&idev->defer_lock, flags);
	if (unlikely(idev->draining)) {
		/* Suspending: presuspend waits for the list to empty, not longer. */
		spin_unlock_irqrestore(&idev->defer_lock, flags);
		return record_bio(ic, bio, bio->bi_iter.bi_sector, true, &io->from);
	}
	bio_list_add(&idev->deferred, bio);
	WRITE_ONCE(idev->nr_deferred, idev->nr_deferred + 1);
	spin_unlock_irqrestore(&idev->defer_lock, flags);
	atomic64_inc(&idev->waited);
	mod_delayed_work(imgrement_wq, &idev->defer_work, 0);
	return false;
}

/*
 * Record and submit the waiting bios, oldest first, as space allows.  Runs
 * when the list grows, when readers free space (on_space) or come and go,
 * when a suspend begins, and when the oldest waiting bio has waited wait_ms:
 * then the device falls back to dropping, so no bio waits longer.
 */
static void imgrement_defer_work(struct work_struct *work)
{
	struct imgrement_dev *idev = container_of(to_delayed_work(work),
						  struct imgrement_dev, defer_work);
	unsigned long flags, deadline;
	bool draining;
	struct bio *bio;

	for (;;) {
		struct imgrement_io *io;
		struct imgrement_c *ic;
		sector_t sector;

		spin_lock_irqsave(&idev->defer_lock, flags);
		bio = bio_list_peek(&idev->deferred);
		draining = idev->draining;
		spin_unlock_irqrestore(&idev->defer_lock, flags);
		if (!bio)
			return;
		io = dm_per_bio_data(bio, sizeof(struct imgrement_io));
		ic = io->ic;
		sector = bio->bi_iter.bi_sector;
		/* The list is in arrival order: this is the oldest waiting bio. */
		deadline = io->queued + msecs_to_jiffies(READ_ONCE(ic->wait_ms));
		if (draining || !imgrement_may_wait(idev) ||
		    READ_ONCE(ic->overflow) != IMGREMENT_OVERFLOW_WAIT) {
			record_bio(ic, bio, sector, true, &io->from);
		} else if (!record_bio(ic, bio, sector, false, &io->from)) {
			if (time_before(jiffies, deadline)) {
				/* on_space brings us back sooner */
				queue_delayed_work(imgrement_wq, &idev->defer_work,
						   deadline - jiffies);
				return;
			}
			if (!test_and_set_bit(IMGREMENT_FALLBACK, &idev->state)) {
				atomic64_inc(&idev->fallbacks);
				if (__ratelimit(&idev->stall_rs))
					DMWARN("%s: a bio waited %u ms for space; dropping records until the reader catches up (fallbacks in status)",
					       idev->name, READ_ONCE(ic->wait_ms));
			}
			record_bio(ic, bio, sector, true, &io->from);
		}
		spin_lock_irqsave(&idev->defer_lock, flags);
		bio_list_pop(&idev->deferred);
		WRITE_ONCE(idev->nr_deferred, idev->nr_deferred - 1);
		spin_unlock_irqrestore(&idev->defer_lock, flags);
		imgrement_remap(ic, bio);
		imgrement_submit_remapped(bio);
		cond_resched();
	}
}

static void imgrement_kick(struct imgrement_dev *idev)
{
	if (READ_ONCE(idev->nr_deferred))
		mod_delayed_work(imgrement_wq, &idev->defer_work, 0);
}

/* Readers freed space (called by the ring, process context). */
static void imgrement_on_space(struct imgrement_ring *ring)
{
	imgrement_kick(container_of(ring, struct imgrement_dev, ring));
}

static void imgrement_readers_changed(struct imgrement_dev *dev, int delta)
{
	/* The last reader going leaves waiting bios nobody will make room for. */
	if (atomic_add_return(delta, &dev->readers) == 0)
		imgrement_kick(dev);
}

/*
 * Wait mode: a bio that carries data is split to a quarter of the buffer
 * here, by the policy in force now (dm maps the rest as a bio of its own),
 * so that its record fits in an empty buffer.  Drop mode never splits.
 */
static void imgrement_fit_to_buffer(struct imgrement_c *ic, struct bio *bio)
{
	if (bio_has_data(bio) && bio_sectors(bio) > ic->split_sectors)
		dm_accept_partial_bio(bio, ic->split_sectors);
}

static int imgrement_map(struct dm_target *ti, struct bio *bio)
{
	struct imgrement_c *ic = ti->private;
	struct imgrement_dev *idev = ic->idev;
	bool wait = READ_ONCE(ic->overflow) == IMGREMENT_OVERFLOW_WAIT;
	sector_t sector = bio->bi_iter.bi_sector;	/* on the traced device */

	if (wait)
		imgrement_fit_to_buffer(ic, bio);
	atomic64_inc(&idev->bios);
	atomic64_add(bio->bi_iter.bi_size, &idev->bytes);
	if (unlikely(READ_ONCE(ic->log)))
		log_bio(ic, bio, record_op(bio), sector);
	if (!wait)
		record_bio(ic, bio, sector, true, NULL);
	else if (!imgrement_record_or_defer(ic, bio))
		return DM_MAPIO_SUBMITTED;
	imgrement_remap(ic, bio);
	return DM_MAPIO_REMAPPED;
}

static int imgrement_end_io(struct dm_target *ti, struct bio *bio,
			    blk_status_t *error)
{
	struct imgrement_c *ic = ti->private;
	struct imgrement_io *io = dm_per_bio_data(bio, sizeof(struct imgrement_io));
	struct imgrement_bio_record *rec = io->rec;

	if (!rec)
		return DM_ENDIO_DONE;
	rec->complete_ns = cpu_to_le64(ktime_get_ns());
	/* (blk_status_to_errno() is a call: most bios need not make it) */
	rec->status = *error ? cpu_to_le32((u32)blk_status_to_errno(*error)) : 0;
	if (io->copy_at_end) {
		u16 nr_segs = le16_to_cpu(rec->nr_segments);

		char *payload = (char *)rec + sizeof(*rec) +
				nr_segs * sizeof(struct imgrement_segment);

		if (*error) {
			/*
			 * A failed read filled nothing worth keeping.  Its space
			 * stays reserved: clear it, or it would show whatever an
			 * earlier record left there (the format promises zeros).
			 */
			memset(payload, 0, le32_to_cpu(rec->payload_len));
			rec->payload_len = 0;
			rec->rflags = 0;
		} else {
			copy_payload(bio, io->iter, payload);
		}
	}
	imgrement_ring_commit(&ic->idev->ring, &rec->hdr, IMGREMENT_REC_BIO);
	atomic64_inc(&ic->idev->records);
	io->rec = NULL;
	return DM_ENDIO_DONE;
}

static int imgrement_mark(struct imgrement_c *ic, unsigned int argc, char **argv,
			  char *result, unsigned int maxlen)
{
	struct imgrement_mark_record *rec;
	unsigned int i, len = 0;
	bool may_drop;
	char *label;
	u64 seq;

	for (i = 1; i < argc; i++)
		len += strlen(argv[i]) + (i > 1);
	if (!len || len > IMGREMENT_MARK_MAX) {
		DMWARN("mark needs a label of 1 to %d bytes", IMGREMENT_MARK_MAX);
		return -EINVAL;
	}
	/* In wait mode a mark that does not fit is not dropped: "full", try again. */
	may_drop = READ_ONCE(ic->overflow) != IMGREMENT_OVERFLOW_WAIT;
	rec = (struct imgrement_mark_record *)imgrement_ring_reserve(&ic->idev->ring,
								     sizeof(*rec) + len,
								     may_drop, &seq);
	if (!rec) {
		if (may_drop)
			note_drop(ic, seq);
		scnprintf(result, maxlen, may_drop ? "dropped" : "full");
		return 1;
	}
	rec->time_ns = cpu_to_le64(ktime_get_ns());
	rec->label_len = cpu_to_le32(len);
	rec->reserved = 0;
	label = (char *)(rec + 1);
	memset(label, 0, le32_to_cpu(rec->hdr.size) - sizeof(*rec));
	for (i = 1; i < argc; i++) {
		size_t n = strlen(argv[i]);

		if (i > 1)
			*label++ = ' ';
		memcpy(label, argv[i], n);
		label += n;
	}
	imgrement_ring_commit(&ic->idev->ring, &rec->hdr, IMGREMENT_REC_MARK);
	atomic64_inc(&ic->idev->records);
	scnprintf(result, maxlen, "seq %llu", seq);
	return 1;
}

static int imgrement_message(struct dm_target *ti, unsigned int argc, char **argv,
			     char *result, unsigned int maxlen)
{
	struct imgrement_c *ic = ti->private;
	int v;

	if (argc >= 1 && !strcasecmp(argv[0], "mark"))
		return imgrement_mark(ic, argc, argv, result, maxlen);
	if (argc == 2 && !strcasecmp(argv[0], "capture")) {
		v = parse_capture(argv[1]);
		if (v < 0) {
			DMWARN("capture needs meta, writes or all");
			return -EINVAL;
		}
		WRITE_ONCE(ic->capture, v);
		set_bit(OPT_CAPTURE, &ic->opts);
		return 0;
	}
	if (argc == 2 && !strcasecmp(argv[0], "log")) {
		v = parse_on_off(argv[1]);
		if (v < 0) {
			DMWARN("log needs on or off");
			return -EINVAL;
		}
		WRITE_ONCE(ic->log, v);
		set_bit(OPT_LOG, &ic->opts);
		return 0;
	}
	if (argc == 2 && !strcasecmp(argv[0], "overflow")) {
		v = parse_overflow(argv[1]);
		if (v < 0) {
			DMWARN("overflow needs drop or wait");
			return -EINVAL;
		}
		WRITE_ONCE(ic->overflow, v);
		set_bit(OPT_OVERFLOW, &ic->opts);
		imgrement_kick(ic->idev);	/* waiting bios go on, if now drop */
		return 0;
	}
	if (argc == 1 && !strcasecmp(argv[0], "reset-stats")) {
		atomic64_set(&ic->idev->bios, 0);
		atomic64_set(&ic->idev->bytes, 0);
		atomic64_set(&ic->idev->records, 0);
		atomic64_set(&ic->idev->dropped, 0);
		atomic64_set(&ic->idev->waited, 0);
		atomic64_set(&ic->idev->fallbacks, 0);
		atomic64_set(&ic->idev->lost_from, -1);
		return 0;
	}
	DMWARN("unrecognised message: expected mark, capture, log, overflow or reset-stats");
	return -EINVAL;
}

static void imgrement_status(struct dm_target *ti, status_type_t type,
			     unsigned int status_flags, char *result,
			     unsigned int maxlen)
{
	struct imgrement_c *ic = ti->private;
	struct imgrement_dev *idev = ic->idev;
	unsigned int sz = 0, nr = 0;
	unsigned long opts;
	s64 lost;

	switch (type) {
	case STATUSTYPE_INFO:
		DMEMIT("bios=%lld bytes=%lld records=%lld dropped=%lld capture=%s buffer=%u used=%llu log=%s",
		       (long long)atomic64_read(&idev->bios),
		       (long long)atomic64_read(&idev->bytes),
		       (long long)atomic64_read(&idev->records),
		       (long long)atomic64_read(&idev->dropped),
		       imgrement_capture_name(READ_ONCE(ic->capture)),
		       idev->ring.size, imgrement_ring_used(&idev->ring),
		       READ_ONCE(ic->log) ? "on" : "off");
		lost = atomic64_read(&idev->lost_from);
		DMEMIT(" overflow=%s waiting=%u waited=%lld fallbacks=%lld",
		       imgrement_overflow_name(READ_ONCE(ic->overflow)),
		       READ_ONCE(idev->nr_deferred),
		       (long long)atomic64_read(&idev->waited),
		       (long long)atomic64_read(&idev->fallbacks));
		if (lost < 0)
			DMEMIT(" lost_from=-");
		else
			DMEMIT(" lost_from=%lld", (long long)lost);
		break;
	case STATUSTYPE_TABLE:
		DMEMIT("%s %llu", ic->dev->name, (unsigned long long)ic->start);
		opts = READ_ONCE(ic->opts);	/* one snapshot: count and list agree */
		if (!opts)
			break;
		nr = hweight_long(opts);
		DMEMIT(" %u", nr);
		if (opts & BIT(OPT_CAPTURE))
			DMEMIT(" capture:%s", imgrement_capture_name(READ_ONCE(ic->capture)));
		if (opts & BIT(OPT_BUFFER))
			DMEMIT(" buffer_kb:%u", ic->buffer_kb);
		if (opts & BIT(OPT_LOG))
			DMEMIT(" log:%s", READ_ONCE(ic->log) ? "on" : "off");
		if (opts & BIT(OPT_OVERFLOW))
			DMEMIT(" overflow:%s", imgrement_overflow_name(READ_ONCE(ic->overflow)));
		if (opts & BIT(OPT_WAIT_MS))
			DMEMIT(" wait_ms:%u", ic->wait_ms);
		break;
#ifdef IMGREMENT_HAVE_STATUSTYPE_IMA
	case STATUSTYPE_IMA:
		DMEMIT("target_name=%s,target_version=%u.%u.%u,device_name=%s,start=%llu,capture=%s;",
		       ti->type->name, ti->type->version[0], ti->type->version[1],
		       ti->type->version[2], ic->dev->name,
		       (unsigned long long)ic->start,
		       imgrement_capture_name(READ_ONCE(ic->capture)));
		break;
#endif
	}
}

/* Whether bios may wait; off from presuspend until resume (or an undo). */
static void imgrement_set_draining(struct imgrement_dev *idev, bool draining)
{
	unsigned long flags;

	spin_lock_irqsave(&idev->defer_lock, flags);
	idev->draining = draining;
	spin_unlock_irqrestore(&idev->defer_lock, flags);
}

/*
 * A suspend must not wait for the reader: stop waiting, let every waiting
 * bio go on (recorded where its record fits, dropped and counted where it
 * does not) and return once the list is empty.  Bios mapped from now on
 * never join it (record_or_defer checks draining under the lock).
 */
static void imgrement_presuspend(struct dm_target *ti)
{
	struct imgrement_c *ic = ti->private;
	struct imgrement_dev *idev = ic->idev;

	imgrement_set_draining(idev, true);
	mod_delayed_work(imgrement_wq, &idev->defer_work, 0);
	flush_delayed_work(&idev->defer_work);
}

static void imgrement_presuspend_undo(struct dm_target *ti)
{
	struct imgrement_c *ic = ti->private;

	imgrement_set_draining(ic->idev, false);
}

static void imgrement_resume(struct dm_target *ti)
{
	struct imgrement_c *ic = ti->private;

	imgrement_set_draining(ic->idev, false);
	imgrement_dev_sync_name(ic->idev);
}

static int imgrement_iterate_devices(struct dm_target *ti,
				     iterate_devices_callout_fn fn, void *data)
{
	struct imgrement_c *ic = ti->private;

	return fn(ti, ic->dev, ic->start, ti->len, data);
}

static struct target_type imgrement_target = {
	.name = "imgrement",
	.version = {1, 4, 0},	/* 1.4: record version 2, segments as runs */
	.features = IMGREMENT_TARGET_FEATURES,
	.module = THIS_MODULE,
	.ctr = imgrement_ctr,
	.dtr = imgrement_dtr,
	.map = imgrement_map,
	.end_io = imgrement_end_io,
	.status = imgrement_status,
	.message = imgrement_message,
	.presuspend = imgrement_presuspend,
	.presuspend_undo = imgrement_presuspend_undo,
	.resume = imgrement_resume,
	.iterate_devices = imgrement_iterate_devices,
};

static int __init dm_imgrement_init(void)
{
	int ret;

	/*
	 * WQ_MEM_RECLAIM: waiting bios must move on under memory pressure too.
	 * WQ_UNBOUND: the work resubmits bios and need not run on the CPU that
	 * queued it; saying so explicitly also matters because kernels from 6.17
	 * on warn at allocation when a workqueue names neither WQ_UNBOUND nor
	 * WQ_PERCPU (and older kernels lack WQ_PERCPU).
	 */
	imgrement_wq = alloc_workqueue("imgrement", WQ_UNBOUND | WQ_MEM_RECLAIM, 0);
	if (!imgrement_wq)
		return -ENOMEM;
	imgrement_debugfs_init();
	ret = dm_register_target(&imgrement_target);
	if (ret < 0) {
		DMERR("register failed %d", ret);
		imgrement_debugfs_exit();
		destroy_workqueue(imgrement_wq);
	}
	return ret;
}

static void __exit dm_imgrement_exit(void)
{
	dm_unregister_target(&imgrement_target);
	imgrement_debugfs_exit();
	destroy_workqueue(imgrement_wq);
}

module_init(dm_imgrement_init);
module_exit(dm_imgrement_exit);

MODULE_DESCRIPTION(DM_NAME " target that records every bio reaching a device");
MODULE_AUTHOR("imgrement-dm developers");
MODULE_LICENSE("GPL");
MODULE_ALIAS("dm-imgrement");
