/*
 * The two things a consumer that stores the stream does for every record
 * and every byte, in C: walking the record headers of a window, and the
 * checksum of a capture chunk.
 *
 * In Python the header walk cost 8.5 us per record in the 6.1 guest (about
 * 2 s of CPU per GB of 4 KiB writes), and zlib's crc32 2.5 s per GB of any
 * writes: the consumer, not the disk, was what made lossless captures wait
 * (here: 0.07 us per record, and 0.3 s per GB).  Both
 * run here without the GIL (cffi releases it for the call), over the
 * kernel's mapped buffer, which is only read.
 *
 * The checksum is XXH64 (the xxHash specification, seed 0), written from
 * the published algorithm: four independent 64-bit lanes of multiply and
 * rotate, which costs few loads per byte.  It is what `xxhsum -H64` prints,
 * so a chunk can be checked without this package.
 */
#include <endian.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "imgrement_record.h"

/* What imgrement_scan() found; the cdef in _ffi_build.py declares it too. */
struct imgrement_scan {
	uint64_t records;
	uint64_t first, last;	/* sequence numbers (when records > 0) */
	int64_t gaps;		/* sequence numbers missing between records */
	uint64_t at;		/* where the walk stopped */
	uint32_t bad_size;	/* the size that stopped it (SCAN_BAD_SIZE) */
};

enum {
	IMGREMENT_SCAN_OK,	/* whole records, up to the end */
	IMGREMENT_SCAN_BAD_SIZE,	/* a header with an impossible size */
	IMGREMENT_SCAN_CUT,	/* the buffer ends inside a record */
};

#define IMGREMENT_SCAN_HDR sizeof(struct imgrement_record_header)

static inline uint64_t load64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof(v));
	return le64toh(v);
}

static inline uint32_t load32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, sizeof(v));
	return le32toh(v);
}

static inline uint16_t load16(const uint8_t *p)
{
	uint16_t v;

	memcpy(&v, p, sizeof(v));
	return le16toh(v);
}

int imgrement_scan(const uint8_t *buf, size_t len, struct imgrement_scan *out)
{
	uint64_t gaps = 0;	/* modulo 2^64: signed overflow would be undefined */
	size_t at = 0;

	out->records = 0;
	out->first = 0;
	out->last = 0;
	out->gaps = 0;
	out->bad_size = 0;
	while (len - at >= IMGREMENT_SCAN_HDR) {
		const uint8_t *h = buf + at;
		uint32_t size = load32(h + offsetof(struct imgrement_record_header, size));
		uint16_t type = load16(h + offsetof(struct imgrement_record_header, type));
		uint64_t seq = load64(h + offsetof(struct imgrement_record_header, seq));

		if (size < IMGREMENT_SCAN_HDR || size % 8) {
			out->at = at;
			out->bad_size = size;
			return IMGREMENT_SCAN_BAD_SIZE;
		}
		if (size > len - at)
			break;
		if (type != IMGREMENT_REC_PAD) {
			/* a sequence that goes back counts negative, as in Python */
			if (out->records && seq != out->last + 1)
				gaps += seq - out->last - 1;
			if (!out->records)
				out->first = seq;
			out->last = seq;
			out->records++;
		}
		at += size;
	}
	out->at = at;
	out->gaps = (int64_t)gaps;
	return at == len ? IMGREMENT_SCAN_OK : IMGREMENT_SCAN_CUT;
}

#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
#define P4 0x85EBCA77C2B2AE63ULL
#define P5 0x27D4EB2F165667C5ULL

static inline uint64_t rotl(uint64_t x, int r)
{
	return (x << r) | (x >> (64 - r));
}

static inline uint64_t lane(uint64_t acc, uint64_t input)
{
	return rotl(acc + input * P2, 31) * P1;
}

static inline uint64_t merge(uint64_t acc, uint64_t v)
{
	return (acc ^ lane(0, v)) * P1 + P4;
}

uint64_t imgrement_xxh64(const uint8_t *p, size_t len)
{
	const uint8_t *end = p + len;
	uint64_t h;

	if (len >= 32) {
		uint64_t v1 = P1 + P2, v2 = P2, v3 = 0, v4 = -P1;

		do {
			v1 = lane(v1, load64(p));
			v2 = lane(v2, load64(p + 8));
			v3 = lane(v3, load64(p + 16));
			v4 = lane(v4, load64(p + 24));
			p += 32;
		} while (end - p >= 32);
		h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
		h = merge(h, v1);
		h = merge(h, v2);
		h = merge(h, v3);
		h = merge(h, v4);
	} else {
		h = P5;
	}
	h += len;
	for (; end - p >= 8; p += 8)
		h = rotl(h ^ lane(0, load64(p)), 27) * P1 + P4;
	if (end - p >= 4) {
		h = rotl(h ^ (load32(p) * P1), 23) * P2 + P3;
		p += 4;
	}
	for (; p < end; p++)
		h = rotl(h ^ (*p * P5), 11) * P1;
	h ^= h >> 33;
	h *= P2;
	h ^= h >> 29;
	h *= P3;
	h ^= h >> 32;
	return h;
}
