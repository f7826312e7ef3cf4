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
 * The checksum of format 4 is XXH3 (64-bit), of format 3 XXH64: both the
 * xxHash specification's, seed 0, written from the published algorithms,
 * what `xxhsum -H3` and `xxhsum -H64` print, so a chunk can be checked
 * without this package (XXH3's comment below says why it replaced XXH64).
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

/* XXH64's final mix, which XXH3 uses too for its shortest inputs */
static inline uint64_t xxh64_avalanche(uint64_t h)
{
	h ^= h >> 33;
	h *= P2;
	h ^= h >> 29;
	h *= P3;
	return h ^ (h >> 32);
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
	return xxh64_avalanche(h);
}

/*
 * XXH3, 64-bit, seed 0, the default secret: the xxHash specification's
 * algorithm (what `xxhsum -H3` prints), written from its description.  Its
 * long-input loop is 8 independent lanes of a 32x32->64 multiply and adds,
 * which vector units do four lanes at a time: with AVX2 a 64-byte stripe
 * is about 14 instructions (XXH64: 56), and on real hardware several times
 * XXH64's speed.  The scalar loop gives the same value where AVX2 is
 * missing.
 */
static const uint8_t xxh3_secret[192] = {
	0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
	0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
	0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
	0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
	0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
	0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
	0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
	0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
	0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
	0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
	0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
	0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

#define XXH3_SECRET_LEN 192
#define XXH3_STRIPE 64
#define XXH3_STRIPES_PER_BLOCK ((XXH3_SECRET_LEN - XXH3_STRIPE) / 8)	/* 16 */
#define XXH3_BLOCK (XXH3_STRIPE * XXH3_STRIPES_PER_BLOCK)		/* 1024 */
#define PRIME32_1 0x9E3779B1U
#define PRIME32_2 0x85EBCA77U
#define PRIME32_3 0xC2B2AE3DU
#define PRIME_MX1 0x165667919E3779F9ULL
#define PRIME_MX2 0x9FB21C651E98DF25ULL

/* The 128-bit product of @a and @b, its halves xored. */
static inline uint64_t fold128(uint64_t a, uint64_t b)
{
#if defined(__SIZEOF_INT128__) && !defined(IMGREMENT_NO_INT128)
	unsigned __int128 m = (unsigned __int128)a * b;

	return (uint64_t)m ^ (uint64_t)(m >> 64);
#else
	/* 32-bit targets have no 128-bit type: four 32x32->64 products */
	uint64_t ll = (a & 0xffffffff) * (b & 0xffffffff);
	uint64_t hl = (a >> 32) * (b & 0xffffffff);
	uint64_t lh = (a & 0xffffffff) * (b >> 32);
	uint64_t hh = (a >> 32) * (b >> 32);
	uint64_t cross = (ll >> 32) + (hl & 0xffffffff) + lh;

	return ((cross << 32) | (ll & 0xffffffff)) ^ (hh + (hl >> 32) + (cross >> 32));
#endif
}

static inline uint64_t xxh3_avalanche(uint64_t h)
{
	h ^= h >> 37;
	h *= PRIME_MX1;
	return h ^ (h >> 32);
}

/* 16 bytes of input against 16 of the secret (seed 0) */
static inline uint64_t xxh3_mix16(const uint8_t *p, const uint8_t *s)
{
	return fold128(load64(p) ^ load64(s), load64(p + 8) ^ load64(s + 8));
}

static uint64_t xxh3_upto16(const uint8_t *p, size_t len)
{
	const uint8_t *s = xxh3_secret;

	if (len > 8) {
		uint64_t lo = load64(p) ^ (load64(s + 24) ^ load64(s + 32));
		uint64_t hi = load64(p + len - 8) ^ (load64(s + 40) ^ load64(s + 48));

		return xxh3_avalanche(len + __builtin_bswap64(lo) + hi + fold128(lo, hi));
	}
	if (len >= 4) {
		uint64_t v = ((uint64_t)load32(p + len - 4) | (uint64_t)load32(p) << 32) ^
			     (load64(s + 8) ^ load64(s + 16));

		v ^= rotl(v, 49) ^ rotl(v, 24);
		v *= PRIME_MX2;
		v ^= (v >> 35) + len;
		v *= PRIME_MX2;
		return v ^ (v >> 28);
	}
	if (len) {
		uint32_t combined = (uint32_t)p[len - 1] | (uint32_t)len << 8 |
				    (uint32_t)p[0] << 16 | (uint32_t)p[len >> 1] << 24;

		return xxh64_avalanche((uint64_t)(load32(s) ^ load32(s + 4)) ^ combined);
	}
	return xxh64_avalanche(load64(s + 56) ^ load64(s + 64));
}

static uint64_t xxh3_upto240(const uint8_t *p, size_t len)
{
	const uint8_t *s = xxh3_secret;
	uint64_t acc = len * P1;
	size_t i;

	if (len <= 128) {
		for (i = 0; i < ((len - 1) >> 5) + 1; i++) {
			acc += xxh3_mix16(p + 16 * i, s + 32 * i);
			acc += xxh3_mix16(p + len - 16 - 16 * i, s + 32 * i + 16);
		}
		return xxh3_avalanche(acc);
	}
	for (i = 0; i < 8; i++)
		acc += xxh3_mix16(p + 16 * i, s + 16 * i);
	acc = xxh3_avalanche(acc);
	for (i = 8; i < len / 16; i++)
		acc += xxh3_mix16(p + 16 * i, s + 16 * (i - 8) + 3);
	acc += xxh3_mix16(p + len - 16, s + 136 - 17);
	return xxh3_avalanche(acc);
}

/* The long input's loop, by whichever unit runs it: @n stripes from @p. */
typedef void xxh3_stripes_fn(uint64_t *acc, const uint8_t *p, size_t n, const uint8_t *s);

static void xxh3_stripes_scalar(uint64_t *acc, const uint8_t *p, size_t n, const uint8_t *s)
{
	size_t k;
	int i;

	for (k = 0; k < n; k++, p += XXH3_STRIPE, s += 8) {
		for (i = 0; i < 8; i++) {
			uint64_t v = load64(p + 8 * i);
			uint64_t key = v ^ load64(s + 8 * i);

			acc[i ^ 1] += v;
			acc[i] += (key & 0xffffffff) * (key >> 32);
		}
	}
}

static void xxh3_scramble_scalar(uint64_t *acc, const uint8_t *s)
{
	int i;

	for (i = 0; i < 8; i++) {
		uint64_t a = acc[i];

		a ^= a >> 47;
		a ^= load64(s + 8 * i);
		acc[i] = a * PRIME32_1;
	}
}

/* x86-64 with a compiler that builds AVX2 code per function */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
	__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define XXH3_X86 1
#endif

#ifdef XXH3_X86
#include <immintrin.h>

/* Four lanes a register: the same sums as the scalar loop, lane for lane. */
__attribute__((target("avx2"))) static void xxh3_stripes_avx2(uint64_t *acc, const uint8_t *p,
							      size_t n, const uint8_t *s)
{
	__m256i a0 = _mm256_loadu_si256((const __m256i *)acc);
	__m256i a1 = _mm256_loadu_si256((const __m256i *)(acc + 4));
	size_t k;

	for (k = 0; k < n; k++, p += XXH3_STRIPE, s += 8) {
		__m256i d0 = _mm256_loadu_si256((const __m256i *)p);
		__m256i d1 = _mm256_loadu_si256((const __m256i *)(p + 32));
		__m256i k0 = _mm256_xor_si256(d0, _mm256_loadu_si256((const __m256i *)s));
		__m256i k1 = _mm256_xor_si256(d1, _mm256_loadu_si256((const __m256i *)(s + 32)));

		/* low half of each key lane times its high half */
		k0 = _mm256_mul_epu32(k0, _mm256_shuffle_epi32(k0, _MM_SHUFFLE(0, 3, 0, 1)));
		k1 = _mm256_mul_epu32(k1, _mm256_shuffle_epi32(k1, _MM_SHUFFLE(0, 3, 0, 1)));
		/* each lane's input goes to its neighbour: lanes 0 1 2 3 as 1 0 3 2 */
		a0 = _mm256_add_epi64(a0, _mm256_add_epi64(k0, _mm256_shuffle_epi32(
						       d0, _MM_SHUFFLE(1, 0, 3, 2))));
		a1 = _mm256_add_epi64(a1, _mm256_add_epi64(k1, _mm256_shuffle_epi32(
						       d1, _MM_SHUFFLE(1, 0, 3, 2))));
	}
	_mm256_storeu_si256((__m256i *)acc, a0);
	_mm256_storeu_si256((__m256i *)(acc + 4), a1);
}

static int xxh3_have_avx2(void)
{
	static int have = -1;	/* a race here only asks the CPU twice */

	if (have < 0)
		have = __builtin_cpu_supports("avx2") ? 1 : 0;
	return have;
}
#endif

static uint64_t xxh3_long(const uint8_t *p, size_t len, xxh3_stripes_fn *stripes)
{
	uint64_t acc[8] = { PRIME32_3, P1, P2, P3, P4, PRIME32_2, P5, PRIME32_1 };
	const uint8_t *s = xxh3_secret;
	size_t blocks = (len - 1) / XXH3_BLOCK, b, last;
	uint64_t h;
	int i;

	for (b = 0; b < blocks; b++, p += XXH3_BLOCK) {
		stripes(acc, p, XXH3_STRIPES_PER_BLOCK, s);
		xxh3_scramble_scalar(acc, s + XXH3_SECRET_LEN - XXH3_STRIPE);
	}
	last = len - blocks * XXH3_BLOCK;	/* 1 to XXH3_BLOCK */
	stripes(acc, p, (last - 1) / XXH3_STRIPE, s);
	/* the input's last 64 bytes, which may overlap the stripes before */
	stripes(acc, p + last - XXH3_STRIPE, 1, s + XXH3_SECRET_LEN - XXH3_STRIPE - 7);
	h = len * P1;
	for (i = 0; i < 4; i++)
		h += fold128(acc[2 * i] ^ load64(s + 11 + 16 * i),
			     acc[2 * i + 1] ^ load64(s + 11 + 16 * i + 8));
	return xxh3_avalanche(h);
}

uint64_t imgrement_xxh3(const uint8_t *p, size_t len)
{
	if (len <= 16)
		return xxh3_upto16(p, len);
	if (len <= 240)
		return xxh3_upto240(p, len);
#ifdef __AVX2__
	return xxh3_long(p, len, xxh3_stripes_avx2);
#elif defined(XXH3_X86)
	if (xxh3_have_avx2())
		return xxh3_long(p, len, xxh3_stripes_avx2);
#endif
	return xxh3_long(p, len, xxh3_stripes_scalar);
}

/* The scalar loop alone, so tests can hold the vector one to it. */
uint64_t imgrement_xxh3_scalar(const uint8_t *p, size_t len)
{
	if (len <= 240)
		return imgrement_xxh3(p, len);
	return xxh3_long(p, len, xxh3_stripes_scalar);
}
