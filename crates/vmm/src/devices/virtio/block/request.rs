//! Turning a descriptor chain into a block request, checking everything the guest supplied.
//!
//! The layout follows virtio 1.x (any layout): device-readable bytes first — the 16-byte
//! header (`type` u32, reserved u32, `sector` u64), then the data of a write — and
//! device-writable bytes after them: the data of a read or GET_ID, and the status byte last.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{InflightRequest, RequestKind, SECTOR_SIZE};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const HEADER_LEN: u64 = 16;

/// What the device does with a chain.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// A well-formed request (sector range still to be checked against the image).
    Request(InflightRequest),
    /// Complete at once with `status` written at `status_addr`.
    Fail {
        head: u16,
        status_addr: u64,
        status: u8,
        why: &'static str,
    },
    /// No usable status byte: the device must be reset by the driver.
    Broken(&'static str),
}

/// Whether `[addr, addr + len)` lies inside one region of guest memory.
pub(crate) fn in_memory(mem: &GuestMemoryMmap, addr: u64, len: u64) -> bool {
    let Ok(n) = usize::try_from(len) else {
        return false;
    };
    n == 0 || mem.get_slice(GuestAddress(addr), n).is_ok()
}

/// Parses the chain popped at `head`. Nothing is written to guest memory here.
pub(crate) fn parse<M>(chain: DescriptorChain<M>, generation: u64) -> Parsed
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let head = chain.head_index();
    let mem: GuestMemoryMmap = chain.memory().clone();
    let mut descs = Vec::new();
    let mut truncated = false;
    for d in chain {
        truncated = d.has_next();
        descs.push((d.addr().0, d.len(), d.is_write_only()));
    }
    // The iterator stops silently on an unreadable descriptor, an index past the table, a
    // bad indirect table or after `queue size` links (a loop): the last one then still says
    // NEXT.
    if descs.is_empty() || truncated {
        return Parsed::Broken("descriptor chain is truncated, loops or has a bad index");
    }
    let &(last_addr, last_len, last_write) = descs.last().expect("chain is not empty");
    let status_addr = match last_addr
        .checked_add(u64::from(last_len))
        .and_then(|e| e.checked_sub(1))
    {
        Some(a) if last_write && last_len > 0 && in_memory(&mem, a, 1) => a,
        _ => return Parsed::Broken("the chain has no writable status byte in guest memory"),
    };
    let fail = |status, why| Parsed::Fail {
        head,
        status_addr,
        status,
        why,
    };
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for (i, &(addr, len, write)) in descs.iter().enumerate() {
        // The status byte is the last byte of the last descriptor.
        let len = if i + 1 == descs.len() { len - 1 } else { len };
        if len == 0 {
            continue;
        }
        if !in_memory(&mem, addr, u64::from(len)) {
            return fail(super::status::IOERR, "a buffer lies outside guest memory");
        }
        if write {
            writable.push((addr, len));
        } else if !writable.is_empty() {
            return fail(
                super::status::IOERR,
                "a readable buffer follows a writable one",
            );
        } else {
            readable.push((addr, len));
        }
    }
    // The header: the first 16 readable bytes, possibly spread over descriptors.
    let mut header = [0u8; HEADER_LEN as usize];
    let mut got = 0usize;
    let mut out_data = Vec::new();
    for &(addr, len) in &readable {
        let take = (HEADER_LEN as usize - got).min(len as usize);
        if take > 0 {
            if mem
                .read_slice(&mut header[got..got + take], GuestAddress(addr))
                .is_err()
            {
                return fail(super::status::IOERR, "cannot read the request header");
            }
            got += take;
        }
        if take < len as usize {
            out_data.push((addr + take as u64, len - take as u32));
        }
    }
    if got < HEADER_LEN as usize {
        return fail(
            super::status::IOERR,
            "request header is shorter than 16 bytes",
        );
    }
    let kind_code = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let (kind, segments) = match kind_code {
        T_IN if out_data.is_empty() => (RequestKind::Read, writable),
        T_OUT if writable.is_empty() => (RequestKind::Write, out_data),
        T_FLUSH if writable.is_empty() && out_data.is_empty() => (RequestKind::Flush, Vec::new()),
        T_GET_ID if out_data.is_empty() => (RequestKind::GetId, writable),
        T_IN | T_OUT | T_FLUSH | T_GET_ID => {
            return fail(super::status::IOERR, "data buffers in the wrong direction")
        }
        _ => return fail(super::status::UNSUPP, "unsupported request type"),
    };
    let total: u64 = segments.iter().map(|&(_, l)| u64::from(l)).sum();
    let Ok(len) = u32::try_from(total) else {
        return fail(super::status::IOERR, "request data exceeds 4 GiB");
    };
    if matches!(kind, RequestKind::Read | RequestKind::Write) && total % SECTOR_SIZE != 0 {
        return fail(super::status::IOERR, "data length is not a multiple of 512");
    }
    Parsed::Request(InflightRequest {
        head,
        kind,
        sector,
        len,
        segments,
        status_addr,
        image_generation: generation,
    })
}

/// Checks a request (popped now, or restored from untrusted saved state) against guest
/// memory and the disk size.
pub(crate) fn validate(
    req: &InflightRequest,
    mem: &GuestMemoryMmap,
    capacity: u64,
) -> Result<(), &'static str> {
    if !in_memory(mem, req.status_addr, 1) {
        return Err("status byte outside guest memory");
    }
    let mut total = 0u64;
    for &(addr, len) in &req.segments {
        if !in_memory(mem, addr, u64::from(len)) {
            return Err("a buffer lies outside guest memory");
        }
        total += u64::from(len);
    }
    if total != u64::from(req.len) {
        return Err("segment lengths do not add up to the request length");
    }
    if matches!(req.kind, RequestKind::Read | RequestKind::Write) {
        let end = req
            .sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|o| o.checked_add(total));
        if end.is_none_or(|e| e > capacity) || total % SECTOR_SIZE != 0 {
            return Err("sector range beyond the end of the disk");
        }
    }
    Ok(())
}

#[cfg(test)]
mod fuzz;
