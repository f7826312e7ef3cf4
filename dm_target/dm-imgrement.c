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
 * completes, so records appear in submission order.  When the buffer is
 * full a record is dropped and counted, and its sequence number is skipped.
 * The format is in imgrement_record.h and docs/record-format.md.
 *
 * Ioctls.  The target has no .prepare_ioctl, so device-mapper refuses
 * (ENOTTY) every ioctl that it would otherwise hand to the device below:
 * SG_IO and the other SCSI and NVMe passthrough commands, and persistent
 * reservations.  A passthrough WRITE would change the disk with no bio and
 * so no record; a tracer must not let a write past unseen.  The block
 * layer's own ioctls (BLKDISCARD, BLKZEROOUT, BLKFLSBUF, sizes) become bios
 * and are recorded like any other.  Send passthrough commands (smartctl,
 * sg_*) to the disk itself.
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
 *          used=BYTES log=on|off
 *   TABLE: the table arguments, as given (with the current capture mode
 *          and log setting, if they were given or changed by message)
 *
 * Messages:
 *   mark <label>                  put a mark record in the stream; replies
 *                                 with the mark's sequence number
 *   capture meta|writes|all       change what is copied, at once
 *   log on|off                    also print each bio to the kernel log,
 *                                 rate-limited
 *   reset-stats                   zero the INFO counters
 */

#include <linux/module.h>
#include <linux/init.h>
#include <linux/kstrtox.h>
#include <linux/bio.h>
#include <linux/slab.h>
#include <linux/sched.h>
#include <linux/ratelimit.h>
#include <linux/device-mapper.h>

#include "compat.h"
#include "imgrement.h"

#define DM_MSG_PREFIX "imgrement"

#define IMGREMENT_DEFAULT_BUFFER_KB	(16 * 1024)
#define IMGREMENT_MIN_BUFFER_KB		64
#define IMGREMENT_MAX_BUFFER_KB		(1024 * 1024)

/* Which optional arguments were given, so TABLE status gives them back. */
enum {
	OPT_CAPTURE,
	OPT_BUFFER,
	OPT_LOG,
};

/* One target (one table line). */
struct imgrement_c {
	struct dm_dev *dev;
	sector_t start;			/* offset into dev, in sectors */
	struct imgrement_dev *idev;	/* the stream, shared across reloads */
	u32 buffer_kb;
	unsigned long opts;		/* OPT_* bits given in the table or by
					 * message: atomic bitops */
	int capture;			/* enum imgrement_capture; READ_ONCE */
	bool log;			/* READ_ONCE */
	struct ratelimit_state log_rs;
};

/* Per-bio state, from .map to .end_io. */
struct imgrement_io {
	struct imgrement_bio_record *rec;	/* NULL: dropped */
	struct bvec_iter iter;			/* the bio's data, for reads */
	bool copy_at_end;			/* copy the payload in end_io */
};

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
	dev->md = md;
	if (dm_copy_name_and_uuid(md, dev->name, NULL))
		strscpy(dev->name, dm_disk(md)->disk_name, sizeof(dev->name));
	imgrement_debugfs_add(dev);
	list_add(&dev->list, &imgrement_devs);
out:
	mutex_unlock(&imgrement_devs_lock);
	return dev;
}

void imgrement_dev_release(struct kref *kref)
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

	/* Readers drain what is left, then see end of file. */
	imgrement_ring_close(&dev->ring);
	imgrement_debugfs_remove(dev);
	kref_put(&dev->kref, imgrement_dev_release);
}

/*
 * Keep the debugfs directory named after the device across renames.  A
 * rename reaches no target hook, so this runs at resume and at every status
 * query; the usual case, a name unchanged, takes only the device's own lock.
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
 */
static int imgrement_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	struct imgrement_c *ic;
	unsigned long long start = 0;
	unsigned int nr_opts = 0, i;
	u32 buffer_kb = IMGREMENT_DEFAULT_BUFFER_KB;
	int ret;

	if (argc < 1) {
		ti->error = "Invalid argument count: expected <device> [<offset> [<#opts> <opts>...]]";
		return -EINVAL;
	}
	/* kstrto*() refuse overflow, which sscanf() would silently wrap. */
	if (argc >= 2 && kstrtoull(argv[1], 10, &start)) {
		ti->error = "Invalid offset: expected a sector number";
		return -EINVAL;
	}
	if (start != (sector_t)start) {
		ti->error = "Offset too large";
		return -EINVAL;
	}
	if (argc >= 3 && (kstrtouint(argv[2], 10, &nr_opts) || nr_opts != argc - 3)) {
		ti->error = "Invalid optional argument count: it must equal the arguments that follow";
		return -EINVAL;
	}

	ic = kzalloc(sizeof(*ic), GFP_KERNEL);
	if (!ic) {
		ti->error = "Cannot allocate context";
		return -ENOMEM;
	}
	ic->start = start;
	ic->capture = IMGREMENT_CAPTURE_WRITES;
	/* At most 20 bios in any 5 seconds reach the kernel log. */
	ratelimit_state_init(&ic->log_rs, 5 * HZ, 20);
	ratelimit_set_flags(&ic->log_rs, RATELIMIT_MSG_ON_RELEASE);

	for (i = 3; i < argc; i++) {
		const char *arg = argv[i];
		int v;

		if (!strncmp(arg, "capture:", 8) && !test_bit(OPT_CAPTURE, &ic->opts)) {
			v = parse_capture(arg + 8);
			if (v < 0) {
				ti->error = "Invalid capture mode: expected capture:meta, capture:writes or capture:all";
				ret = -EINVAL;
				goto bad;
			}
			ic->capture = v;
			__set_bit(OPT_CAPTURE, &ic->opts);
		} else if (!strncmp(arg, "buffer_kb:", 10) && !test_bit(OPT_BUFFER, &ic->opts)) {
			if (kstrtou32(arg + 10, 10, &buffer_kb) ||
			    buffer_kb < IMGREMENT_MIN_BUFFER_KB ||
			    buffer_kb > IMGREMENT_MAX_BUFFER_KB) {
				ti->error = "Invalid buffer_kb: expected 64 to 1048576";
				ret = -EINVAL;
				goto bad;
			}
			__set_bit(OPT_BUFFER, &ic->opts);
		} else if (!strncmp(arg, "log:", 4) && !test_bit(OPT_LOG, &ic->opts)) {
			v = parse_on_off(arg + 4);
			if (v < 0) {
				ti->error = "Invalid log setting: expected log:on or log:off";
				ret = -EINVAL;
				goto bad;
			}
			ic->log = v;
			__set_bit(OPT_LOG, &ic->opts);
		} else {
			ti->error = "Unknown or repeated optional argument";
			ret = -EINVAL;
			goto bad;
		}
	}
	ic->buffer_kb = buffer_kb;

	ret = dm_get_device(ti, argv[0], dm_table_get_mode(ti->table), &ic->dev);
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
	ti->num_discard_bios = 1;
	ti->num_secure_erase_bios = 1;
	ti->num_write_zeroes_bios = 1;
	ti->per_io_data_size = sizeof(struct imgrement_io);
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

static u32 record_flags(struct bio *bio)
{
	imgrement_opf_t opf = bio->bi_opf;
	u32 f = 0;

	if (opf & REQ_FUA)
		f |= IMGREMENT_F_FUA;
	if (opf & REQ_PREFLUSH)
		f |= IMGREMENT_F_PREFLUSH;
	if (opf & REQ_SYNC)
		f |= IMGREMENT_F_SYNC;
	if (opf & REQ_META)
		f |= IMGREMENT_F_META;
	if (opf & REQ_PRIO)
		f |= IMGREMENT_F_PRIO;
	if (opf & REQ_RAHEAD)
		f |= IMGREMENT_F_RAHEAD;
	if (opf & REQ_BACKGROUND)
		f |= IMGREMENT_F_BACKGROUND;
	if (opf & REQ_NOWAIT)
		f |= IMGREMENT_F_NOWAIT;
	if (opf & REQ_NOUNMAP)
		f |= IMGREMENT_F_NOUNMAP;
	if (opf & REQ_IDLE)
		f |= IMGREMENT_F_IDLE;
	if (opf & REQ_NOMERGE)
		f |= IMGREMENT_F_NOMERGE;
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

	if (!__ratelimit(&ic->log_rs))
		return;
	pr_info("imgrement: %c, bytes to transfer: %u, delta count: %u\n",
		op_letter(op), bio->bi_iter.bi_size,
		bio_has_data(bio) ? bio_segments(bio) : 0);
	if (!bio_has_data(bio))
		return;
	bio_for_each_segment(bv, bio, iter) {
		unsigned int n = bv.bv_len >> SECTOR_SHIFT;

		if (i == 8) {
			pr_info("imgrement: (%u more segments not shown)\n",
				bio_segments(bio) - i);
			break;
		}
		pr_info("imgrement: bv #%u: len %u, offset %u, %u sectors (%llu..%llu)\n",
			i, bv.bv_len, bv.bv_offset, n, (unsigned long long)sector,
			(unsigned long long)(sector + (n ? n - 1 : 0)));
		sector += n;
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

static void fill_segments(struct imgrement_bio_record *rec, struct bio *bio,
			  sector_t sector, unsigned int nr_segs)
{
	struct imgrement_segment *seg = (struct imgrement_segment *)(rec + 1);
	struct bvec_iter iter;
	struct bio_vec bv;

	bio_for_each_segment(bv, bio, iter) {
		if (!nr_segs--)
			break;
		seg->len = cpu_to_le32(bv.bv_len);
		seg->offset = cpu_to_le32(bv.bv_offset);
		seg->sector = cpu_to_le64(sector);
		sector += bv.bv_len >> SECTOR_SHIFT;
		seg++;
	}
}

static void record_bio(struct imgrement_c *ic, struct bio *bio, sector_t sector)
{
	struct imgrement_io *io = dm_per_bio_data(bio, sizeof(struct imgrement_io));
	int capture = READ_ONCE(ic->capture);
	u8 op = record_op(bio);
	unsigned int nr_segs = bio_has_data(bio) ? bio_segments(bio) : 0;
	u32 payload = 0, bytes;
	struct imgrement_bio_record *rec;

	io->rec = NULL;
	io->copy_at_end = false;
	if (op == IMGREMENT_OP_WRITE && capture != IMGREMENT_CAPTURE_META)
		payload = bio->bi_iter.bi_size;
	else if (op == IMGREMENT_OP_READ && capture == IMGREMENT_CAPTURE_ALL)
		payload = bio->bi_iter.bi_size;
	if (nr_segs > U16_MAX)
		nr_segs = U16_MAX;	/* a 256 MiB bio: keep the first ones */

	bytes = sizeof(*rec) + nr_segs * sizeof(struct imgrement_segment) + payload;
	rec = (struct imgrement_bio_record *)imgrement_ring_reserve(&ic->idev->ring, bytes);
	if (!rec) {
		atomic64_inc(&ic->idev->dropped);
		return;
	}
	rec->sector = cpu_to_le64(sector);
	rec->bytes = cpu_to_le32(bio->bi_iter.bi_size);
	rec->op = op;
	rec->raw_op = (__force u8)bio_op(bio);
	rec->nr_segments = cpu_to_le16(nr_segs);
	rec->flags = cpu_to_le32(record_flags(bio));
	rec->rflags = cpu_to_le32(payload ? IMGREMENT_R_PAYLOAD : 0);
	rec->submit_ns = cpu_to_le64(ktime_get_ns());
	rec->complete_ns = 0;
	rec->status = 0;
	rec->pid = cpu_to_le32(task_tgid_nr(current));
	rec->tid = cpu_to_le32(task_pid_nr(current));
	rec->payload_len = cpu_to_le32(payload);
	memset(rec->comm, 0, sizeof(rec->comm));
	get_task_comm(rec->comm, current);
	if (nr_segs)
		fill_segments(rec, bio, sector, nr_segs);
	/* Zero the padding after the payload: no stale bytes reach readers. */
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
}

static int imgrement_map(struct dm_target *ti, struct bio *bio)
{
	struct imgrement_c *ic = ti->private;
	struct imgrement_dev *idev = ic->idev;
	sector_t sector = bio->bi_iter.bi_sector;	/* on the traced device */

	atomic64_inc(&idev->bios);
	atomic64_add(bio->bi_iter.bi_size, &idev->bytes);
	record_bio(ic, bio, sector);
	if (unlikely(READ_ONCE(ic->log)))
		log_bio(ic, bio, record_op(bio), sector);

	bio_set_dev(bio, ic->dev->bdev);
	if (bio_sectors(bio) || op_is_zone_mgmt(bio_op(bio)))
		bio->bi_iter.bi_sector = ic->start +
			dm_target_offset(ti, bio->bi_iter.bi_sector);
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
	rec->status = cpu_to_le32((u32)blk_status_to_errno(*error));
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
	char *label;
	u64 seq;

	for (i = 1; i < argc; i++)
		len += strlen(argv[i]) + (i > 1);
	if (!len || len > IMGREMENT_MARK_MAX) {
		DMWARN("mark needs a label of 1 to %d bytes", IMGREMENT_MARK_MAX);
		return -EINVAL;
	}
	rec = (struct imgrement_mark_record *)imgrement_ring_reserve(&ic->idev->ring,
								     sizeof(*rec) + len);
	if (!rec) {
		atomic64_inc(&ic->idev->dropped);
		scnprintf(result, maxlen, "dropped");
		return 1;
	}
	seq = le64_to_cpu(rec->hdr.seq);
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
	if (argc == 1 && !strcasecmp(argv[0], "reset-stats")) {
		atomic64_set(&ic->idev->bios, 0);
		atomic64_set(&ic->idev->bytes, 0);
		atomic64_set(&ic->idev->records, 0);
		atomic64_set(&ic->idev->dropped, 0);
		return 0;
	}
	DMWARN("unrecognised message: expected mark, capture, log or reset-stats");
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

	switch (type) {
	case STATUSTYPE_INFO:
		imgrement_dev_sync_name(idev);
		DMEMIT("bios=%lld bytes=%lld records=%lld dropped=%lld capture=%s buffer=%u used=%llu log=%s",
		       (long long)atomic64_read(&idev->bios),
		       (long long)atomic64_read(&idev->bytes),
		       (long long)atomic64_read(&idev->records),
		       (long long)atomic64_read(&idev->dropped),
		       imgrement_capture_name(READ_ONCE(ic->capture)),
		       idev->ring.size, imgrement_ring_used(&idev->ring),
		       READ_ONCE(ic->log) ? "on" : "off");
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

static void imgrement_resume(struct dm_target *ti)
{
	struct imgrement_c *ic = ti->private;

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
	.version = {1, 1, 0},
	.features = IMGREMENT_TARGET_FEATURES,
	.module = THIS_MODULE,
	.ctr = imgrement_ctr,
	.dtr = imgrement_dtr,
	.map = imgrement_map,
	.end_io = imgrement_end_io,
	.status = imgrement_status,
	.message = imgrement_message,
	.resume = imgrement_resume,
	.iterate_devices = imgrement_iterate_devices,
};

static int __init dm_imgrement_init(void)
{
	int ret;

	imgrement_debugfs_init();
	ret = dm_register_target(&imgrement_target);
	if (ret < 0) {
		DMERR("register failed %d", ret);
		imgrement_debugfs_exit();
	}
	return ret;
}

static void __exit dm_imgrement_exit(void)
{
	dm_unregister_target(&imgrement_target);
	imgrement_debugfs_exit();
}

module_init(dm_imgrement_init);
module_exit(dm_imgrement_exit);

MODULE_DESCRIPTION(DM_NAME " target that records every bio reaching a device");
MODULE_AUTHOR("imgrement-dm developers");
MODULE_LICENSE("GPL");
MODULE_ALIAS("dm-imgrement");
