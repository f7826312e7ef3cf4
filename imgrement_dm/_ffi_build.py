"""cffi (API mode) builder for the kernel interfaces imgrement-dm speaks.

The device-mapper ioctl structures are declared here only by the fields we
use, followed by ``...;``: cffi then asks the C compiler for the real layout
of ``<linux/dm-ioctl.h>``, so no offset or size is ever copied by hand.

The record layout is compiled the same way from dm_target/imgrement_record.h,
the header the kernel target is built from: the fields named here are
checked against it by the compiler, and their offsets come from it.
"""

from pathlib import Path

from cffi import FFI

TARGET_DIR = Path(__file__).resolve().parent.parent / "dm_target"

CDEF = """
#define DM_VERSION_MAJOR ...
#define DM_VERSION_MINOR ...
#define DM_VERSION_PATCHLEVEL ...
#define DM_NAME_LEN ...
#define DM_UUID_LEN ...
#define DM_MAX_TYPE_NAME ...

#define DM_VERSION ...
#define DM_REMOVE_ALL ...
#define DM_LIST_DEVICES ...
#define DM_DEV_CREATE ...
#define DM_DEV_REMOVE ...
#define DM_DEV_RENAME ...
#define DM_DEV_SUSPEND ...
#define DM_DEV_STATUS ...
#define DM_DEV_WAIT ...
#define DM_TABLE_LOAD ...
#define DM_TABLE_CLEAR ...
#define DM_TABLE_DEPS ...
#define DM_TABLE_STATUS ...
#define DM_LIST_VERSIONS ...
#define DM_TARGET_MSG ...

#define DM_READONLY_FLAG ...
#define DM_SUSPEND_FLAG ...
#define DM_PERSISTENT_DEV_FLAG ...
#define DM_STATUS_TABLE_FLAG ...
#define DM_ACTIVE_PRESENT_FLAG ...
#define DM_INACTIVE_PRESENT_FLAG ...
#define DM_BUFFER_FULL_FLAG ...
#define DM_SKIP_BDGET_FLAG ...
#define DM_SKIP_LOCKFS_FLAG ...
#define DM_NOFLUSH_FLAG ...
#define DM_QUERY_INACTIVE_TABLE_FLAG ...
#define DM_UEVENT_GENERATED_FLAG ...
#define DM_UUID_FLAG ...
#define DM_DATA_OUT_FLAG ...
#define DM_DEFERRED_REMOVE ...

struct dm_ioctl {
    uint32_t version[3];
    uint32_t data_size;
    uint32_t data_start;
    uint32_t target_count;
    int32_t open_count;
    uint32_t flags;
    uint32_t event_nr;
    uint64_t dev;
    char name[...];
    char uuid[...];
    ...;
};

struct dm_target_spec {
    uint64_t sector_start;
    uint64_t length;
    int32_t status;
    uint32_t next;
    char target_type[...];
    ...;
};

struct dm_target_deps {
    uint32_t count;
    unsigned long long dev[];  /* __u64 in the kernel header */
    ...;
};

struct dm_name_list {
    uint64_t dev;
    uint32_t next;
    char name[];
    ...;
};

struct dm_target_versions {
    uint32_t next;
    uint32_t version[3];
    char name[];
    ...;
};

struct dm_target_msg {
    uint64_t sector;
    char message[];
    ...;
};

/* --- <linux/blktrace_api.h>, for exporting to blkparse --- */
#define BLK_IO_TRACE_MAGIC ...
#define BLK_IO_TRACE_VERSION ...
#define BLK_TC_SHIFT ...
#define BLK_TA_QUEUE ...
#define BLK_TA_COMPLETE ...
#define BLK_TN_PROCESS ...
enum blktrace_cat { BLK_TC_READ, BLK_TC_WRITE, BLK_TC_FLUSH, BLK_TC_SYNC, BLK_TC_AHEAD,
                    BLK_TC_META, BLK_TC_DISCARD, BLK_TC_FUA, ... };
struct blk_io_trace {
    uint32_t magic;
    uint32_t sequence;
    uint64_t time;
    uint64_t sector;
    uint32_t bytes;
    uint32_t action;
    uint32_t pid;
    uint32_t device;
    uint32_t cpu;
    uint16_t error;
    uint16_t pdu_len;
    ...;
};

/* --- dm_target/imgrement_record.h --- */
typedef uint16_t __le16;
typedef uint32_t __le32;
typedef uint64_t __le64;

#define IMGREMENT_RECORD_VERSION ...
#define IMGREMENT_REC_NONE ...
#define IMGREMENT_REC_BIO ...
#define IMGREMENT_REC_MARK ...
#define IMGREMENT_REC_PAD ...
#define IMGREMENT_OP_READ ...
#define IMGREMENT_OP_WRITE ...
#define IMGREMENT_OP_FLUSH ...
#define IMGREMENT_OP_DISCARD ...
#define IMGREMENT_OP_SECURE_ERASE ...
#define IMGREMENT_OP_WRITE_ZEROES ...
#define IMGREMENT_OP_ZONE_APPEND ...
#define IMGREMENT_OP_ZONE_MGMT ...
#define IMGREMENT_OP_OTHER ...
#define IMGREMENT_F_FUA ...
#define IMGREMENT_F_PREFLUSH ...
#define IMGREMENT_F_SYNC ...
#define IMGREMENT_F_META ...
#define IMGREMENT_F_PRIO ...
#define IMGREMENT_F_RAHEAD ...
#define IMGREMENT_F_BACKGROUND ...
#define IMGREMENT_F_NOWAIT ...
#define IMGREMENT_F_NOUNMAP ...
#define IMGREMENT_F_IDLE ...
#define IMGREMENT_F_NOMERGE ...
#define IMGREMENT_R_PAYLOAD ...
#define IMGREMENT_R_NO_ROOM ...
#define IMGREMENT_COMM_LEN ...
#define IMGREMENT_MARK_MAX ...

struct imgrement_record_header {
    __le32 size;
    __le16 type;
    uint8_t version;
    uint8_t page_shift;
    __le64 seq;
    ...;
};

struct imgrement_segment {
    __le32 len;
    __le32 offset;
    __le64 sector;
    ...;
};

struct imgrement_bio_record {
    struct imgrement_record_header hdr;
    __le64 sector;
    __le32 bytes;
    uint8_t op;
    uint8_t raw_op;
    __le16 nr_segments;
    __le32 flags;
    __le32 rflags;
    __le64 submit_ns;
    __le64 complete_ns;
    __le32 status;
    __le32 pid;
    __le32 tid;
    __le32 payload_len;
    char comm[...];
    ...;
};

struct imgrement_mark_record {
    struct imgrement_record_header hdr;
    __le64 time_ns;
    __le32 label_len;
    __le32 reserved;
    ...;
};

struct imgrement_window {
    uint64_t offset;
    uint64_t length;
    uint64_t ring_size;
    ...;
};

#define IMGREMENT_IOC_NEXT ...

struct imgrement_scan {
    uint64_t records;
    uint64_t first;
    uint64_t last;
    int64_t gaps;
    uint64_t at;
    uint32_t bad_size;
    ...;
};
#define IMGREMENT_SCAN_OK ...
#define IMGREMENT_SCAN_BAD_SIZE ...
#define IMGREMENT_SCAN_CUT ...
int imgrement_scan(const uint8_t *buf, size_t len, struct imgrement_scan *out);
uint64_t imgrement_xxh64(const uint8_t *buf, size_t len);
uint64_t imgrement_xxh3(const uint8_t *buf, size_t len);
uint64_t imgrement_xxh3_scalar(const uint8_t *buf, size_t len);
"""

#: The per-record and per-byte work of a storing consumer (see its top comment).
STREAM_C = Path(__file__).resolve().parent / "_stream.c"

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "imgrement_dm._kernel_ffi",
    """
    #include <stdint.h>
    #include <sys/ioctl.h>
    #include <linux/dm-ioctl.h>
    #include <linux/blktrace_api.h>
    #include "imgrement_record.h"
    """ + STREAM_C.read_text(),
    include_dirs=[str(TARGET_DIR)],
    depends=[str(TARGET_DIR / "imgrement_record.h"), str(STREAM_C)],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
