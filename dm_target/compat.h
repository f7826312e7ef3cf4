/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Every difference between the kernels imgrement builds on (Debian's 5.10,
 * 6.1, 6.12 and 7.2) lives in this file, so the target itself reads as
 * plain current-kernel code.
 */
#ifndef IMGREMENT_COMPAT_H
#define IMGREMENT_COMPAT_H

#include <linux/version.h>
#include <linux/blkdev.h>
#include <linux/device-mapper.h>

/*
 * kstrto*(): <linux/kstrtox.h> since 5.14 (and 5.10.185 on); before it,
 * <linux/kernel.h> declared them.
 */
#if __has_include(<linux/kstrtox.h>)
#include <linux/kstrtox.h>
#else
#include <linux/kernel.h>
#endif

/* STATUSTYPE_IMA was added in 5.15. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 15, 0)
#define IMGREMENT_HAVE_STATUSTYPE_IMA 1
#endif

/* bdev_nr_sectors() arrived in 5.15; before that, read the inode size. */
#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 15, 0)
static inline sector_t imgrement_bdev_nr_sectors(struct block_device *bdev)
{
	return i_size_read(bdev->bd_inode) >> SECTOR_SHIFT;
}
#else
#define imgrement_bdev_nr_sectors(bdev) bdev_nr_sectors(bdev)
#endif

/*
 * Target features.  DM_TARGET_NOWAIT (in all four Debian kernels, 5.10
 * included; a macro, so test for it): .map never sleeps, so REQ_NOWAIT
 * bios (RWF_NOWAIT, io_uring's inline issue) may come through; without it
 * the mapped device refuses them.
 */
#ifdef DM_TARGET_NOWAIT
#define IMGREMENT_TARGET_FEATURES DM_TARGET_NOWAIT
#else
#define IMGREMENT_TARGET_FEATURES 0
#endif

/* memcpy_from_bvec() arrived in 5.15; before that, map the page ourselves. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 15, 0)
#define imgrement_memcpy_from_bvec(to, bv) memcpy_from_bvec(to, bv)
#else
#include <linux/highmem.h>
static inline void imgrement_memcpy_from_bvec(char *to, struct bio_vec *bv)
{
	void *from = kmap_atomic(bv->bv_page);

	memcpy(to, from + bv->bv_offset, bv->bv_len);
	kunmap_atomic(from);
}
#endif

/*
 * Renaming a debugfs entry: debugfs_rename() until 6.13, then
 * debugfs_change_name().  Returns 0 or a negative errno.
 */
#include <linux/debugfs.h>
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 13, 0)
static inline int imgrement_debugfs_change_name(struct dentry *parent,
						struct dentry *dentry,
						const char *name)
{
	return debugfs_change_name(dentry, "%s", name);
}
#else
static inline int imgrement_debugfs_change_name(struct dentry *parent,
						struct dentry *dentry,
						const char *name)
{
	struct dentry *d = debugfs_rename(parent, dentry, parent, name);

	return IS_ERR_OR_NULL(d) ? -EEXIST : 0;
}
#endif

/*
 * Timers: from_timer() became timer_container_of() in 6.16 (both are
 * macros, so test for the new one); timer_shutdown_sync(), which also keeps
 * the timer from being armed again, arrived in 6.2.
 */
#include <linux/timer.h>
#ifdef timer_container_of
#define imgrement_timer_container_of(var, t, field) timer_container_of(var, t, field)
#else
#define imgrement_timer_container_of(var, t, field) from_timer(var, t, field)
#endif
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0)
#define imgrement_timer_shutdown_sync(t) timer_shutdown_sync(t)
#else
#define imgrement_timer_shutdown_sync(t) del_timer_sync(t)
#endif

/* vma->vm_flags became read-only behind vm_flags_clear() and friends in 6.3. */
#include <linux/mm.h>
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
#define imgrement_vm_flags_clear(vma, flags) vm_flags_clear(vma, flags)
#else
static inline void imgrement_vm_flags_clear(struct vm_area_struct *vma,
					    unsigned long flags)
{
	vma->vm_flags &= ~flags;
}
#endif

/*
 * Submitting a bio the target took over (DM_MAPIO_SUBMITTED) after remapping
 * it: dm_submit_bio_remap() (5.18) also does dm's accounting and the remap
 * trace event; before it, submit it as dm-thin did.
 */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 18, 0)
#define imgrement_submit_remapped(bio) dm_submit_bio_remap(bio, NULL)
#else
#define imgrement_submit_remapped(bio) submit_bio_noacct(bio)
#endif

/*
 * A target that submits bios it took over (DM_MAPIO_SUBMITTED) with
 * dm_submit_bio_remap() says so (5.18 on): dm then starts the I/O
 * accounting there, once, not also when .map returns, where it raced with
 * the work item's own start and could count a bio twice.
 */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 18, 0)
#define imgrement_accounts_remapped_io(ti) ((ti)->accounts_remapped_io = true)
#else
#define imgrement_accounts_remapped_io(ti) do { } while (0)
#endif

/* dm limits swap bios in flight for targets that may hold them (5.12 on). */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 12, 0)
#define imgrement_limit_swap_bios(ti) ((ti)->limit_swap_bios = true)
#else
#define imgrement_limit_swap_bios(ti) do { } while (0)
#endif

/*
 * Before 5.19 "supports discard" was a queue flag, separate from the
 * limits, and a device could set the flag with a discard granularity of 0:
 * 5.10's loop driver does so for a file on overlayfs (whose superblock has
 * no block size).  Stacked on it, device-mapper sets the flag on the mapped
 * device too, and the first BLKDISCARD there hits the WARN_ON_ONCE in
 * __blkdev_issue_discard ("discard_granularity is 0").  Such a device
 * cannot be discarded through correctly, so the target takes no discards
 * over it (they fail with EOPNOTSUPP, as on the device alone after the
 * warning).  From 5.19 on, discard support is the limit itself.
 */
#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 19, 0)
static inline bool imgrement_discard_broken(struct block_device *bdev)
{
	struct request_queue *q = bdev_get_queue(bdev);

	return blk_queue_discard(q) && !q->limits.discard_granularity;
}
#else
static inline bool imgrement_discard_broken(struct block_device *bdev)
{
	return false;
}
#endif

#endif /* IMGREMENT_COMPAT_H */
