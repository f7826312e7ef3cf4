/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A bounded buffer of variable-sized records with out-of-order commit.
 *
 * Producers reserve space in submission order (under a short spinlock that
 * also assigns the sequence number), fill it at leisure and commit it, in
 * any order; the reader sees records in reservation order, each only once it
 * is committed.  Records never wrap around the end of the buffer: the space
 * left at the end is filled with a PAD record that readers never see.  When
 * a record does not fit, it is dropped: its sequence number is consumed and
 * the drop is counted, so readers see exactly one gap per dropped record;
 * or, for a producer that will rather wait (the lossless mode), nothing
 * happens and it is told when a reader frees space (on_space).
 *
 * Reserving never sleeps and never allocates; the buffer is allocated once,
 * when the table is loaded.
 *
 * Sleeping readers are woken lazily, so that a busy disk costs its reader a
 * few wake-ups a second rather than one per bio: at once when a mark is
 * committed or when the unread bytes reach wake_bytes (1/16 of the buffer),
 * otherwise by a timer IMGREMENT_WAKE_DELAY_MS after the first commit that
 * found a sleeper.  poll() says the same: it reports a batch (a mark,
 * wake_bytes unread, or a record that has waited IMGREMENT_WAKE_DELAY_MS),
 * so that a reader that polls before each read takes records in batches
 * even when a few are always there.  A read (O_NONBLOCK or not) takes
 * whatever is committed.
 *
 * Records leave either by copy (imgrement_ring_read) or in place: the buffer
 * is vmalloc_user() memory that a reader maps, and imgrement_ring_next()
 * lends it a window of whole records at the tail, which stays unconsumed
 * (its space is not reused) until the reader asks for the next one.
 */
#ifndef IMGREMENT_RING_H
#define IMGREMENT_RING_H

#include <linux/types.h>
#include <linux/spinlock.h>
#include <linux/wait.h>
#include <linux/mutex.h>
#include <linux/atomic.h>
#include <linux/timer.h>

#include "imgrement_record.h"

/*
 * A reader's wake-ups cost the same however few records they bring, so the
 * delay sets what tracing a slow stream of bios costs: in the cost bench's
 * profiled runs (brd, `trace -q -o` storing), 50 ms made the consumer's
 * user space 1,555 instructions a 1 MiB write and 191 a 4 KiB one; 200 ms,
 * 445 and 51.  A busy stream does not wait for it (1/16 of the buffer wakes
 * at once), so neither drops nor the lossless mode's waits depend on it; a
 * live display lags by up to this much.
 */
#define IMGREMENT_WAKE_DELAY_MS 200

struct imgrement_ring {
	spinlock_t lock;	/* head, tail, next_seq */
	void *buf;
	u32 size;		/* bytes, a multiple of 8 */
	u64 head;		/* bytes ever reserved (monotonic) */
	u64 tail;		/* bytes ever consumed (monotonic) */
	u64 rpos;		/* where the next delivery starts: tail, or the
				 * end of the window lent out */
	const void *win_owner;	/* the reader holding [tail, rpos), or NULL;
				 * changed under read_lock and lock */
	const void *win_closer;	/* whose close() gives it back (ring_forget) */
	u64 next_seq;
	atomic64_t dropped;	/* records dropped since creation */
	atomic64_t committed;	/* records committed since creation */
	wait_queue_head_t wait;	/* readers waiting for a committed record */
	struct timer_list wake_timer;	/* the deferred wake-up */
	u32 wake_bytes;		/* unread bytes that wake readers at once */
	struct mutex read_lock;	/* one reader at a time consumes */
	bool closing;		/* set once: readers get EOF when drained */
	bool batch_ready;	/* a batch is waiting: set by commit and the
				 * timer, cleared when a reader takes records */
	/* Called (process context, no ring lock held) after readers freed space. */
	void (*on_space)(struct imgrement_ring *ring);
};

int imgrement_ring_init(struct imgrement_ring *ring, u32 size);
void imgrement_ring_exit(struct imgrement_ring *ring);

/*
 * Reserve a record of @bytes (rounded up to 8); returns a pointer to its
 * header with size, type NONE, version and seq filled in, or NULL when it
 * does not fit.  Then, if @may_drop, it was dropped (its sequence number
 * skipped and counted); otherwise nothing changed and the caller may try
 * again once on_space says readers freed space.  *@seq_out (if not NULL)
 * gets the record's or the dropped record's sequence number.  Safe from
 * any context.
 */
struct imgrement_record_header *imgrement_ring_reserve(struct imgrement_ring *ring,
						       u32 bytes, bool may_drop,
						       u64 *seq_out);

/*
 * Publish a reserved record as @type and wake readers as described above.
 * Safe from any context.
 */
void imgrement_ring_commit(struct imgrement_ring *ring,
			   struct imgrement_record_header *hdr, u16 type);

/* Bytes reserved and not yet consumed. */
u64 imgrement_ring_used(struct imgrement_ring *ring);

/*
 * Is there a committed record that reader @owner could take now?  Not while
 * another reader holds a window (its read would get -EBUSY); giving a
 * window back wakes the waiters.
 */
bool imgrement_ring_readable(struct imgrement_ring *ring, const void *owner);

/*
 * Is there a batch for reader @owner (what poll reports)?  If only a few
 * records wait, arms the timer that will make them one.
 */
bool imgrement_ring_batch_ready(struct imgrement_ring *ring, const void *owner);

/*
 * Copy whole committed records to @ubuf (at most @count bytes) for reader
 * @owner (any pointer that identifies it: its struct file).  Blocks unless
 * @nonblock.  Returns bytes copied, 0 at end of stream (closing and
 * drained, or @count 0), or -EAGAIN, -EINTR, -EFAULT, -EINVAL (@count
 * smaller than the next record), -EBUSY (another reader holds a window).
 */
ssize_t imgrement_ring_read(struct imgrement_ring *ring, const void *owner,
			    char __user *ubuf, size_t count, bool nonblock);

/*
 * Give back @owner's window, if any, lend it the next (whole committed
 * records) and tell it where, in *@uwin: its offset in the buffer, its
 * length (0 at end of stream) and the buffer's size.  The lend and the
 * copy to user space happen under the read lock, so no other call, even on
 * the same file, can give back or take a window in between: when the copy
 * fails (-EFAULT) the window is taken back unconsumed and its records are
 * delivered again.  Never blocks on records.  @closer names who may give the
 * window back by closing (see ring_forget).  Returns 0, -EAGAIN (nothing to
 * lend), -EINTR, -EBUSY or -EFAULT.
 */
int imgrement_ring_next(struct imgrement_ring *ring, const void *owner,
			const void *closer, struct imgrement_window __user *uwin);

/*
 * The reader @owner goes, or @closer closed it: what it was lent counts as
 * consumed.  A NULL @closer gives the window back whoever took it; otherwise
 * only the @closer the window was lent with does, so that a child that
 * closes an inherited descriptor (at exec) takes nothing from its parent.
 */
void imgrement_ring_forget(struct imgrement_ring *ring, const void *owner,
			   const void *closer);

/* Wake readers for good: they drain what is left, then see EOF. */
void imgrement_ring_close(struct imgrement_ring *ring);

#endif /* IMGREMENT_RING_H */
