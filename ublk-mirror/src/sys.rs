//! The ublk kernel ABI, transcribed by hand from `include/uapi/linux/ublk_cmd.h` of
//! **Linux 6.12** (the header is unchanged from 6.9, when `UBLK_U_CMD_DEL_DEV_ASYNC` was
//! added, through 6.12; 6.13 adds `UBLK_F_USER_RECOVERY_FAIL_IO`).
//!
//! This is the only place that knows the kernel's layouts and numbers. Everything is
//! `#[repr(C)]` plain data; the sizes are checked at compile time below and against the
//! C layout in the unit tests. Names keep the kernel's spelling (minus the `__u32` types)
//! so a reader can grep the header. Features of later kernels are deliberately absent:
//! the guest kernel we test against is 6.12 and we only use what it advertises.
#![allow(non_camel_case_types)]

use std::mem::size_of;

// ---------------------------------------------------------------------------------------
// ioctl encoding (asm-generic/ioctl.h; x86, arm64, riscv — not the MIPS/PPC/SPARC variant)
// ---------------------------------------------------------------------------------------

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)`.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size < (1 << IOC_SIZEBITS));
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}
/// `_IOR(type, nr, T)`.
pub const fn ior<T>(ty: u8, nr: u8) -> u32 {
    ioc(IOC_READ, ty, nr, size_of::<T>())
}
/// `_IOWR(type, nr, T)`.
pub const fn iowr<T>(ty: u8, nr: u8) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size_of::<T>())
}
/// `_IOC_NR(cmd)`: the legacy opcode inside an ioctl-encoded one.
pub const fn ioc_nr(cmd: u32) -> u8 {
    (cmd >> IOC_NRSHIFT) as u8
}

// ---------------------------------------------------------------------------------------
// Control commands (sent to /dev/ublk-control as IORING_OP_URING_CMD, SQE128)
// ---------------------------------------------------------------------------------------

/// Legacy (not ioctl-encoded) control opcodes. The kernel accepts them only with
/// `CONFIG_BLKDEV_UBLK_LEGACY_OPCODES`; new code uses the `UBLK_U_CMD_*` forms.
pub const UBLK_CMD_GET_QUEUE_AFFINITY: u8 = 0x01;
pub const UBLK_CMD_GET_DEV_INFO: u8 = 0x02;
pub const UBLK_CMD_ADD_DEV: u8 = 0x04;
pub const UBLK_CMD_DEL_DEV: u8 = 0x05;
pub const UBLK_CMD_START_DEV: u8 = 0x06;
pub const UBLK_CMD_STOP_DEV: u8 = 0x07;
pub const UBLK_CMD_SET_PARAMS: u8 = 0x08;
pub const UBLK_CMD_GET_PARAMS: u8 = 0x09;
pub const UBLK_CMD_START_USER_RECOVERY: u8 = 0x10;
pub const UBLK_CMD_END_USER_RECOVERY: u8 = 0x11;
pub const UBLK_CMD_GET_DEV_INFO2: u8 = 0x12;
/// Only exists ioctl-encoded (`UBLK_U_CMD_GET_FEATURES`); the number is the `_IOC_NR`.
pub const UBLK_CMD_GET_FEATURES: u8 = 0x13;
/// Only exists ioctl-encoded (`UBLK_U_CMD_DEL_DEV_ASYNC`, since 6.9).
pub const UBLK_CMD_DEL_DEV_ASYNC: u8 = 0x14;

/// The ioctl "type" byte of every ublk command.
pub const UBLK_IOC_TYPE: u8 = b'u';

pub const UBLK_U_CMD_GET_QUEUE_AFFINITY: u32 = ior::<ublksrv_ctrl_cmd>(UBLK_IOC_TYPE, UBLK_CMD_GET_QUEUE_AFFINITY);
pub const UBLK_U_CMD_GET_DEV_INFO: u32 = ior::<ublksrv_ctrl_cmd>(UBLK_IOC_TYPE, UBLK_CMD_GET_DEV_INFO);
pub const UBLK_U_CMD_ADD_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(UBLK_IOC_TYPE, UBLK_CMD_ADD_DEV);
pub const UBLK_U_CMD_DEL_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(UBLK_IOC_TYPE, UBLK_CMD_DEL_DEV);
pub const UBLK_U_CMD_START_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(UBLK_IOC_TYPE, UBLK_CMD_START_DEV);
pub const UBLK_U_CMD_STOP_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(UBLK_IOC_TYPE, UBLK_CMD_STOP_DEV);
pub const UBLK_U_CMD_SET_PARAMS: u32 = iowr::<ublksrv_ctrl_cmd>(UBLK_IOC_TYPE, UBLK_CMD_SET_PARAMS);
pub const UBLK_U_CMD_GET_PARAMS: u32 = ior::<ublksrv_ctrl_cmd>(UBLK_IOC_TYPE, UBLK_CMD_GET_PARAMS);
pub const UBLK_U_CMD_START_USER_RECOVERY: u32 = iowr::<ublksrv_ctrl_cmd>(UBLK_IOC_TYPE, UBLK_CMD_START_USER_RECOVERY);
pub const UBLK_U_CMD_END_USER_RECOVERY: u32 = iowr::<ublksrv_ctrl_cmd>(UBLK_IOC_TYPE, UBLK_CMD_END_USER_RECOVERY);
pub const UBLK_U_CMD_GET_DEV_INFO2: u32 = ior::<ublksrv_ctrl_cmd>(UBLK_IOC_TYPE, UBLK_CMD_GET_DEV_INFO2);
pub const UBLK_U_CMD_GET_FEATURES: u32 = ior::<ublksrv_ctrl_cmd>(UBLK_IOC_TYPE, UBLK_CMD_GET_FEATURES);
pub const UBLK_U_CMD_DEL_DEV_ASYNC: u32 = ior::<ublksrv_ctrl_cmd>(UBLK_IOC_TYPE, UBLK_CMD_DEL_DEV_ASYNC);

/// Length of the buffer `UBLK_U_CMD_GET_FEATURES` fills (one `u64` bitmask).
pub const UBLK_FEATURES_LEN: u16 = 8;

// ---------------------------------------------------------------------------------------
// I/O commands (sent to /dev/ublkcN, one io_uring per queue, SQE128)
// ---------------------------------------------------------------------------------------

pub const UBLK_IO_FETCH_REQ: u8 = 0x20;
pub const UBLK_IO_COMMIT_AND_FETCH_REQ: u8 = 0x21;
pub const UBLK_IO_NEED_GET_DATA: u8 = 0x22;

pub const UBLK_U_IO_FETCH_REQ: u32 = iowr::<ublksrv_io_cmd>(UBLK_IOC_TYPE, UBLK_IO_FETCH_REQ);
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 = iowr::<ublksrv_io_cmd>(UBLK_IOC_TYPE, UBLK_IO_COMMIT_AND_FETCH_REQ);
pub const UBLK_U_IO_NEED_GET_DATA: u32 = iowr::<ublksrv_io_cmd>(UBLK_IOC_TYPE, UBLK_IO_NEED_GET_DATA);

/// Completion result of a FETCH/COMMIT command: a request is ready in the descriptor.
pub const UBLK_IO_RES_OK: i32 = 0;
/// Completion result: issue `UBLK_U_IO_NEED_GET_DATA` (only with `UBLK_F_NEED_GET_DATA`).
pub const UBLK_IO_RES_NEED_GET_DATA: i32 = 1;
/// Completion result: the queue is going away; do not re-fetch (`-ENODEV`).
pub const UBLK_IO_RES_ABORT: i32 = -libc::ENODEV;

/// mmap offset of the per-queue descriptor array on /dev/ublkcN.
pub const UBLKSRV_CMD_BUF_OFFSET: i64 = 0;
/// pread/pwrite offset base on /dev/ublkcN for `UBLK_F_USER_COPY`.
pub const UBLKSRV_IO_BUF_OFFSET: u64 = 0x8000_0000;

/// Tag is 16 bits, but the driver limits a queue to 4096 I/Os.
pub const UBLK_MAX_QUEUE_DEPTH: u16 = 4096;

/// `UBLK_F_USER_COPY` offset layout: single I/O buffer at most 32 MiB …
pub const UBLK_IO_BUF_OFF: u32 = 0;
pub const UBLK_IO_BUF_BITS: u32 = 25;
pub const UBLK_IO_BUF_BITS_MASK: u64 = (1 << UBLK_IO_BUF_BITS) - 1;
/// … then the tag (at most 64 Ki I/Os per queue) …
pub const UBLK_TAG_OFF: u32 = UBLK_IO_BUF_BITS;
pub const UBLK_TAG_BITS: u32 = 16;
pub const UBLK_TAG_BITS_MASK: u64 = (1 << UBLK_TAG_BITS) - 1;
/// … then the queue id (at most 4096 queues).
pub const UBLK_QID_OFF: u32 = UBLK_TAG_OFF + UBLK_TAG_BITS;
pub const UBLK_QID_BITS: u32 = 12;
pub const UBLK_QID_BITS_MASK: u64 = (1 << UBLK_QID_BITS) - 1;
pub const UBLK_MAX_NR_QUEUES: u32 = 1 << UBLK_QID_BITS;
pub const UBLKSRV_IO_BUF_TOTAL_BITS: u32 = UBLK_QID_OFF + UBLK_QID_BITS;
pub const UBLKSRV_IO_BUF_TOTAL_SIZE: u64 = 1 << UBLKSRV_IO_BUF_TOTAL_BITS;

/// The /dev/ublkcN file offset that `UBLK_F_USER_COPY` pread/pwrite use for `(q_id, tag)`,
/// plus `off` bytes into that request's data.
pub const fn user_copy_offset(q_id: u16, tag: u16, off: u32) -> u64 {
    UBLKSRV_IO_BUF_OFFSET
        + (((q_id as u64) & UBLK_QID_BITS_MASK) << UBLK_QID_OFF)
        + (((tag as u64) & UBLK_TAG_BITS_MASK) << UBLK_TAG_OFF)
        + ((off as u64) & UBLK_IO_BUF_BITS_MASK)
}

// ---------------------------------------------------------------------------------------
// Feature flags (ublksrv_ctrl_dev_info.flags, and the GET_FEATURES bitmask)
// ---------------------------------------------------------------------------------------

/// Zero copy: requires 4k block size; remaps the request's pages into the server.
pub const UBLK_F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
/// Complete io commands via `io_uring_cmd_complete_in_task` (for comparison runs).
pub const UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
/// Writes need a second command (`UBLK_U_IO_NEED_GET_DATA`) to hand over the buffer.
pub const UBLK_F_NEED_GET_DATA: u64 = 1 << 2;
/// A restarted server can take over a device whose server died.
pub const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
/// With recovery: requests that were in flight are re-issued to the new server.
pub const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
/// Unprivileged users can create and own devices (needs a udev rule for the nodes).
pub const UBLK_F_UNPRIVILEGED_DEV: u64 = 1 << 5;
/// Commands are ioctl-encoded (`UBLK_U_*`).
pub const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
/// Data is copied with pread/pwrite on /dev/ublkcN instead of through a server buffer.
pub const UBLK_F_USER_COPY: u64 = 1 << 7;
/// Zoned block device support.
pub const UBLK_F_ZONED: u64 = 1 << 8;

/// Every feature flag Linux 6.12 defines, with its name as in the header minus `UBLK_F_`.
pub const FEATURE_NAMES: &[(u64, &str)] = &[
    (UBLK_F_SUPPORT_ZERO_COPY, "SUPPORT_ZERO_COPY"),
    (UBLK_F_URING_CMD_COMP_IN_TASK, "URING_CMD_COMP_IN_TASK"),
    (UBLK_F_NEED_GET_DATA, "NEED_GET_DATA"),
    (UBLK_F_USER_RECOVERY, "USER_RECOVERY"),
    (UBLK_F_USER_RECOVERY_REISSUE, "USER_RECOVERY_REISSUE"),
    (UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV"),
    (UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"),
    (UBLK_F_USER_COPY, "USER_COPY"),
    (UBLK_F_ZONED, "ZONED"),
];

// ---------------------------------------------------------------------------------------
// Device state (ublksrv_ctrl_dev_info.state)
// ---------------------------------------------------------------------------------------

pub const UBLK_S_DEV_DEAD: u16 = 0;
pub const UBLK_S_DEV_LIVE: u16 = 1;
pub const UBLK_S_DEV_QUIESCED: u16 = 2;

// ---------------------------------------------------------------------------------------
// Structures
// ---------------------------------------------------------------------------------------

/// Payload of a control command, carried in the first 32 bytes of the SQE128 `cmd` area.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublksrv_ctrl_cmd {
    /// Target device; must be valid (any value for GET_FEATURES, -1 for ADD_DEV "any").
    pub dev_id: u32,
    /// Target queue; must be `u16::MAX` (-1) when the command is not for a queue.
    pub queue_id: u16,
    /// Length of the buffer at `addr` (IN or OUT depending on the command).
    pub len: u16,
    /// User address of the command's buffer.
    pub addr: u64,
    /// Inline data.
    pub data: [u64; 1],
    /// UNPRIVILEGED_DEV and GET_DEV_INFO2 only: length of the char device path
    /// (including the NUL) which then precedes the buffer at `addr`.
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

/// Device description: ADD_DEV (in/out), GET_DEV_INFO(2) (out).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublksrv_ctrl_dev_info {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    /// One of `UBLK_S_DEV_*`.
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    /// `UBLK_F_*` flags requested by the server (the kernel masks unsupported ones).
    pub flags: u64,
    /// For the server's own use; the driver stores it but never interprets it.
    pub ublksrv_flags: u64,
    /// Stored by the kernel.
    pub owner_uid: u32,
    /// Stored by the kernel.
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

pub const UBLK_IO_OP_READ: u8 = 0;
pub const UBLK_IO_OP_WRITE: u8 = 1;
pub const UBLK_IO_OP_FLUSH: u8 = 2;
pub const UBLK_IO_OP_DISCARD: u8 = 3;
pub const UBLK_IO_OP_WRITE_SAME: u8 = 4;
pub const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;
pub const UBLK_IO_OP_ZONE_OPEN: u8 = 10;
pub const UBLK_IO_OP_ZONE_CLOSE: u8 = 11;
pub const UBLK_IO_OP_ZONE_FINISH: u8 = 12;
pub const UBLK_IO_OP_ZONE_APPEND: u8 = 13;
pub const UBLK_IO_OP_ZONE_RESET_ALL: u8 = 14;
pub const UBLK_IO_OP_ZONE_RESET: u8 = 15;
/// Report zones: `nr_zones` in the descriptor, answer is an array of `struct blk_zone`.
pub const UBLK_IO_OP_REPORT_ZONES: u8 = 18;

/// Request flags, in `op_flags` bits 8.. (test them against `op_flags`, not against
/// `ublksrv_io_desc::flags()` which is shifted).
pub const UBLK_IO_F_FAILFAST_DEV: u32 = 1 << 8;
pub const UBLK_IO_F_FAILFAST_TRANSPORT: u32 = 1 << 9;
pub const UBLK_IO_F_FAILFAST_DRIVER: u32 = 1 << 10;
pub const UBLK_IO_F_META: u32 = 1 << 11;
pub const UBLK_IO_F_FUA: u32 = 1 << 13;
pub const UBLK_IO_F_NOUNMAP: u32 = 1 << 15;
pub const UBLK_IO_F_SWAP: u32 = 1 << 16;

/// One request, written by the driver into the queue's mmapped descriptor array (indexed
/// by tag) before it completes the FETCH/COMMIT command for that tag.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublksrv_io_desc {
    /// op: bits 0-7, flags: bits 8-31.
    pub op_flags: u32,
    /// `nr_sectors`, or `nr_zones` for `UBLK_IO_OP_REPORT_ZONES` (a C union of two u32).
    pub nr_sectors: u32,
    /// Start sector of this I/O (garbage for FLUSH: answer FLUSH before bounds checks).
    pub start_sector: u64,
    /// Buffer address in the server's address space, from the FETCH command.
    pub addr: u64,
}

impl ublksrv_io_desc {
    /// `ublksrv_get_op()`.
    pub const fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }
    /// `ublksrv_get_flags()`: the flags shifted down by 8.
    pub const fn flags(&self) -> u32 {
        self.op_flags >> 8
    }
    /// `nr_zones` view of the union.
    pub const fn nr_zones(&self) -> u32 {
        self.nr_sectors
    }
}

/// Payload of an I/O command (FETCH / COMMIT_AND_FETCH / NEED_GET_DATA), carried in the
/// first 16 bytes of the SQE128 `cmd` area.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublksrv_io_cmd {
    pub q_id: u16,
    /// For fetch/commit: which request.
    pub tag: u16,
    /// I/O result (bytes, or a negative errno); COMMIT only.
    pub result: i32,
    /// FETCH: the server buffer for this tag (unused with `UBLK_F_USER_COPY`); for
    /// `UBLK_IO_OP_ZONE_APPEND` the allocated LBA (`zone_append_lba` in the C union).
    pub addr: u64,
}

pub const UBLK_ATTR_READ_ONLY: u32 = 1 << 0;
pub const UBLK_ATTR_ROTATIONAL: u32 = 1 << 1;
pub const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub const UBLK_ATTR_FUA: u32 = 1 << 3;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublk_param_basic {
    /// `UBLK_ATTR_*`.
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublk_param_discard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// Read-only (GET_PARAMS); `disk_*` are valid once the device is started.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublk_param_devt {
    pub char_major: u32,
    pub char_minor: u32,
    pub disk_major: u32,
    pub disk_minor: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublk_param_zoned {
    pub max_open_zones: u32,
    pub max_active_zones: u32,
    pub max_zone_append_sectors: u32,
    pub reserved: [u8; 20],
}

pub const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;
pub const UBLK_PARAM_TYPE_DEVT: u32 = 1 << 2;
pub const UBLK_PARAM_TYPE_ZONED: u32 = 1 << 3;

/// SET_PARAMS / GET_PARAMS buffer. `len` must be set by the server for both; the driver
/// may lower `len` and `types` when the two sides know different versions of the struct.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublk_params {
    pub len: u32,
    /// `UBLK_PARAM_TYPE_*`: which of the members below are meaningful.
    pub types: u32,
    pub basic: ublk_param_basic,
    pub discard: ublk_param_discard,
    pub devt: ublk_param_devt,
    pub zoned: ublk_param_zoned,
}

// The sizes the kernel's layout has on every 64-bit Linux target. A mismatch here is a
// transcription error, caught at build time.
const _: () = assert!(size_of::<ublksrv_ctrl_cmd>() == 32);
const _: () = assert!(size_of::<ublksrv_ctrl_dev_info>() == 64);
const _: () = assert!(size_of::<ublksrv_io_desc>() == 24);
const _: () = assert!(size_of::<ublksrv_io_cmd>() == 16);
const _: () = assert!(size_of::<ublk_param_basic>() == 32);
const _: () = assert!(size_of::<ublk_param_discard>() == 20);
const _: () = assert!(size_of::<ublk_param_devt>() == 16);
const _: () = assert!(size_of::<ublk_param_zoned>() == 32);
// 108 bytes of members, padded to the 8-byte alignment that `basic` imposes.
const _: () = assert!(size_of::<ublk_params>() == 112);
// The control payload must fit the 80-byte command area of an SQE128.
const _: () = assert!(size_of::<ublksrv_ctrl_cmd>() <= 80);
const _: () = assert!(size_of::<ublksrv_io_cmd>() <= 80);

/// Serialises a `#[repr(C)]` command payload into the 80-byte `cmd` area of an SQE128.
pub fn cmd_bytes<T: CmdPayload>(payload: &T) -> [u8; 80] {
    let mut out = [0u8; 80];
    let n = size_of::<T>();
    // SAFETY: `T: CmdPayload` is a `#[repr(C)]` struct of integers without padding
    // (checked by the size assertions above), so all `n` bytes are initialised; the
    // source and destination are distinct, and `n <= 80` (asserted above for each impl).
    unsafe {
        std::ptr::copy_nonoverlapping((payload as *const T).cast::<u8>(), out.as_mut_ptr(), n.min(out.len()));
    }
    out
}

/// `#[repr(C)]` structures made only of integers that travel through a control command's
/// buffer (`ublksrv_ctrl_cmd.addr`): ADD_DEV / GET_DEV_INFO carry a
/// [`ublksrv_ctrl_dev_info`], SET_PARAMS / GET_PARAMS a [`ublk_params`].
pub trait Plain: Copy + Default + sealed::Sealed {
    /// Bytes up to the end of the last member; the rest of `size_of::<Self>()` is trailing
    /// padding, which is never read (it may be uninitialised) and sent as zeroes.
    const DATA_LEN: usize;

    /// The C layout of `self`, `size_of::<Self>()` bytes, padding zeroed.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; size_of::<Self>()];
        // SAFETY: `Self: Plain` is a `#[repr(C)]` struct of integers whose first
        // `DATA_LEN` bytes are members without interior padding (checked by the offset
        // assertions below), so they are initialised; `DATA_LEN <= size_of::<Self>()`,
        // the length of `out`; source and destination do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping((self as *const Self).cast::<u8>(), out.as_mut_ptr(), Self::DATA_LEN);
        }
        out
    }

    /// Reads a value from the C layout; `None` if `bytes` is shorter than the members.
    /// Extra bytes are ignored, missing padding is zero.
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < Self::DATA_LEN {
            return None;
        }
        let mut v = Self::default();
        // SAFETY: every bit pattern is a valid value of an integer-only `#[repr(C)]`
        // struct; exactly `DATA_LEN <= size_of::<Self>()` bytes are written into `v`, from
        // a slice at least that long; the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut v as *mut Self).cast::<u8>(), Self::DATA_LEN);
        }
        Some(v)
    }
}
impl Plain for ublksrv_ctrl_dev_info {
    const DATA_LEN: usize = 64;
}
impl Plain for ublk_params {
    // `zoned` ends at 76 + 32 = 108; 4 bytes of padding follow (8-byte alignment).
    const DATA_LEN: usize = 108;
}
const _: () = assert!(<ublksrv_ctrl_dev_info as Plain>::DATA_LEN == size_of::<ublksrv_ctrl_dev_info>());
const _: () = assert!(<ublk_params as Plain>::DATA_LEN <= size_of::<ublk_params>());
const _: () = assert!(std::mem::offset_of!(ublk_params, zoned) + size_of::<ublk_param_zoned>() == 108);

/// Marker for the command payloads [`cmd_bytes`] may serialise.
pub trait CmdPayload: Copy + sealed::Sealed {}
impl CmdPayload for ublksrv_ctrl_cmd {}
impl CmdPayload for ublksrv_io_cmd {}
mod sealed {
    pub trait Sealed {}
    impl Sealed for super::ublksrv_ctrl_cmd {}
    impl Sealed for super::ublksrv_io_cmd {}
    impl Sealed for super::ublksrv_ctrl_dev_info {}
    impl Sealed for super::ublk_params {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of};

    #[test]
    fn struct_sizes_and_offsets_match_the_c_layout() {
        assert_eq!(size_of::<ublksrv_ctrl_cmd>(), 32);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, addr), 8);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, data), 16);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, dev_path_len), 24);
        assert_eq!(size_of::<ublksrv_ctrl_dev_info>(), 64);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, max_io_buf_bytes), 8);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, ublksrv_pid), 16);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, flags), 24);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, owner_uid), 40);
        assert_eq!(size_of::<ublksrv_io_desc>(), 24);
        assert_eq!(offset_of!(ublksrv_io_desc, start_sector), 8);
        assert_eq!(offset_of!(ublksrv_io_desc, addr), 16);
        assert_eq!(size_of::<ublksrv_io_cmd>(), 16);
        assert_eq!(offset_of!(ublksrv_io_cmd, result), 4);
        assert_eq!(offset_of!(ublksrv_io_cmd, addr), 8);
        assert_eq!(size_of::<ublk_params>(), 112);
        assert_eq!(align_of::<ublk_params>(), 8);
        assert_eq!(offset_of!(ublk_params, basic), 8);
        assert_eq!(offset_of!(ublk_params, discard), 40);
        assert_eq!(offset_of!(ublk_params, devt), 60);
        assert_eq!(offset_of!(ublk_params, zoned), 76);
        assert_eq!(offset_of!(ublk_param_basic, dev_sectors), 16);
    }

    #[test]
    fn ioctl_encodings_match_the_kernel_values() {
        // Values computed with the C macros (_IOR/_IOWR from asm-generic/ioctl.h).
        assert_eq!(UBLK_U_CMD_GET_QUEUE_AFFINITY, 0x8020_7501);
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(UBLK_U_CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(UBLK_U_CMD_DEL_DEV, 0xc020_7505);
        assert_eq!(UBLK_U_CMD_START_DEV, 0xc020_7506);
        assert_eq!(UBLK_U_CMD_STOP_DEV, 0xc020_7507);
        assert_eq!(UBLK_U_CMD_SET_PARAMS, 0xc020_7508);
        assert_eq!(UBLK_U_CMD_GET_PARAMS, 0x8020_7509);
        assert_eq!(UBLK_U_CMD_START_USER_RECOVERY, 0xc020_7510);
        assert_eq!(UBLK_U_CMD_END_USER_RECOVERY, 0xc020_7511);
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO2, 0x8020_7512);
        assert_eq!(UBLK_U_CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(UBLK_U_CMD_DEL_DEV_ASYNC, 0x8020_7514);
        assert_eq!(UBLK_U_IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
        assert_eq!(UBLK_U_IO_NEED_GET_DATA, 0xc010_7522);
        assert_eq!(ioc_nr(UBLK_U_CMD_GET_FEATURES), UBLK_CMD_GET_FEATURES);
    }

    #[test]
    fn feature_table_is_the_contiguous_6_12_set() {
        for (i, (bit, name)) in FEATURE_NAMES.iter().enumerate() {
            assert_eq!(*bit, 1u64 << i, "{name}");
        }
        assert_eq!(FEATURE_NAMES.len(), 9);
    }

    #[test]
    fn user_copy_offsets() {
        assert_eq!(user_copy_offset(0, 0, 0), 0x8000_0000);
        assert_eq!(user_copy_offset(0, 1, 0), 0x8000_0000 + (1 << 25));
        assert_eq!(user_copy_offset(1, 0, 512), 0x8000_0000 + (1 << 41) + 512);
        assert!(user_copy_offset(4095, 65535, (1 << 25) - 1) < 0x8000_0000 + UBLKSRV_IO_BUF_TOTAL_SIZE);
    }

    #[test]
    fn desc_accessors_split_op_and_flags() {
        let d = ublksrv_io_desc {
            op_flags: u32::from(UBLK_IO_OP_WRITE) | UBLK_IO_F_FUA,
            ..Default::default()
        };
        assert_eq!(d.op(), UBLK_IO_OP_WRITE);
        assert_eq!(d.flags(), UBLK_IO_F_FUA >> 8);
    }

    #[test]
    fn plain_structs_round_trip_through_their_c_layout() {
        let info = ublksrv_ctrl_dev_info {
            nr_hw_queues: 2,
            queue_depth: 64,
            state: UBLK_S_DEV_LIVE,
            max_io_buf_bytes: 512 << 10,
            dev_id: 7,
            ublksrv_pid: 1234,
            flags: UBLK_F_USER_RECOVERY | UBLK_F_CMD_IOCTL_ENCODE,
            ..Default::default()
        };
        let b = info.to_bytes();
        assert_eq!(b.len(), 64);
        assert_eq!(&b[0..2], &2u16.to_ne_bytes());
        assert_eq!(&b[8..12], &(512u32 << 10).to_ne_bytes());
        assert_eq!(&b[12..16], &7u32.to_ne_bytes());
        assert_eq!(
            &b[24..32],
            &(UBLK_F_USER_RECOVERY | UBLK_F_CMD_IOCTL_ENCODE).to_ne_bytes()
        );
        assert_eq!(ublksrv_ctrl_dev_info::from_bytes(&b), Some(info));
        assert_eq!(ublksrv_ctrl_dev_info::from_bytes(&b[..63]), None);

        let mut p = ublk_params {
            len: size_of::<ublk_params>() as u32,
            types: UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD,
            ..Default::default()
        };
        p.basic.dev_sectors = 0x0102_0304_0506;
        p.discard.max_discard_segments = 1;
        p.zoned.reserved[19] = 0xaa;
        let b = p.to_bytes();
        assert_eq!(b.len(), 112);
        assert_eq!(&b[0..4], &112u32.to_ne_bytes());
        assert_eq!(&b[8 + 16..8 + 24], &0x0102_0304_0506u64.to_ne_bytes());
        assert_eq!(&b[40 + 16..40 + 18], &1u16.to_ne_bytes());
        assert_eq!(b[107], 0xaa);
        assert!(b[108..].iter().all(|&x| x == 0), "padding is zero");
        assert_eq!(ublk_params::from_bytes(&b), Some(p));
        assert_eq!(ublk_params::from_bytes(&b[..108]), Some(p));
    }

    #[test]
    fn cmd_bytes_is_the_little_endian_c_layout() {
        let c = ublksrv_ctrl_cmd {
            dev_id: 0x0102_0304,
            queue_id: u16::MAX,
            len: 8,
            addr: 0x1122_3344_5566_7788,
            ..Default::default()
        };
        let b = cmd_bytes(&c);
        assert_eq!(&b[0..4], &0x0102_0304u32.to_ne_bytes());
        assert_eq!(&b[4..6], &[0xff, 0xff]);
        assert_eq!(&b[6..8], &8u16.to_ne_bytes());
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_ne_bytes());
        assert!(b[32..].iter().all(|&x| x == 0));
    }
}
