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
 * .prepare_ioctl grew the ioctl command, its argument and a "forward" out
 * parameter in 6.15; only the block device matters to us.
 */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 15, 0)
#define IMGREMENT_PREPARE_IOCTL_ARGS					\
	struct dm_target *ti, struct block_device **bdev,		\
	unsigned int cmd, unsigned long arg, bool *forward
#else
#define IMGREMENT_PREPARE_IOCTL_ARGS					\
	struct dm_target *ti, struct block_device **bdev
#endif

#endif /* IMGREMENT_COMPAT_H */
