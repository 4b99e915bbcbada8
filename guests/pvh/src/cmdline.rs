//! Command line: `<workload> [key=value]...`, whitespace-separated, plus any number of
//! `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` tokens anywhere (recorded, never options).

use core::fmt;
use core::str::SplitAsciiWhitespace;

/// Everything that makes the guest exit with status 2.
pub enum CmdlineError<'a> {
    TooLong {
        limit: usize,
    },
    NotUtf8,
    NoWorkload,
    UnknownWorkload(&'a str),
    NotKeyValue(&'a str),
    UnknownOption {
        workload: &'static str,
        key: &'a str,
    },
    BadValue {
        key: &'a str,
        value: &'a str,
        expected: &'static str,
    },
    NotInRam {
        start: u64,
        bytes: u64,
    },
    BadVirtioMmio(&'a str),
    TooManyVirtioMmio,
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong { limit } => write!(f, "longer than {limit} bytes"),
            Self::NotUtf8 => write!(f, "not UTF-8"),
            Self::NoWorkload => write!(f, "no workload named ({WORKLOADS})"),
            Self::UnknownWorkload(name) => {
                write!(f, "unknown workload `{name}` ({WORKLOADS})")
            }
            Self::NotKeyValue(word) => write!(f, "`{word}` is not key=value"),
            Self::UnknownOption { workload, key } => {
                write!(f, "{workload} has no option `{key}`")
            }
            Self::BadValue {
                key,
                value,
                expected,
            } => write!(f, "{key}={value}: expected {expected}"),
            Self::NotInRam { start, bytes } => write!(
                f,
                "working set of {bytes} bytes at {start:#x} is not all RAM in the memory map"
            ),
            Self::BadVirtioMmio(word) => write!(
                f,
                "`{word}`: expected {VIRTIO_MMIO_KEY}=<size>@<base>:<irq>[:<id>] \
                 (e.g. {VIRTIO_MMIO_KEY}=4K@0xd0000000:5)"
            ),
            Self::TooManyVirtioMmio => write!(
                f,
                "more than {MAX_VIRTIO_MMIO_DEVICES} {VIRTIO_MMIO_KEY} tokens"
            ),
        }
    }
}

/// The workload names, for error messages.
const WORKLOADS: &str = "hello, dirty, compute, fault, disk";
/// Tokens the VMM appends to describe virtio-mmio transports (Linux's syntax). They are accepted
/// anywhere on the command line, by every workload.
const VIRTIO_MMIO_KEY: &str = "virtio_mmio.device";
/// At most this many `virtio_mmio.device=` tokens are recorded; more is an error.
pub const MAX_VIRTIO_MMIO_DEVICES: usize = 16;

/// A parsed command line: the workload name, its options and the virtio-mmio transports.
pub struct Cmdline<'a> {
    pub workload: &'a str,
    pub options: Options<'a>,
    pub virtio_mmio: VirtioMmioDevices,
}

impl<'a> Cmdline<'a> {
    /// Splits the command line and parses every `virtio_mmio.device=` token (a malformed one is
    /// an error whatever the workload).
    pub fn parse(cmdline: &'a str) -> Result<Self, CmdlineError<'a>> {
        let mut virtio_mmio = VirtioMmioDevices {
            devices: [VirtioMmioDevice::default(); MAX_VIRTIO_MMIO_DEVICES],
            len: 0,
        };
        for word in cmdline.split_ascii_whitespace() {
            if let Some(value) = virtio_mmio_value(word) {
                let device =
                    VirtioMmioDevice::parse(value).ok_or(CmdlineError::BadVirtioMmio(word))?;
                let slot = virtio_mmio
                    .devices
                    .get_mut(virtio_mmio.len)
                    .ok_or(CmdlineError::TooManyVirtioMmio)?;
                *slot = device;
                virtio_mmio.len += 1;
            }
        }
        let mut options = Options {
            words: cmdline.split_ascii_whitespace(),
        };
        let workload = options.next_word().ok_or(CmdlineError::NoWorkload)?;
        Ok(Self {
            workload,
            options,
            virtio_mmio,
        })
    }
}

/// The value of a `virtio_mmio.device=` token.
fn virtio_mmio_value(word: &str) -> Option<&str> {
    word.strip_prefix(VIRTIO_MMIO_KEY)?.strip_prefix('=')
}

/// One `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` token.
#[derive(Clone, Copy, Default)]
pub struct VirtioMmioDevice {
    pub size: u64,
    pub base: u64,
    pub irq: u32,
}

impl VirtioMmioDevice {
    /// Linux's syntax (drivers/virtio/virtio_mmio.c): size and base as `memparse` reads them
    /// (decimal, 0x-hex, or octal with a leading 0, then an optional K/M/G suffix), a decimal
    /// IRQ and an optional platform-device id, which is ignored.
    fn parse(value: &str) -> Option<Self> {
        let (size, rest) = value.split_once('@')?;
        let (base, rest) = rest.split_once(':')?;
        let irq = match rest.split_once(':') {
            Some((irq, id)) => {
                decimal(id)?;
                irq
            }
            None => rest,
        };
        Some(Self {
            size: memparse(size).filter(|&size| size > 0)?,
            base: memparse(base)?,
            irq: u32::try_from(decimal(irq)?).ok()?,
        })
    }
}

/// The `virtio_mmio.device=` tokens in command-line order.
pub struct VirtioMmioDevices {
    devices: [VirtioMmioDevice; MAX_VIRTIO_MMIO_DEVICES],
    len: usize,
}

impl VirtioMmioDevices {
    pub fn as_slice(&self) -> &[VirtioMmioDevice] {
        &self.devices[..self.len]
    }
}

/// The `key=value` words after the workload name (`virtio_mmio.device=` tokens left out).
pub struct Options<'a> {
    words: SplitAsciiWhitespace<'a>,
}

impl<'a> Options<'a> {
    fn next_word(&mut self) -> Option<&'a str> {
        self.words
            .by_ref()
            .find(|word| virtio_mmio_value(word).is_none())
    }
}

impl<'a> Iterator for Options<'a> {
    type Item = Result<(&'a str, &'a str), CmdlineError<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let word = self.next_word()?;
        Some(word.split_once('=').ok_or(CmdlineError::NotKeyValue(word)))
    }
}

/// A number as Linux's `memparse` reads it: decimal, `0x` hex or `0` octal, then an optional
/// K, M, G (or T) suffix.
fn memparse(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        b'T' | b't' => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    let number = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        radix(hex, 16)?
    } else if digits.len() > 1 && digits.starts_with('0') {
        radix(&digits[1..], 8)?
    } else {
        decimal(digits)?
    };
    number.checked_mul(1 << shift)
}

/// A decimal number.
pub fn parse_u64<'a>(key: &'a str, value: &'a str) -> Result<u64, CmdlineError<'a>> {
    decimal(value).ok_or(CmdlineError::BadValue {
        key,
        value,
        expected: "a decimal number",
    })
}

/// A decimal number greater than zero.
pub fn parse_nonzero<'a>(key: &'a str, value: &'a str) -> Result<u64, CmdlineError<'a>> {
    decimal(value)
        .filter(|&number| number > 0)
        .ok_or(CmdlineError::BadValue {
            key,
            value,
            expected: "a decimal number above 0",
        })
}

/// `0` or `1`.
pub fn parse_flag<'a>(key: &'a str, value: &'a str) -> Result<bool, CmdlineError<'a>> {
    match value {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(CmdlineError::BadValue {
            key,
            value,
            expected: "0 or 1",
        }),
    }
}

/// A memory size: bytes, or a number with a K, M or G suffix (powers of 1024), a non-zero
/// multiple of 4 KiB.
pub fn parse_mem_size<'a>(key: &'a str, value: &'a str) -> Result<u64, CmdlineError<'a>> {
    let (digits, shift) = match value.as_bytes().last() {
        Some(b'K' | b'k') => (&value[..value.len() - 1], 10),
        Some(b'M' | b'm') => (&value[..value.len() - 1], 20),
        Some(b'G' | b'g') => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    decimal(digits)
        .and_then(|number| number.checked_mul(1 << shift))
        .filter(|&bytes| bytes > 0 && bytes % 4096 == 0)
        .ok_or(CmdlineError::BadValue {
            key,
            value,
            expected: "a non-zero multiple of 4K (e.g. 4096, 64M, 1G)",
        })
}

fn decimal(text: &str) -> Option<u64> {
    radix(text, 10)
}

fn radix(text: &str, radix: u32) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.bytes().try_fold(0u64, |number, byte| {
        let digit = char::from(byte).to_digit(radix)?;
        number
            .checked_mul(u64::from(radix))?
            .checked_add(u64::from(digit))
    })
}
