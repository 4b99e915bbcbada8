//! Command line: `<workload> [key=value]...`, whitespace-separated.

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
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong { limit } => write!(f, "longer than {limit} bytes"),
            Self::NotUtf8 => write!(f, "not UTF-8"),
            Self::NoWorkload => write!(f, "no workload named (hello, dirty, compute)"),
            Self::UnknownWorkload(name) => {
                write!(f, "unknown workload `{name}` (hello, dirty, compute)")
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
        }
    }
}

/// The `key=value` words after the workload name.
pub struct Options<'a> {
    words: SplitAsciiWhitespace<'a>,
}

impl<'a> Options<'a> {
    pub fn new(words: SplitAsciiWhitespace<'a>) -> Self {
        Self { words }
    }
}

impl<'a> Iterator for Options<'a> {
    type Item = Result<(&'a str, &'a str), CmdlineError<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let word = self.words.next()?;
        Some(word.split_once('=').ok_or(CmdlineError::NotKeyValue(word)))
    }
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
    if text.is_empty() {
        return None;
    }
    text.bytes().try_fold(0u64, |number, byte| {
        let digit = char::from(byte).to_digit(10)?;
        number.checked_mul(10)?.checked_add(u64::from(digit))
    })
}
