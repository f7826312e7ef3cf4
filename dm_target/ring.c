// SPDX-License-Identifier: GPL-2.0
/*
 * The bounded record buffer; see ring.h for the contract.
 *
 * Positions (head, tail) count bytes since creation and never wrap; the
 * offset in the buffer is the position modulo the size.  head and tail are
 * changed only under ring->lock.  A record's type is written last, with
 * release semantics, and read first, with acquire semantics: a reader never
 * looks at a record body before its type says it is complete.
 *
 * rpos is where the next delivery starts.  It equals tail except while a
 * window is lent to a mapping reader: then [tail, rpos) is that window, its
 * space still counted as used, and readiness (poll) looks past it.
 */

#include <linux/vmalloc.h>
#include <linux/uaccess.h>
#include <linux/math64.h>
#include <linux/sched/signal.h>

#include "ring.h"
#include "compat.h"

static inline u32 ring_off(const struct imgrement_ring *ring, u64 pos)
{
	u32 rem;

	div_u64_rem(pos, ring->size, &rem);
	return rem;
}

static inline struct imgrement_record_header *ring_at(const struct imgrement_ring *ring,
						       u64 pos)
{
	return ring->buf + ring_off(ring, pos);
}

static void ring_wake_timer(struct timer_list *t)
{
	struct imgrement_ring *ring = imgrement_timer_container_of(ring, t, wake_timer);

	WRITE_ONCE(ring->batch_ready, true);
	wake_up_interruptible(&ring->wait);
}

int imgrement_ring_init(struct imgrement_ring *ring, u32 size)
{
	if (!size || size % 8)
		return -EINVAL;
	/*
	 * Zeroed: record padding never exposes old kernel memory.  _user:
	 * readers may map it (remap_vmalloc_range).
	 */
	ring->buf = vmalloc_user(size);
	if (!ring->buf)
		return -ENOMEM;
	ring->size = size;
	spin_lock_init(&ring->lock);
	ring->head = 0;
	ring->tail = 0;
	ring->rpos = 0;
	ring->win_owner = NULL;
	ring->win_closer = NULL;
	ring->next_seq = 0;
	atomic64_set(&ring->dropped, 0);
	atomic64_set(&ring->committed, 0);
	init_waitqueue_head(&ring->wait);
	timer_setup(&ring->wake_timer, ring_wake_timer, 0);
	ring->wake_bytes = max_t(u32, size / 16, 8);
	mutex_init(&ring->read_lock);
	ring->closing = false;
	ring->batch_ready = false;
	ring->on_space = NULL;
	return 0;
}

void imgrement_ring_exit(struct imgrement_ring *ring)
{
	imgrement_timer_shutdown_sync(&ring->wake_timer);
	mutex_destroy(&ring->read_lock);
	vfree(ring->buf);
	ring->buf = NULL;
}

struct imgrement_record_header *imgrement_ring_reserve(struct imgrement_ring *ring,
						       u32 bytes, bool may_drop,
						       u64 *seq_out)
{
	struct imgrement_record_header *hdr = NULL;
	unsigned long flags;
	u32 off, to_end;
	u64 need, seq;

	bytes = ALIGN(bytes, 8);
	spin_lock_irqsave(&ring->lock, flags);
	off = ring_off(ring, ring->head);
	to_end = ring->size - off;
	need = bytes;
	if (bytes > to_end)
		need += to_end;	/* the record starts again at offset 0 */
	if (bytes > ring->size || need > ring->size - (ring->head - ring->tail)) {
		if (may_drop) {
			/* Dropped: its sequence number is skipped. */
			seq = ring->next_seq++;
			atomic64_inc(&ring->dropped);
			if (seq_out)
				*seq_out = seq;
		}
		goto out;
	}
	seq = ring->next_seq++;
	if (seq_out)
		*seq_out = seq;
	if (bytes > to_end) {
		struct imgrement_record_header *pad = ring->buf + off;

		/* to_end >= 8: size and type fit, and nothing else is read. */
		pad->size = cpu_to_le32(to_end);
		smp_store_release(&pad->type, cpu_to_le16(IMGREMENT_REC_PAD));
		WRITE_ONCE(ring->head, ring->head + to_end);
		off = 0;
	}
	hdr = ring->buf + off;
	hdr->size = cpu_to_le32(bytes);
	hdr->type = cpu_to_le16(IMGREMENT_REC_NONE);
	hdr->version = IMGREMENT_RECORD_VERSION;
	hdr->page_shift = PAGE_SHIFT;
	hdr->seq = cpu_to_le64(seq);
	WRITE_ONCE(ring->head, ring->head + bytes);
out:
	spin_unlock_irqrestore(&ring->lock, flags);
	return hdr;
}

void imgrement_ring_commit(struct imgrement_ring *ring,
			   struct imgrement_record_header *hdr, u16 type)
{
	bool batch;

	smp_store_release(&hdr->type, cpu_to_le16(type));
	atomic64_inc(&ring->committed);
	/* Unlocked reads: a stale estimate only moves the wake-up to the timer. */
	batch = type == IMGREMENT_REC_MARK ||
		READ_ONCE(ring->head) - READ_ONCE(ring->rpos) >= ring->wake_bytes;
	if (batch && !READ_ONCE(ring->batch_ready))
		WRITE_ONCE(ring->batch_ready, true);
	/* wq_has_sleeper() carries the barrier that pairs with the waiter. */
	if (!wq_has_sleeper(&ring->wait))
		return;
	if (batch)
		wake_up_interruptible(&ring->wait);
	else if (!timer_pending(&ring->wake_timer))
		mod_timer(&ring->wake_timer,
			  jiffies + msecs_to_jiffies(IMGREMENT_WAKE_DELAY_MS));
}

/* Where the next delivery starts, and the end of what is reserved. */
static void ring_bounds(struct imgrement_ring *ring, u64 *rpos, u64 *head)
{
	unsigned long flags;

	spin_lock_irqsave(&ring->lock, flags);
	*rpos = ring->rpos;
	*head = ring->head;
	spin_unlock_irqrestore(&ring->lock, flags);
}

/*
 * Consume up to @tail and deliver from @rpos on, [tail, rpos) lent to
 * @owner (NULL when they are equal); the caller holds read_lock.
 */
static void ring_set_tail(struct imgrement_ring *ring, u64 tail, u64 rpos,
			  const void *owner)
{
	unsigned long flags;
	bool freed;

	spin_lock_irqsave(&ring->lock, flags);
	freed = tail != ring->tail;
	WRITE_ONCE(ring->tail, tail);
	WRITE_ONCE(ring->rpos, rpos);
	ring->win_owner = tail == rpos ? NULL : owner;
	spin_unlock_irqrestore(&ring->lock, flags);
	if (freed && ring->on_space)
		ring->on_space(ring);
}

/*
 * The caller holds read_lock: give back @owner's window (consumed), or
 * -EBUSY if another reader holds one.
 */
static int ring_give_back(struct imgrement_ring *ring, const void *owner)
{
	if (!ring->win_owner)
		return 0;
	if (ring->win_owner != owner)
		return -EBUSY;
	ring_set_tail(ring, ring->rpos, ring->rpos, NULL);
	/* Readers that poll or wait were told nothing is theirs meanwhile. */
	wake_up_interruptible(&ring->wait);
	return 0;
}

/*
 * Start taking records, under read_lock: give back @owner's window, clear
 * the batch flag (before looking, so that a batch completed meanwhile stays
 * announced), and find where delivery starts and reservations end.
 */
static int ring_begin_take(struct imgrement_ring *ring, const void *owner,
			   u64 *pos, u64 *head)
{
	int err = ring_give_back(ring, owner);

	if (err)
		return err;
	WRITE_ONCE(ring->batch_ready, false);
	ring_bounds(ring, pos, head);
	return 0;
}

/* The type of the record at @pos (read first, with acquire) and its size. */
static u16 ring_peek(const struct imgrement_ring *ring, u64 pos, u32 *size)
{
	struct imgrement_record_header *hdr = ring_at(ring, pos);
	u16 type = le16_to_cpu(smp_load_acquire(&hdr->type));

	*size = le32_to_cpu(hdr->size);
	return type;
}

u64 imgrement_ring_used(struct imgrement_ring *ring)
{
	unsigned long flags;
	u64 used;

	spin_lock_irqsave(&ring->lock, flags);
	used = ring->head - ring->tail;
	spin_unlock_irqrestore(&ring->lock, flags);
	return used;
}

bool imgrement_ring_readable(struct imgrement_ring *ring, const void *owner)
{
	bool readable = false;
	unsigned long flags;
	u64 pos;
	u32 size;
	u16 type;

	/*
	 * Under the lock, which every change of head, tail and rpos takes:
	 * nothing in [rpos, head) can be consumed and reused meanwhile, so
	 * every header read here is one.  (Unlocked, another reader could take
	 * these records and writers fill the space with data that reads as a
	 * header: a PAD of size 0 looped forever.)  The walk passes at most the
	 * padding at the end of the buffer.  While another reader holds a
	 * window, read() refuses this one (-EBUSY): nothing is readable to it.
	 */
	spin_lock_irqsave(&ring->lock, flags);
	if (ring->win_owner && ring->win_owner != owner)
		goto out;
	for (pos = ring->rpos; pos < ring->head; pos += size) {
		type = ring_peek(ring, pos, &size);
		if (type != IMGREMENT_REC_PAD) {
			readable = type != IMGREMENT_REC_NONE;
			break;
		}
	}
out:
	spin_unlock_irqrestore(&ring->lock, flags);
	return readable;
}

bool imgrement_ring_batch_ready(struct imgrement_ring *ring, const void *owner)
{
	if (!imgrement_ring_readable(ring, owner))
		return false;
	if (READ_ONCE(ring->batch_ready) || READ_ONCE(ring->closing))
		return true;
	/* Records wait for company: at most IMGREMENT_WAKE_DELAY_MS. */
	if (!timer_pending(&ring->wake_timer))
		mod_timer(&ring->wake_timer,
			  jiffies + msecs_to_jiffies(IMGREMENT_WAKE_DELAY_MS));
	return false;
}

/* Copy [from, to), which never crosses the end of the buffer. */
static int ring_copy_out(struct imgrement_ring *ring, char __user *ubuf, size_t *done,
			 u64 from, u64 to)
{
	if (to == from)
		return 0;
	if (copy_to_user(ubuf + *done, ring_at(ring, from), to - from))
		return -EFAULT;
	*done += to - from;
	return 0;
}

/* Take what is committed at the tail; the caller holds read_lock. */
static ssize_t ring_take(struct imgrement_ring *ring, const void *owner,
			 char __user *ubuf, size_t count)
{
	u64 pos, head, chunk, consumed;
	size_t done = 0;
	u32 size;
	u16 type;
	int err;

	err = ring_begin_take(ring, owner, &pos, &head);
	if (err)
		return err;
	chunk = pos;
	consumed = pos;
	while (pos < head) {
		type = ring_peek(ring, pos, &size);
		if (type == IMGREMENT_REC_NONE)
			break;
		if (type == IMGREMENT_REC_PAD) {
			err = ring_copy_out(ring, ubuf, &done, chunk, pos);
			if (err)
				break;
			pos += size;
			chunk = pos;
			consumed = pos;
			continue;
		}
		if (done + (pos - chunk) + size > count) {
			if (!done && pos == chunk)
				err = -EINVAL;	/* records are never split */
			break;
		}
		pos += size;
		if (ring_off(ring, pos) == 0) {
			/* Reached the end of the buffer: the next record is at 0. */
			err = ring_copy_out(ring, ubuf, &done, chunk, pos);
			if (err)
				break;
			chunk = pos;
			consumed = pos;
		}
	}
	if (!err) {
		err = ring_copy_out(ring, ubuf, &done, chunk, pos);
		if (!err)
			consumed = pos;
	}

	ring_set_tail(ring, consumed, consumed, NULL);
	return done ? (ssize_t)done : err;
}

ssize_t imgrement_ring_read(struct imgrement_ring *ring, const void *owner,
			    char __user *ubuf, size_t count, bool nonblock)
{
	ssize_t ret;
	bool closing;

	if (!count)
		return 0;	/* as for any file: nothing asked, nothing to wait for */
	for (;;) {
		if (nonblock) {
			if (!mutex_trylock(&ring->read_lock))
				return -EAGAIN;
		} else if (mutex_lock_interruptible(&ring->read_lock)) {
			return -ERESTARTSYS;
		}
		/* Before looking: once closing, every record is committed. */
		closing = smp_load_acquire(&ring->closing);
		ret = ring_take(ring, owner, ubuf, count);
		mutex_unlock(&ring->read_lock);
		if (ret)
			return ret;
		if (closing)
			return 0;
		if (nonblock)
			return -EAGAIN;
		if (wait_event_interruptible(ring->wait, imgrement_ring_readable(ring, owner) ||
					     READ_ONCE(ring->closing)))
			return -ERESTARTSYS;
	}
}

int imgrement_ring_next(struct imgrement_ring *ring, const void *owner,
			const void *closer, struct imgrement_window __user *uwin)
{
	struct imgrement_window win = { .ring_size = ring->size };
	u64 start, pos, head;
	bool closing;
	u32 size;
	u16 type;
	int err;

	if (mutex_lock_interruptible(&ring->read_lock))
		return -ERESTARTSYS;
	closing = smp_load_acquire(&ring->closing);
	err = ring_begin_take(ring, owner, &pos, &head);
	if (err)
		goto out;
	start = pos;
	while (pos < head) {
		type = ring_peek(ring, pos, &size);
		if (type == IMGREMENT_REC_NONE)
			break;
		if (type == IMGREMENT_REC_PAD) {
			if (pos != start)
				break;	/* the window ends here; the next is at 0 */
			pos += size;
			start = pos;
			continue;
		}
		pos += size;
		if (ring_off(ring, pos) == 0)
			break;		/* windows never cross the end */
	}
	/* Skipped padding is consumed; the window stays lent until next time. */
	ring_set_tail(ring, start, pos, owner);
	ring->win_closer = closer;
	if (pos == start && !closing) {
		err = -EAGAIN;
		goto out;
	}
	win.offset = ring_off(ring, start);
	win.length = pos - start;
	if (copy_to_user(uwin, &win, sizeof(win))) {
		/* The caller never learnt of this window: it stays unconsumed. */
		ring_set_tail(ring, start, start, NULL);
		wake_up_interruptible(&ring->wait);
		err = -EFAULT;
	}
out:
	mutex_unlock(&ring->read_lock);
	return err;
}

void imgrement_ring_forget(struct imgrement_ring *ring, const void *owner,
			   const void *closer)
{
	mutex_lock(&ring->read_lock);
	if (ring->win_owner == owner && (!closer || ring->win_closer == closer))
		ring_give_back(ring, owner);
	mutex_unlock(&ring->read_lock);
}

void imgrement_ring_close(struct imgrement_ring *ring)
{
	smp_store_release(&ring->closing, true);
	wake_up_interruptible_all(&ring->wait);
}
