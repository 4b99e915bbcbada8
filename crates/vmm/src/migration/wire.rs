//! The migration stream: a preamble (magic and version), then frames.
//!
//! A frame is `kind` (1 byte), `len` (u32, little endian), `len` bytes of payload, and the
//! xxh3-64 of the kind, length and payload (u64): every byte on the wire, pages included, is
//! checked before it is used. A stream that does not start with the magic, that speaks a
//! newer version, or whose frame does not verify is refused before anything runs.

use std::io::{self, Read, Write};

use thiserror::Error;
use xxhash_rust::xxh3::Xxh3;

use crate::memory::PAGE_SIZE;

/// The first bytes of every migration stream.
pub(crate) const MAGIC: [u8; 8] = *b"COWVMMIG";
/// The version of the stream this build speaks (2: `Sync`, `Synced`, `Discard`; the times
/// that `Ready` and `Running` measure; 3: `Populated`).
pub(crate) const VERSION: u32 = 3;
/// The first version whose source sends `Populated` after the hello.
pub(crate) const POPULATED_SINCE: u32 = 3;
/// The largest payload a frame may carry: a block of pages with its kinds, a switchover
/// (device state and the bitmap of the pages the destination lacks) or a chunk of a disk layer,
/// with room to spare.
const MAX_FRAME: u32 = 64 << 20;

/// Page kinds in a pages frame.
pub(crate) const UNCHANGED: u8 = 0;
pub(crate) const ZERO: u8 = 1;
pub(crate) const DATA: u8 = 2;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source → destination: the VM's shape (JSON).
    Hello = 1,
    /// Pages: pre-copied, pushed, or the answer to a request.
    Pages = 2,
    /// Source → destination, in the pause: device state, disks, the pages still lacking.
    Switchover = 3,
    /// Source → destination: run the VM (the source never will again).
    Go = 4,
    /// Either way: the migration is abandoned (UTF-8 reason).
    Abort = 5,
    /// Source → destination, with copied disks: a layer of a disk's chain begins (JSON: disk,
    /// layer from the bottom, format, length).
    DiskLayer = 6,
    /// Source → destination: bytes of the layer begun last (disk and layer, u32 each; offset,
    /// u64; at most 4 MiB of data).
    DiskData = 7,
    /// Source → destination, before the pause: answer once every frame before this one is in
    /// place.
    Sync = 8,
    /// Source → destination, before the pause (hybrid): a bitmap of the pages the guest wrote
    /// since they were sent; they come again after the hand-over, so the destination drops
    /// what it holds of them now rather than in the pause.
    Discard = 9,
    /// Source → destination, right after the hello: a bitmap of the pages the guest has
    /// populated (the pages to come). The destination maps memory for them before it says it
    /// is prepared, so that no page fault of its own slows a pre-copy round or a post-copy
    /// install.
    Populated = 10,
    /// Destination → source: memory and the KVM VM are ready for pages.
    Prepared = 16,
    /// Destination → source: the VM is built and waits for `Go`.
    Ready = 17,
    /// Destination → source: a block of pages a fault or the prefetcher needs.
    Request = 18,
    /// Destination → source: the vCPUs run (u64: the microseconds since `Ready` was sent).
    Running = 19,
    /// Destination → source: every page is in place; the source may end.
    Resident = 20,
    /// Destination → source: every frame before `Sync` is in place.
    Synced = 21,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Pages,
            3 => Kind::Switchover,
            4 => Kind::Go,
            5 => Kind::Abort,
            6 => Kind::DiskLayer,
            7 => Kind::DiskData,
            8 => Kind::Sync,
            9 => Kind::Discard,
            10 => Kind::Populated,
            16 => Kind::Prepared,
            17 => Kind::Ready,
            18 => Kind::Request,
            19 => Kind::Running,
            20 => Kind::Resident,
            21 => Kind::Synced,
            _ => return None,
        })
    }
}

/// Errors of the migration stream.
#[derive(Debug, Error)]
pub enum WireError {
    /// Reading or writing the connection failed.
    #[error("connection failed")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// The stream does not start with cowvm's magic.
    #[error("not a cowvm migration stream")]
    NotMigration,
    /// The stream starts with a TLS handshake, and this end speaks plain TCP.
    #[error(
        "the source speaks TLS, but this receiver serves plain TCP (start it with --tls-cert \
         and --tls-key)"
    )]
    TlsPeer,
    /// The stream speaks a newer version.
    #[error("the migration stream is version {theirs}, newer than this cowvm's version {VERSION}")]
    Newer {
        /// The peer's version.
        theirs: u32,
    },
    /// A frame claims more bytes than any frame may hold.
    #[error("a frame of {0} bytes exceeds the limit of {MAX_FRAME}: the stream is corrupt")]
    TooLarge(u32),
    /// A frame does not match its checksum.
    #[error("a frame does not match its checksum: the stream is corrupt")]
    Checksum,
    /// A frame of an unknown kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame that does not belong at this point of the protocol.
    #[error("unexpected {got:?} frame (expected {expected})")]
    Unexpected {
        /// What came.
        got: Kind,
        /// What was expected.
        expected: &'static str,
    },
    /// A frame whose payload does not decode.
    #[error("malformed {kind:?} frame: {why}")]
    Malformed {
        /// The frame.
        kind: Kind,
        /// What is wrong.
        why: String,
    },
    /// The peer abandoned the migration.
    #[error("the peer abandoned the migration: {0}")]
    Aborted(String),
}

impl WireError {
    pub(crate) fn malformed(kind: Kind, why: impl Into<String>) -> WireError {
        WireError::Malformed {
            kind,
            why: why.into(),
        }
    }
}

/// Writes the preamble.
pub(crate) fn write_preamble(w: &mut impl Write) -> io::Result<()> {
    w.write_all(&MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())
}

/// Reads and checks the preamble; returns the peer's version (this one's or older).
pub(crate) fn read_preamble(r: &mut impl Read) -> Result<u32, WireError> {
    let mut buf = [0u8; 12];
    read_exact(r, &mut buf)?;
    if buf[..8] != MAGIC {
        // A TLS handshake record: content type 22, protocol version 3.x.
        if buf[..2] == [0x16, 0x03] {
            return Err(WireError::TlsPeer);
        }
        return Err(WireError::NotMigration);
    }
    let theirs = u32::from_le_bytes(buf[8..].try_into().expect("4 bytes"));
    if theirs > VERSION {
        return Err(WireError::Newer { theirs });
    }
    Ok(theirs)
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), WireError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => WireError::Closed,
        _ => WireError::Io(e),
    })
}

/// Writes one frame whose payload is the concatenation of `parts`.
pub(crate) fn write_frame(w: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or_else(|| io::Error::other("frame too large"))?;
    let mut header = [0u8; 5];
    header[0] = kind as u8;
    header[1..].copy_from_slice(&len.to_le_bytes());
    let mut hash = Xxh3::new();
    hash.update(&header);
    w.write_all(&header)?;
    for p in parts {
        hash.update(p);
        w.write_all(p)?;
    }
    w.write_all(&hash.digest().to_le_bytes())
}

/// Reads one frame, verified.
pub(crate) fn read_frame(r: &mut impl Read) -> Result<(Kind, Vec<u8>), WireError> {
    let mut payload = Vec::new();
    let kind = read_frame_into(r, &mut payload)?;
    Ok((kind, payload))
}

/// Reads one frame, verified, its payload into `payload` (whose memory is reused: a stream of
/// large frames is read without clearing a new buffer for each).
pub(crate) fn read_frame_into(r: &mut impl Read, payload: &mut Vec<u8>) -> Result<Kind, WireError> {
    let mut header = [0u8; 5];
    read_exact(r, &mut header)?;
    let len = u32::from_le_bytes(header[1..].try_into().expect("4 bytes"));
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    payload.resize(len as usize, 0);
    read_exact(r, payload)?;
    let mut sum = [0u8; 8];
    read_exact(r, &mut sum)?;
    let mut hash = Xxh3::new();
    hash.update(&header);
    hash.update(payload);
    if hash.digest() != u64::from_le_bytes(sum) {
        return Err(WireError::Checksum);
    }
    let kind = Kind::from_u8(header[0]).ok_or(WireError::UnknownKind(header[0]))?;
    if kind == Kind::Abort {
        return Err(WireError::Aborted(
            String::from_utf8_lossy(payload).into_owned(),
        ));
    }
    Ok(kind)
}

/// Reads one frame that must be of kind `want`.
pub(crate) fn expect_frame(
    r: &mut impl Read,
    want: Kind,
    expected: &'static str,
) -> Result<Vec<u8>, WireError> {
    match read_frame(r)? {
        (kind, payload) if kind == want => Ok(payload),
        (got, _) => Err(WireError::Unexpected { got, expected }),
    }
}

/// The header of a pages frame: first page, page count, one kind byte per page; the data of
/// the pages of kind [`DATA`] follows, in order.
pub(crate) fn pages_header(first: u64, kinds: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + kinds.len());
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&(kinds.len() as u32).to_le_bytes());
    out.extend_from_slice(kinds);
    out
}

/// A decoded pages frame.
pub(crate) struct Pages<'a> {
    pub first: u64,
    pub kinds: &'a [u8],
    pub data: &'a [u8],
}

impl Pages<'_> {
    /// The pages, in order: (page, kind, data of a [`DATA`] page).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u8, Option<&[u8]>)> + '_ {
        let mut data = self.data.chunks_exact(PAGE_SIZE as usize);
        self.kinds.iter().enumerate().map(move |(i, &k)| {
            let bytes = if k == DATA { data.next() } else { None };
            (self.first + i as u64, k, bytes)
        })
    }
}

/// Decodes a pages frame, checking it against a memory of `pages` pages.
pub(crate) fn decode_pages(payload: &[u8], pages: u64) -> Result<Pages<'_>, WireError> {
    let bad = |why: &str| WireError::malformed(Kind::Pages, why);
    if payload.len() < 12 {
        return Err(bad("shorter than its header"));
    }
    let first = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(payload[8..12].try_into().expect("4 bytes")) as usize;
    let kinds = payload
        .get(12..12 + count)
        .ok_or_else(|| bad("shorter than its page kinds"))?;
    if first
        .checked_add(count as u64)
        .is_none_or(|end| end > pages)
    {
        return Err(bad("pages beyond the end of guest memory"));
    }
    if kinds.iter().any(|&k| k > DATA) {
        return Err(bad("unknown page kind"));
    }
    let data_pages = kinds.iter().filter(|&&k| k == DATA).count();
    let data = &payload[12 + count..];
    if data.len() != data_pages * PAGE_SIZE as usize {
        return Err(bad("data length does not match its page kinds"));
    }
    Ok(Pages { first, kinds, data })
}

/// A request for pages `first..end`.
pub(crate) fn request(first: u64, end: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&first.to_le_bytes());
    out[8..].copy_from_slice(&end.to_le_bytes());
    out
}

/// Decodes a request, checking it against a memory of `pages` pages.
pub(crate) fn decode_request(payload: &[u8], pages: u64) -> Result<(u64, u64), WireError> {
    let bad = || WireError::malformed(Kind::Request, "not a page range of guest memory");
    if payload.len() != 16 {
        return Err(bad());
    }
    let first = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
    let end = u64::from_le_bytes(payload[8..].try_into().expect("8 bytes"));
    if first >= end || end > pages || end - first > 1 << 20 {
        return Err(bad());
    }
    Ok((first, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let mut buf = Vec::new();
        write_preamble(&mut buf).unwrap();
        write_frame(&mut buf, Kind::Hello, &[b"{\"a\":", b"1}"]).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_preamble(&mut r).unwrap(), VERSION);
        let (kind, payload) = read_frame(&mut r).unwrap();
        assert_eq!(kind, Kind::Hello);
        assert_eq!(payload, b"{\"a\":1}");
        assert!(matches!(read_frame(&mut r), Err(WireError::Closed)));

        let mut bad = buf.clone();
        bad[12 + 6] ^= 1;
        let mut r = &bad[..];
        read_preamble(&mut r).unwrap();
        assert!(matches!(read_frame(&mut r), Err(WireError::Checksum)));

        let mut newer = buf.clone();
        newer[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        assert!(matches!(
            read_preamble(&mut &newer[..]),
            Err(WireError::Newer { theirs }) if theirs == VERSION + 1
        ));
        assert!(matches!(
            read_preamble(&mut &b"GET / HTTP/1.1\r\n"[..]),
            Err(WireError::NotMigration)
        ));
        assert!(matches!(
            read_preamble(&mut &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00"[..]),
            Err(WireError::TlsPeer)
        ));
    }

    #[test]
    fn pages_frames_are_checked() {
        let kinds = [DATA, ZERO, UNCHANGED];
        let mut payload = pages_header(5, &kinds);
        payload.extend_from_slice(&[7u8; 4096]);
        let pages = decode_pages(&payload, 8).unwrap();
        let got: Vec<_> = pages
            .iter()
            .map(|(p, k, d)| (p, k, d.map(|d| d[0])))
            .collect();
        assert_eq!(
            got,
            vec![(5, DATA, Some(7)), (6, ZERO, None), (7, UNCHANGED, None)]
        );
        assert!(decode_pages(&payload, 7).is_err());
        assert!(decode_pages(&payload[..payload.len() - 1], 8).is_err());
        let mut unknown = payload.clone();
        unknown[13] = 9;
        assert!(decode_pages(&unknown, 8).is_err());
        assert!(decode_request(&request(3, 2), 8).is_err());
        assert_eq!(decode_request(&request(2, 3), 8).unwrap(), (2, 3));
    }
}
