// SPDX-License-Identifier: GPL-2.0
/*
 * dm-imgrement: a pass-through device-mapper target that watches every bio
 * reaching the device below it.
 *
 * Semantics: the target maps its whole length linearly onto a range of one
 * underlying block device, exactly as dm-linear does.  Nothing about the I/O
 * changes: bios are remapped in .map and completed by the device below.  What
 * the target adds is observation; this version keeps a count of the bios it
 * mapped, reported by the INFO status line.
 *
 * Status:
 *   INFO:  bios=<number of bios mapped since the table was loaded>
 *   TABLE: <device> <offset>   (the table arguments, as given back by dmsetup)
 */

#include <linux/module.h>
#include <linux/init.h>
#include <linux/bio.h>
#include <linux/slab.h>
#include <linux/device-mapper.h>

#include "compat.h"

#define DM_MSG_PREFIX "imgrement"

struct imgrement_c {
	struct dm_dev *dev;
	sector_t start;		/* offset into dev, in 512-byte sectors */
	atomic64_t bios;	/* bios mapped since the table was loaded */
};

/*
 * Construct a mapping:
 *   <device> [<offset>]
 *
 * <device>  the block device to watch: a path or major:minor
 * <offset>  first sector of the device to map, default 0; the mapped range
 *           must lie inside the device
 */
static int imgrement_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	struct imgrement_c *ic;
	unsigned long long start = 0;
	char dummy;
	int ret;

	if (argc < 1 || argc > 2) {
		ti->error = "Invalid argument count: expected <device> [<offset>]";
		return -EINVAL;
	}

	if (argc == 2 && sscanf(argv[1], "%llu%c", &start, &dummy) != 1) {
		ti->error = "Invalid offset: expected a sector number";
		return -EINVAL;
	}
	if (start != (sector_t)start) {
		ti->error = "Offset too large";
		return -EINVAL;
	}

	ic = kzalloc(sizeof(*ic), GFP_KERNEL);
	if (!ic) {
		ti->error = "Cannot allocate context";
		return -ENOMEM;
	}
	ic->start = start;
	atomic64_set(&ic->bios, 0);

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

	ti->num_flush_bios = 1;
	ti->num_discard_bios = 1;
	ti->num_write_zeroes_bios = 1;
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

	dm_put_device(ti, ic->dev);
	kfree(ic);
}

static int imgrement_map(struct dm_target *ti, struct bio *bio)
{
	struct imgrement_c *ic = ti->private;

	bio_set_dev(bio, ic->dev->bdev);
	if (bio_sectors(bio) || op_is_zone_mgmt(bio_op(bio)))
		bio->bi_iter.bi_sector = ic->start +
			dm_target_offset(ti, bio->bi_iter.bi_sector);
	atomic64_inc(&ic->bios);
	return DM_MAPIO_REMAPPED;
}

static void imgrement_status(struct dm_target *ti, status_type_t type,
			     unsigned int status_flags, char *result,
			     unsigned int maxlen)
{
	struct imgrement_c *ic = ti->private;
	unsigned int sz = 0;

	switch (type) {
	case STATUSTYPE_INFO:
		DMEMIT("bios=%lld", (long long)atomic64_read(&ic->bios));
		break;
	case STATUSTYPE_TABLE:
		DMEMIT("%s %llu", ic->dev->name, (unsigned long long)ic->start);
		break;
#ifdef IMGREMENT_HAVE_STATUSTYPE_IMA
	case STATUSTYPE_IMA:
		DMEMIT("target_name=%s,target_version=%u.%u.%u,device_name=%s,start=%llu;",
		       ti->type->name, ti->type->version[0], ti->type->version[1],
		       ti->type->version[2], ic->dev->name,
		       (unsigned long long)ic->start);
		break;
#endif
	}
}

static int imgrement_prepare_ioctl(IMGREMENT_PREPARE_IOCTL_ARGS)
{
	struct imgrement_c *ic = ti->private;

	*bdev = ic->dev->bdev;
	/* Only pass ioctls through when the whole device is mapped. */
	if (ic->start ||
	    ti->len != imgrement_bdev_nr_sectors(ic->dev->bdev))
		return 1;
	return 0;
}

static int imgrement_iterate_devices(struct dm_target *ti,
				     iterate_devices_callout_fn fn, void *data)
{
	struct imgrement_c *ic = ti->private;

	return fn(ti, ic->dev, ic->start, ti->len, data);
}

static struct target_type imgrement_target = {
	.name = "imgrement",
	.version = {0, 1, 0},
	.module = THIS_MODULE,
	.ctr = imgrement_ctr,
	.dtr = imgrement_dtr,
	.map = imgrement_map,
	.status = imgrement_status,
	.prepare_ioctl = imgrement_prepare_ioctl,
	.iterate_devices = imgrement_iterate_devices,
};

static int __init dm_imgrement_init(void)
{
	int ret = dm_register_target(&imgrement_target);

	if (ret < 0)
		DMERR("register failed %d", ret);
	return ret;
}

static void __exit dm_imgrement_exit(void)
{
	dm_unregister_target(&imgrement_target);
}

module_init(dm_imgrement_init);
module_exit(dm_imgrement_exit);

MODULE_DESCRIPTION(DM_NAME " target that records every bio reaching a device");
MODULE_AUTHOR("imgrement-dm developers");
MODULE_LICENSE("GPL");
MODULE_ALIAS("dm-imgrement");
