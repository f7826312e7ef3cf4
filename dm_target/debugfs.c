// SPDX-License-Identifier: GPL-2.0
/*
 * /sys/kernel/debug/imgrement/<dm name>/: where records reach user space.
 *
 *   records  the binary record stream (imgrement_record.h).  read() returns
 *            whole records only, blocks until one is there (or returns
 *            -EAGAIN with O_NONBLOCK); poll() reports a batch (ring.h):
 *            at once for a mark or 1/16 of the buffer unread, else at most
 *            200 ms after a record, and sleepers are woken the same way.
 *            Several readers share one stream: each record goes to exactly
 *            one of them, like bytes from a pipe.  After the device is
 *            removed, readers that had the file open drain what is left and
 *            then see end of file: an open file holds the stream's memory.
 *            A reader may instead map the buffer read-only and take
 *            windows of records in place with IMGREMENT_IOC_NEXT
 *            (imgrement_record.h), which saves copying every byte out.
 *            The file's size is the buffer's, the length to map.
 *   dropped  records dropped because the buffer was full, since creation
 *   stats    counters and buffer use, one "key value" per line
 *   dev      the mapped device's major:minor.  The directory is named after
 *            the device, and follows a rename at the next resume: until
 *            then a reader finds it by this file.
 *
 * All files are mode 0400.  If debugfs is unavailable the target still
 * works; only the stream is missing.
 */

#include <linux/debugfs.h>
#include <linux/fs.h>
#include <linux/poll.h>
#include <linux/seq_file.h>
#include <linux/mm.h>
#include <linux/vmalloc.h>
#include <linux/uaccess.h>

#include "imgrement.h"
#include "compat.h"

static struct dentry *imgrement_root;

/*
 * The records file is made with debugfs_create_file_unsafe(): debugfs guards
 * only open() against removal, and from then on the file's reference keeps
 * the stream alive, so a reader can drain it after the device is gone.
 */
static int records_open(struct inode *inode, struct file *file)
{
	struct imgrement_dev *dev = inode->i_private;

	kref_get(&dev->kref);
	file->private_data = dev;
	dev->ops->readers_changed(dev, 1);
	return nonseekable_open(inode, file);
}

static int records_release(struct inode *inode, struct file *file)
{
	struct imgrement_dev *dev = file->private_data;

	imgrement_ring_forget(&dev->ring, file, NULL);
	dev->ops->readers_changed(dev, -1);
	kref_put(&dev->kref, dev->ops->release);
	return 0;
}

/*
 * close() gives the window back, as the documentation promises: release()
 * alone would wait for the last munmap(), since a mapping holds the file.
 * Only a close by the descriptor table the window was lent to counts (@id),
 * not a child's at exec.
 */
static int records_flush(struct file *file, fl_owner_t id)
{
	struct imgrement_dev *dev = file->private_data;

	imgrement_ring_forget(&dev->ring, file, id);
	return 0;
}

static ssize_t records_read(struct file *file, char __user *buf, size_t count,
			    loff_t *ppos)
{
	struct imgrement_dev *dev = file->private_data;

	return imgrement_ring_read(&dev->ring, file, buf, count,
				   file->f_flags & O_NONBLOCK);
}

/*
 * The whole buffer, read-only, from offset 0.  A mapping holds the file,
 * and the file the buffer (kref), so the memory outlives every mapping.
 */
static int records_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct imgrement_dev *dev = file->private_data;

	if (vma->vm_flags & VM_WRITE)
		return -EPERM;
	if (vma->vm_pgoff)
		return -EINVAL;
	imgrement_vm_flags_clear(vma, VM_MAYWRITE);
	/* Fails with -EINVAL when the mapping is larger than the buffer. */
	return remap_vmalloc_range(vma, dev->ring.buf, 0);
}

static long records_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct imgrement_dev *dev = file->private_data;

	if (cmd != IMGREMENT_IOC_NEXT)
		return -ENOTTY;
	return imgrement_ring_next(&dev->ring, file, current->files,
				   (struct imgrement_window __user *)arg);
}

static __poll_t records_poll(struct file *file, poll_table *wait)
{
	struct imgrement_dev *dev = file->private_data;

	poll_wait(file, &dev->ring.wait, wait);
	if (imgrement_ring_batch_ready(&dev->ring, file))
		return EPOLLIN | EPOLLRDNORM;
	if (READ_ONCE(dev->ring.closing))
		return EPOLLHUP;
	return 0;
}

static const struct file_operations records_fops = {
	.owner = THIS_MODULE,
	.open = records_open,
	.release = records_release,
	.flush = records_flush,
	.read = records_read,
	.poll = records_poll,
	.mmap = records_mmap,
	.unlocked_ioctl = records_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static int dropped_show(struct seq_file *m, void *v)
{
	struct imgrement_dev *dev = m->private;

	seq_printf(m, "%lld\n", (long long)atomic64_read(&dev->ring.dropped));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(dropped);

static int stats_show(struct seq_file *m, void *v)
{
	struct imgrement_dev *dev = m->private;
	struct imgrement_ring *ring = &dev->ring;

	seq_printf(m, "bios %lld\n", (long long)atomic64_read(&dev->bios));
	seq_printf(m, "bytes %lld\n", (long long)atomic64_read(&dev->bytes));
	seq_printf(m, "records %lld\n", (long long)atomic64_read(&dev->records));
	seq_printf(m, "dropped %lld\n", (long long)atomic64_read(&dev->dropped));
	seq_printf(m, "dropped_total %lld\n", (long long)atomic64_read(&ring->dropped));
	seq_printf(m, "committed_total %lld\n", (long long)atomic64_read(&ring->committed));
	seq_printf(m, "buffer_size %u\n", ring->size);
	seq_printf(m, "buffer_used %llu\n", imgrement_ring_used(ring));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(stats);

static int dev_show(struct seq_file *m, void *v)
{
	struct imgrement_dev *dev = m->private;

	seq_printf(m, "%u:%u\n", MAJOR(dev->devt), MINOR(dev->devt));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(dev);

int imgrement_debugfs_init(void)
{
	imgrement_root = debugfs_create_dir("imgrement", NULL);
	if (IS_ERR_OR_NULL(imgrement_root)) {
		pr_warn("imgrement: debugfs unavailable; record streams disabled\n");
		imgrement_root = NULL;
	}
	return 0;
}

void imgrement_debugfs_exit(void)
{
	debugfs_remove_recursive(imgrement_root);
	imgrement_root = NULL;
}

void imgrement_debugfs_add(struct imgrement_dev *dev)
{
	struct dentry *dir, *records;

	if (!imgrement_root)
		return;
	dir = debugfs_create_dir(dev->name, imgrement_root);
	if (IS_ERR_OR_NULL(dir)) {
		/* The name is taken (a rename we have not seen yet): use dm-N. */
		strscpy(dev->name, dm_disk(dev->md)->disk_name, sizeof(dev->name));
		dir = debugfs_create_dir(dev->name, imgrement_root);
	}
	if (IS_ERR_OR_NULL(dir)) {
		pr_warn("imgrement: no debugfs directory for %s\n", dev->name);
		dev->dir = NULL;
		return;
	}
	dev->dir = dir;
	records = debugfs_create_file_unsafe("records", 0400, dir, dev, &records_fops);
	/* Its size is the buffer's: what a reader maps (and tools check). */
	if (!IS_ERR_OR_NULL(records))
		d_inode(records)->i_size = dev->ring.size;
	debugfs_create_file("dropped", 0400, dir, dev, &dropped_fops);
	debugfs_create_file("stats", 0400, dir, dev, &stats_fops);
	debugfs_create_file("dev", 0400, dir, dev, &dev_fops);
}

void imgrement_debugfs_remove(struct imgrement_dev *dev)
{
	/* Waits for opens and for stats/dropped reads in progress. */
	debugfs_remove_recursive(dev->dir);
	dev->dir = NULL;
}

void imgrement_debugfs_rename(struct imgrement_dev *dev, const char *name)
{
	if (!dev->dir || !strcmp(dev->name, name))
		return;
	if (imgrement_debugfs_change_name(imgrement_root, dev->dir, name) == 0)
		strscpy(dev->name, name, sizeof(dev->name));
}
