/* SPDX-License-Identifier: GPL-2.0 */
/*
 * State shared by the parts of the imgrement target.
 *
 * A struct imgrement_dev exists once per mapped device, not per table: a
 * reload creates a new table (and new targets) while the old one still
 * serves I/O, and both must write into the same record stream, so the
 * stream, its counters and its debugfs directory live here, reference
 * counted by the targets that use them.
 */
#ifndef IMGREMENT_H
#define IMGREMENT_H

#include <linux/types.h>
#include <linux/list.h>
#include <linux/refcount.h>
#include <linux/kref.h>
#include <linux/mutex.h>
#include <linux/dcache.h>
#include <linux/device-mapper.h>
#include <linux/bio.h>
#include <linux/workqueue.h>
#include <linux/ratelimit.h>

#include "ring.h"

/* What a target copies besides the metadata. */
enum imgrement_capture {
	IMGREMENT_CAPTURE_META = 0,	/* no payload */
	IMGREMENT_CAPTURE_WRITES = 1,	/* payload of writes (the default) */
	IMGREMENT_CAPTURE_ALL = 2,	/* payload of writes and reads */
};

/* What a bio whose record does not fit does (dm-imgrement.c, "Overflow"). */
enum imgrement_overflow {
	IMGREMENT_OVERFLOW_DROP = 0,	/* the record is dropped (the default) */
	IMGREMENT_OVERFLOW_WAIT = 1,	/* the bio waits for space: lossless */
};

/* imgrement_dev.state bits */
enum {
	IMGREMENT_FALLBACK,		/* dropping after a stall, until drained */
};

struct imgrement_dev;

/*
 * What the records file needs from the device that owns the stream: the
 * device hands these to debugfs.c, which calls nothing in dm-imgrement.c.
 */
struct imgrement_stream_ops {
	/* A reader came or went: bios waiting for space may have to move on. */
	void (*readers_changed)(struct imgrement_dev *dev, int delta);
	/* The last reference (kref) went: free the stream. */
	void (*release)(struct kref *kref);
};

struct imgrement_dev {
	struct list_head list;		/* on the module's device list */
	refcount_t users;		/* targets using it */
	struct kref kref;		/* memory: the targets (one), open readers */
	struct mapped_device *md;	/* identity; never dereferenced */
	dev_t devt;			/* the mapped device's, for readers */
	struct mutex name_lock;		/* name; renames also hold the list's */
	char name[DM_NAME_LEN];		/* the dm name its directory carries */
	struct dentry *dir;		/* /sys/kernel/debug/imgrement/<name> */
	struct imgrement_ring ring;
	atomic64_t bios;		/* INFO counters, cleared by reset-stats */
	atomic64_t bytes;
	atomic64_t records;
	atomic64_t dropped;

	/* The lossless mode: bios whose record did not fit wait here, in order. */
	spinlock_t defer_lock;		/* deferred, nr_deferred, draining */
	struct bio_list deferred;
	unsigned int nr_deferred;	/* READ_ONCE outside the lock */
	bool draining;			/* suspending: nothing may wait */
	struct delayed_work defer_work;	/* records and submits them */
	unsigned long state;		/* IMGREMENT_FALLBACK: atomic bitops */
	atomic_t readers;		/* open records files */
	const struct imgrement_stream_ops *ops;
	atomic64_t waited;		/* bios that ever waited (INFO) */
	atomic64_t fallbacks;		/* stalls that fell back to dropping */
	struct ratelimit_state stall_rs;	/* their kernel log lines */
	atomic64_t lost_from;		/* first record lost in wait mode, or -1 */
};

/*
 * Lifetime: when the last target goes, the stream is closed and its
 * directory removed, but readers that still have the records file open keep
 * the memory (kref, released through ops->release) until they close it, so
 * they can drain what is left.
 */

int imgrement_debugfs_init(void);
void imgrement_debugfs_exit(void);
void imgrement_debugfs_add(struct imgrement_dev *dev);
void imgrement_debugfs_remove(struct imgrement_dev *dev);
void imgrement_debugfs_rename(struct imgrement_dev *dev, const char *name);

const char *imgrement_capture_name(enum imgrement_capture capture);
const char *imgrement_overflow_name(enum imgrement_overflow overflow);

#endif /* IMGREMENT_H */
