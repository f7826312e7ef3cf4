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

#include "ring.h"

/* What a target copies besides the metadata. */
enum imgrement_capture {
	IMGREMENT_CAPTURE_META = 0,	/* no payload */
	IMGREMENT_CAPTURE_WRITES = 1,	/* payload of writes (the default) */
	IMGREMENT_CAPTURE_ALL = 2,	/* payload of writes and reads */
};

struct imgrement_dev {
	struct list_head list;		/* on the module's device list */
	refcount_t users;		/* targets using it */
	struct kref kref;		/* memory: the targets (one), open readers */
	struct mapped_device *md;	/* identity; never dereferenced */
	struct mutex name_lock;		/* name; renames also hold the list's */
	char name[DM_NAME_LEN];		/* the dm name its directory carries */
	struct dentry *dir;		/* /sys/kernel/debug/imgrement/<name> */
	struct imgrement_ring ring;
	atomic64_t bios;		/* INFO counters, cleared by reset-stats */
	atomic64_t bytes;
	atomic64_t records;
	atomic64_t dropped;
};

/*
 * Lifetime: when the last target goes, the stream is closed and its
 * directory removed, but readers that still have the records file open keep
 * the memory (kref) until they close it, so they can drain what is left.
 */
void imgrement_dev_release(struct kref *kref);

int imgrement_debugfs_init(void);
void imgrement_debugfs_exit(void);
void imgrement_debugfs_add(struct imgrement_dev *dev);
void imgrement_debugfs_remove(struct imgrement_dev *dev);
void imgrement_debugfs_rename(struct imgrement_dev *dev, const char *name);

const char *imgrement_capture_name(enum imgrement_capture capture);

#endif /* IMGREMENT_H */
