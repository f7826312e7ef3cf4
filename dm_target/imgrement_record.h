/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * The imgrement record stream: the one definition of its layout.
 *
 * The kernel target writes these records; the Python package compiles this
 * same header with cffi to read them.  Everything is little-endian and every
 * record starts on an 8-byte boundary.  docs/record-format.md explains the
 * semantics; this file only fixes the layout.
 *
 * A stream is a sequence of records.  Each starts with struct
 * imgrement_record_header; `size` covers the whole record (header, body,
 * segments, payload and padding), so a reader can skip record types it does
 * not know.  `seq` counts records per device, from 0, without gaps except
 * where records were dropped because the buffer was full: each missing
 * number is exactly one dropped record.
 */
#ifndef IMGREMENT_RECORD_H
#define IMGREMENT_RECORD_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define IMGREMENT_RECORD_VERSION	2

/* Record types (header.type).  0 is never seen by readers. */
enum imgrement_record_type {
	IMGREMENT_REC_NONE = 0,		/* reserved, not yet committed */
	IMGREMENT_REC_BIO = 1,		/* one bio: struct imgrement_bio_record */
	IMGREMENT_REC_MARK = 2,		/* a user mark: struct imgrement_mark_record */
	IMGREMENT_REC_PAD = 3,		/* buffer-internal filler, never delivered */
};

/* Operations (bio_record.op); the kernel's own op is kept in raw_op. */
enum imgrement_op {
	IMGREMENT_OP_READ = 0,
	IMGREMENT_OP_WRITE = 1,
	IMGREMENT_OP_FLUSH = 2,		/* an empty write with PREFLUSH */
	IMGREMENT_OP_DISCARD = 3,
	IMGREMENT_OP_SECURE_ERASE = 4,
	IMGREMENT_OP_WRITE_ZEROES = 5,
	IMGREMENT_OP_ZONE_APPEND = 6,
	IMGREMENT_OP_ZONE_MGMT = 7,	/* zone open/close/finish/reset */
	IMGREMENT_OP_OTHER = 15,	/* anything else: see raw_op */
};

/* Bio flags (bio_record.flags): the REQ_* bits that matter to a trace. */
#define IMGREMENT_F_FUA		(1U << 0)
#define IMGREMENT_F_PREFLUSH	(1U << 1)
#define IMGREMENT_F_SYNC	(1U << 2)
#define IMGREMENT_F_META	(1U << 3)
#define IMGREMENT_F_PRIO	(1U << 4)
#define IMGREMENT_F_RAHEAD	(1U << 5)
#define IMGREMENT_F_BACKGROUND	(1U << 6)
#define IMGREMENT_F_NOWAIT	(1U << 7)
#define IMGREMENT_F_NOUNMAP	(1U << 8)
#define IMGREMENT_F_IDLE	(1U << 9)
#define IMGREMENT_F_NOMERGE	(1U << 10)

/* Record-level flags (bio_record.rflags). */
#define IMGREMENT_R_PAYLOAD	(1U << 0)	/* payload holds the bio's data */
#define IMGREMENT_R_NO_ROOM	(1U << 1)	/* the data was to be copied, but the
						 * record with it could never fit in
						 * the buffer: kept without it */

#define IMGREMENT_COMM_LEN	16
#define IMGREMENT_MARK_MAX	255		/* bytes of a mark label */

struct imgrement_record_header {
	__le32 size;		/* bytes in this record, a multiple of 8 */
	__le16 type;		/* enum imgrement_record_type */
	__u8 version;		/* IMGREMENT_RECORD_VERSION */
	__u8 page_shift;	/* log2 of the writer's page size (version 2) */
	__le64 seq;		/* per-device sequence number */
};

/*
 * A run of a bio's segments (version 2): len bytes from offset within a
 * page, continuing at offset 0 of each next page.  Cut at every page
 * boundary (1 << hdr.page_shift) it gives the bio's segments, the pieces
 * bio_for_each_segment() gives.  A run ends where the next segment does not
 * start a page or the last did not end one (and at an empty segment, which
 * is a run of its own), so a 1 MiB write of whole pages is one entry, not
 * 256.  In version 1 each entry was one segment.
 */
struct imgrement_segment {
	__le32 len;		/* bytes */
	__le32 offset;		/* offset within its (first) page */
	__le64 sector;		/* first sector it covers */
};

/*
 * One bio.  Followed by nr_segments struct imgrement_segment (runs), then
 * payload_len bytes of data, then zero padding up to header.size.
 * Sectors are 512-byte units on the traced (device-mapper) device.
 */
struct imgrement_bio_record {
	struct imgrement_record_header hdr;
	__le64 sector;		/* start sector */
	__le32 bytes;		/* size of the bio in bytes (bi_size) */
	__u8 op;		/* enum imgrement_op */
	__u8 raw_op;		/* the kernel's REQ_OP_* value */
	__le16 nr_segments;	/* entries (runs) that follow */
	__le32 flags;		/* IMGREMENT_F_* */
	__le32 rflags;		/* IMGREMENT_R_* */
	__le64 submit_ns;	/* CLOCK_MONOTONIC when the target mapped it */
	__le64 complete_ns;	/* CLOCK_MONOTONIC when it completed */
	__le32 status;		/* 0, or a negative errno (two's complement) */
	__le32 pid;		/* thread group id of the submitter */
	__le32 tid;		/* thread id of the submitter */
	__le32 payload_len;	/* bytes of data after the segments */
	char comm[IMGREMENT_COMM_LEN];	/* submitter's command, NUL-padded */
};

/*
 * A mark set by the "mark <label>" message, in stream order with the bios.
 * Followed by label_len bytes of label (no NUL), then zero padding.
 */
struct imgrement_mark_record {
	struct imgrement_record_header hdr;
	__le64 time_ns;		/* CLOCK_MONOTONIC when it was set */
	__le32 label_len;
	__le32 reserved;
};

/*
 * Reading without copying: mmap() the records file read-only (offset 0,
 * ring_size bytes, MAP_SHARED), then call IMGREMENT_IOC_NEXT.  Each call
 * gives back the window the caller had (it is consumed: the target may now
 * reuse that space) and hands out the next one: whole committed records at
 * [offset, offset + length) of the mapping, the same bytes read() would
 * return, never crossing the end of the buffer.  It never waits: -EAGAIN
 * when nothing is committed (poll() says when), length 0 at the end of the
 * stream.  One reader holds the window; read() and IMGREMENT_IOC_NEXT from
 * another open file fail with -EBUSY until it is given back (next call, a
 * read() on the same file, or close).
 */
struct imgrement_window {
	__u64 offset;		/* in the mapping */
	__u64 length;		/* bytes of whole records; 0 at end of stream */
	__u64 ring_size;	/* bytes of the buffer: the size to map */
};

#define IMGREMENT_IOC_MAGIC	0xE7
#define IMGREMENT_IOC_NEXT	_IOR(IMGREMENT_IOC_MAGIC, 1, struct imgrement_window)

#endif /* IMGREMENT_RECORD_H */
