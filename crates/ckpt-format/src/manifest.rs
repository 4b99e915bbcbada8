//! The manifest: the human-readable JSON description of a checkpoint, and the CBOR helpers for
//! the opaque device-state section.
//!
//! Tolerance: every struct ignores unknown fields on read (serde's default) and every field
//! that is not essential has a default, so a later version can add a field without breaking
//! old readers or old checkpoints. An incompatible change bumps [`FORMAT_VERSION`]; readers
//! refuse a newer one before they try to parse the rest.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::checksum::Checksum;
use crate::error::{Error, Result};
use crate::{FORMAT_NAME, FORMAT_VERSION, PAGE_SIZE};

/// The names of the sections of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Section {
    /// Opaque device state produced by the VMM.
    State,
    /// The page image of guest memory.
    Memory,
    /// Per-page state and hash ([`crate::PageIndex`]).
    PageIndex,
    /// The manifest itself (its checksum lives in the completion marker).
    Manifest,
}

impl Section {
    /// The name used in the manifest and in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Section::State => "state",
            Section::Memory => "memory",
            Section::PageIndex => "page-index",
            Section::Manifest => "manifest",
        }
    }
}

/// Where a section lives and what it hashes to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionEntry {
    /// `state`, `memory`, `page-index` (or `manifest` in a commit record).
    pub name: String,
    /// The file holding the section, for stores made of files (a directory store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Byte offset of the section in its file or device.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Checksum of the whole section; `None` for `memory`, which is checked page by page
    /// against the page index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<Checksum>,
}

/// A checkpoint's manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`] (`"cowvm-checkpoint"`): the magic of the manifest.
    pub format: String,
    /// Major version: a reader refuses a version newer than [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Minor version: additive changes only; any minor of a known major is readable.
    #[serde(default)]
    pub format_minor: u32,
    /// When the checkpoint was taken (the instant T), milliseconds since the Unix epoch.
    #[serde(default)]
    pub created_unix_ms: u64,
    /// The same instant as RFC 3339 UTC text, for people reading the file.
    #[serde(default)]
    pub created_utc: String,
    /// The VM's configuration.
    #[serde(default)]
    pub vm: VmConfig,
    /// How the checkpoint was taken.
    #[serde(default)]
    pub options: CheckpointOptions,
    /// What it cost.
    #[serde(default)]
    pub metrics: Metrics,
    /// Memory geometry.
    pub memory: MemoryInfo,
    /// The sections: `state`, `page-index`, `memory`.
    pub sections: Vec<SectionEntry>,
    /// The checkpoint this one is incremental to: its page index marks the pages the guest
    /// did not write since the parent's instant "in parent". Absent for a full checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
}

/// The parent of an incremental checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent's store address (a directory, `raw:PATH` or `s3://BUCKET/PREFIX`), as the
    /// command line and the API write it.
    pub address: String,
    /// The checksum of the parent's manifest: a different checkpoint later written at the same
    /// address is refused.
    pub manifest_checksum: Checksum,
}

impl Manifest {
    /// The entry of section `section`, if present.
    pub fn section(&self, section: Section) -> Option<&SectionEntry> {
        self.sections.iter().find(|s| s.name == section.name())
    }

    /// Serializes to pretty JSON (the bytes that are checksummed).
    pub fn to_json(&self) -> Result<Vec<u8>> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(Error::ManifestJson)?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// Parses a manifest, checking the magic and refusing newer major versions *before*
    /// parsing the rest, so a future manifest fails with a version error rather than a
    /// confusing field error.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest> {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(default)]
            format: Option<String>,
            #[serde(default)]
            format_version: Option<u32>,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(Error::ManifestJson)?;
        match probe.format.as_deref() {
            Some(FORMAT_NAME) => {}
            other => {
                return Err(Error::BadMagic {
                    what: "manifest",
                    found: other.unwrap_or("<none>").to_string(),
                })
            }
        }
        match probe.format_version {
            Some(v) if v > FORMAT_VERSION => {
                return Err(Error::UnsupportedVersion {
                    what: "checkpoint format",
                    found: v,
                    supported: FORMAT_VERSION,
                })
            }
            Some(0) | None => {
                return Err(Error::corrupt("manifest", "format_version missing or 0"));
            }
            Some(v) if v < FORMAT_VERSION => {
                return Err(Error::OutdatedVersion {
                    what: "checkpoint format",
                    found: v,
                    supported: FORMAT_VERSION,
                })
            }
            Some(_) => {}
        }
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(Error::ManifestJson)?;
        manifest.memory.validate()?;
        Ok(manifest)
    }
}

/// Memory geometry of the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Always 4096.
    pub page_size: u32,
    /// Guest memory size in bytes (a whole number of pages).
    pub mem_size: u64,
    /// `mem_size / page_size`.
    pub pages: u64,
    /// Pages that are zero (not written to the image).
    #[serde(default)]
    pub zero_pages: u64,
    /// The guest's hot set: the first page of each block the guest wrote while the checkpoint
    /// was written out, in the order it wrote them. A lazy restore fetches these first. Empty
    /// (and absent from the file) when unknown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hot_pages: Vec<u64>,
    /// Checksums of the segments of the page index, so a reader can verify the entries of a
    /// few pages without the whole index. Absent from checkpoints of older writers, whose
    /// index is read whole before any page is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_segments: Option<IndexSegments>,
}

/// Checksums of the fixed segments of the encoded page index: for each run of `pages` pages
/// (the last one possibly shorter), xxh3-64 of their state bytes followed by their hashes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexSegments {
    /// Pages per segment (512: 2 MiB of guest memory).
    pub pages: u64,
    /// The checksums in segment order, 16 lowercase hex digits each, concatenated (one line
    /// of 8 KiB per GiB of guest memory rather than an array of thousands of strings).
    pub xxh3: String,
}

impl MemoryInfo {
    pub(crate) fn new(mem_size: u64, zero_pages: u64, hot_pages: Vec<u64>) -> MemoryInfo {
        MemoryInfo {
            page_size: PAGE_SIZE as u32,
            mem_size,
            pages: mem_size / PAGE_SIZE as u64,
            zero_pages,
            hot_pages,
            index_segments: None,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.page_size as usize != PAGE_SIZE {
            return Err(Error::corrupt(
                "manifest",
                format!("page size {} is not {PAGE_SIZE}", self.page_size),
            ));
        }
        if self.mem_size % PAGE_SIZE as u64 != 0 || self.pages != self.mem_size / PAGE_SIZE as u64 {
            return Err(Error::corrupt(
                "manifest",
                format!(
                    "memory of {} bytes does not make {} pages",
                    self.mem_size, self.pages
                ),
            ));
        }
        Ok(())
    }
}

/// The VM configuration recorded in the checkpoint (what a restore recreates).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmConfig {
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Kernel image the VM booted (informational: a restore does not boot).
    pub kernel: Option<PathBuf>,
    /// Kernel command line (informational).
    pub cmdline: Option<String>,
    /// Virtual disks, pointing at the checkpoint's disk images.
    pub disks: Vec<DiskConfig>,
    /// Emulated devices.
    #[serde(deserialize_with = "devices_field")]
    pub devices: Vec<DeviceConfig>,
}

/// One virtual disk of the checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskConfig {
    /// Stable id of the disk in the VM (device order).
    pub id: String,
    /// The disk file that holds the checkpoint's disk content (§2.8): the parent image kept,
    /// or its copy.
    pub path: PathBuf,
    /// Image format.
    #[serde(deserialize_with = "manifest_field")]
    pub format: DiskFormat,
    /// Read-only disk.
    pub readonly: bool,
}

/// Disk image format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Raw image.
    #[default]
    Raw,
    /// qcow2 image (possibly with a backing chain).
    Qcow2,
}

/// One emulated device and where it sits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DeviceConfig {
    /// A 16550 serial console.
    Serial {
        /// First I/O port.
        port: u16,
    },
    /// A virtio-blk device on the virtio-mmio transport.
    VirtioBlk {
        /// Guest-physical base of its register window.
        mmio: u64,
        /// Interrupt line (GSI).
        irq: u32,
        /// Id of its disk in [`VmConfig::disks`].
        disk: String,
    },
}

/// How the checkpoint was taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckpointOptions {
    /// Memory COW mechanism.
    #[serde(deserialize_with = "manifest_field")]
    pub strategy: Strategy,
    /// Policy for disk I/O in flight at T.
    #[serde(deserialize_with = "manifest_field")]
    pub io: IoPolicy,
    /// What happens to the parent disk image.
    #[serde(deserialize_with = "manifest_field")]
    pub disk: DiskPolicy,
}

/// Memory COW mechanism (design.md §2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// userfaultfd write-protection.
    #[default]
    Uffd,
    /// fork: a child process writes its frozen view.
    Fork,
    /// stop-and-copy baseline.
    Stop,
}

/// Disk I/O in flight at T (design.md §3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoPolicy {
    /// Resume at once; in-flight requests recorded and re-issued on restore.
    #[default]
    Live,
    /// Resume after pending requests complete.
    Drain,
}

/// Parent disk image handling (design.md §2, step 8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskPolicy {
    /// Keep the parent as the checkpoint's disk.
    #[default]
    Keep,
    /// Copy the parent for the checkpoint and commit the COW file back into it.
    CopyCommit,
}

/// Per-checkpoint metrics (design.md §6).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Metrics {
    /// How long the vCPUs were stopped.
    pub pause_us: u64,
    /// From the start of the checkpoint until it is durable and marked complete. The manifest
    /// is written before its completion marker, so the copy in the store holds the time up to
    /// the manifest's own writing; the checkpoint's caller gets the full time.
    pub total_us: u64,
    /// The write-out alone: from the resume until memory and state are durable in the store.
    pub write_out_us: u64,
    /// Time the vCPUs spent stalled on copy-on-write faults, summed (`uffd`: from the fault
    /// handler reading a fault to the page being writable). `None` where the VMM cannot see
    /// the stalls (`fork`: the kernel serves its copy-on-write faults).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stall_us: Option<u64>,
    /// The longest single copy-on-write stall (as `stall_us`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_stall_us: Option<u64>,
    /// What the guest lost, estimated: the pause plus the stall time (the pause alone where the
    /// stalls are not measured).
    pub guest_lost_us: u64,
    /// Bytes written to the store: memory pages, state and page index (filled by the writer).
    pub bytes_written: u64,
    /// Pages saved by the COW-fault path.
    pub pages_saved_by_fault: u64,
    /// Pages saved by the background writer.
    pub pages_saved_in_background: u64,
    /// Zero pages, not written (filled by the writer).
    pub zero_pages: u64,
    /// Pages left in the parent checkpoint, not written (filled by the writer).
    pub pages_in_parent: u64,
    /// Duration of each named phase, in microseconds.
    pub phases_us: BTreeMap<String, u64>,
}

/// An option the manifest records, named by its field in error messages.
trait ManifestField: DeserializeOwned {
    /// The field's path in the manifest.
    const FIELD: &'static str;
}

impl ManifestField for Strategy {
    const FIELD: &'static str = "options.strategy";
}

impl ManifestField for IoPolicy {
    const FIELD: &'static str = "options.io";
}

impl ManifestField for DiskPolicy {
    const FIELD: &'static str = "options.disk";
}

impl ManifestField for DiskFormat {
    const FIELD: &'static str = "vm.disks[].format";
}

fn in_field<E: serde::de::Error>(field: &str, e: impl Display) -> E {
    E::custom(format_args!("manifest field {field}: {e}"))
}

/// Reads an option, so that an unknown value is an error naming the value and the field.
fn manifest_field<'de, D: Deserializer<'de>, T: ManifestField>(d: D) -> Result<T, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    T::deserialize(value).map_err(|e| in_field(T::FIELD, e))
}

/// Reads the device list, so that an unknown device kind names the field.
fn devices_field<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<DeviceConfig>, D::Error> {
    const KINDS: [&str; 2] = ["serial", "virtio-blk"];
    Vec::<serde_json::Value>::deserialize(d)?
        .into_iter()
        .map(|value| {
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .map(str::to_owned);
            DeviceConfig::deserialize(value).map_err(|e| match kind {
                Some(kind) if !KINDS.contains(&kind.as_str()) => {
                    in_field("vm.devices", format_args!("unknown device kind {kind:?}"))
                }
                _ => in_field("vm.devices", e),
            })
        })
        .collect()
}

/// Encodes device state for the `state` section as CBOR.
///
/// Why CBOR (via `ciborium`): like JSON it is self-describing — field names are in the data — so
/// `#[serde(default)]` on a newly added field keeps old checkpoints readable, and unknown fields
/// are skipped; unlike JSON it is binary, so register files and byte arrays (XSAVE, LAPIC pages)
/// stay compact and parse fast. (Tip for the VMM: mark large `Vec<u8>` fields
/// `#[serde(with = "serde_bytes")]` to store them as one byte string.)
pub fn encode_state<T: Serialize + ?Sized>(state: &T) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    ciborium::into_writer(state, &mut out).map_err(Error::StateEncode)?;
    Ok(out)
}

/// Decodes device state written by [`encode_state`].
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    ciborium::from_reader(bytes).map_err(Error::StateDecode)
}

/// Current time as (ms since epoch, RFC 3339 UTC text).
pub(crate) fn now() -> (u64, String) {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
    (ms, rfc3339_utc(ms))
}

/// Formats milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub(crate) fn rfc3339_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_utc(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn state_round_trip_tolerates_added_fields() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct V1 {
            a: u32,
            regs: Vec<u8>,
        }
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct V2 {
            a: u32,
            regs: Vec<u8>,
            #[serde(default)]
            added: Option<String>,
        }
        let v1 = V1 {
            a: 7,
            regs: vec![1, 2, 200],
        };
        let bytes = encode_state(&v1).unwrap();
        let v2: V2 = decode_state(&bytes).unwrap();
        assert_eq!(
            (v2.a, v2.regs.as_slice(), v2.added.as_deref()),
            (7, &[1u8, 2, 200][..], None)
        );
        let back: V1 = decode_state(&encode_state(&v2).unwrap()).unwrap();
        assert_eq!(back, v1);
        assert!(matches!(
            decode_state::<V1>(&[0xff, 0x00]),
            Err(Error::StateDecode(_))
        ));
    }

    #[test]
    fn unknown_option_values_are_refused_and_unknown_fields_tolerated() {
        let e =
            serde_json::from_str::<CheckpointOptions>(r#"{"strategy":"teleport","io":"drain"}"#)
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("options.strategy") && e.contains("teleport"),
            "{e}"
        );
        let opts: CheckpointOptions = serde_json::from_str(r#"{"io":"drain","new":1}"#).unwrap();
        assert_eq!(opts.io, IoPolicy::Drain);
        assert_eq!(opts.disk, DiskPolicy::Keep);
        let opts: CheckpointOptions = serde_json::from_str(r#"{"disk":"copy-commit"}"#).unwrap();
        assert_eq!(opts.disk, DiskPolicy::CopyCommit);
    }
}
