//! The PRNG and the mutations applied to seed inputs.

/// splitmix64: small, seeded, reproducible.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Values at the edges of integer ranges, where parsers go wrong.
const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    7,
    8,
    0x10,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x1000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// Derives new inputs from the corpus: one to eight stacked mutations of one seed.
pub(crate) struct Mutator {
    rng: Rng,
    /// Inputs grow to at most this many bytes.
    max_len: usize,
}

impl Mutator {
    pub(crate) fn new(rng: Rng, corpus: &[Vec<u8>]) -> Mutator {
        let largest = corpus.iter().map(Vec::len).max().unwrap_or(0);
        Mutator {
            rng,
            max_len: largest * 2 + 4096,
        }
    }

    pub(crate) fn next_input(&mut self, corpus: &[Vec<u8>], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&corpus[self.rng.below(corpus.len())]);
        let count = 1 << self.rng.below(4);
        for _ in 0..count {
            self.mutate(corpus, out);
        }
        out.truncate(self.max_len);
    }

    fn mutate(&mut self, corpus: &[Vec<u8>], data: &mut Vec<u8>) {
        let rng = &mut self.rng;
        if data.is_empty() {
            let n = 1 + rng.below(64);
            data.extend((0..n).map(|_| rng.next_u64() as u8));
            return;
        }
        let at = rng.below(data.len());
        match rng.below(9) {
            0 => data[at] ^= 1 << rng.below(8),
            1 => data[at] = INTERESTING[rng.below(INTERESTING.len())] as u8,
            2 => data[at] = rng.next_u64() as u8,
            3 => {
                // An integer field: a boundary value, or the old one nudged, in either order.
                let width = [2, 4, 8][rng.below(3)];
                if at + width > data.len() {
                    return;
                }
                let field = &mut data[at..at + width];
                let big_endian = rng.chance(2);
                let mut bytes = [0u8; 8];
                let old = if big_endian {
                    bytes[8 - width..].copy_from_slice(field);
                    u64::from_be_bytes(bytes)
                } else {
                    bytes[..width].copy_from_slice(field);
                    u64::from_le_bytes(bytes)
                };
                let new = if rng.chance(2) {
                    INTERESTING[rng.below(INTERESTING.len())]
                } else {
                    let delta = 1 + rng.below(32) as u64;
                    if rng.chance(2) {
                        old.wrapping_add(delta)
                    } else {
                        old.wrapping_sub(delta)
                    }
                };
                if big_endian {
                    field.copy_from_slice(&new.to_be_bytes()[8 - width..]);
                } else {
                    field.copy_from_slice(&new.to_le_bytes()[..width]);
                }
            }
            4 => {
                // Splice: a piece of another seed over or into this input.
                let other = &corpus[rng.below(corpus.len())];
                if other.is_empty() {
                    return;
                }
                let from = rng.below(other.len());
                let len = 1 + rng.below((other.len() - from).min(256));
                let piece = &other[from..from + len];
                if rng.chance(2) {
                    let end = (at + len).min(data.len());
                    data[at..end].copy_from_slice(&piece[..end - at]);
                } else {
                    data.splice(at..at, piece.iter().copied());
                }
            }
            5 => data.truncate(at),
            6 => {
                let n = 1 + rng.below(32);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(at..at, bytes);
            }
            7 => {
                let len = 1 + rng.below((data.len() - at).min(64));
                data.drain(at..at + len);
            }
            _ => {
                // Repeat a chunk of the input, as a table pointing at itself would.
                let len = 1 + rng.below((data.len() - at).min(64));
                let chunk = data[at..at + len].to_vec();
                let to = rng.below(data.len());
                data.splice(to..to, chunk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_bounded_and_differ() {
        let corpus = vec![vec![0u8; 100], b"hello world".to_vec()];
        let mut m = Mutator::new(Rng::new(7), &corpus);
        let mut out = Vec::new();
        let mut changed = 0;
        for _ in 0..10_000 {
            m.next_input(&corpus, &mut out);
            assert!(out.len() <= 200 + 4096);
            changed += usize::from(!corpus.contains(&out));
        }
        assert!(changed > 9_000, "{changed}");
    }

    #[test]
    fn same_seed_same_inputs() {
        let corpus = vec![b"seed input".to_vec()];
        let run = |seed| {
            let mut m = Mutator::new(Rng::new(seed), &corpus);
            let mut out = Vec::new();
            (0..100)
                .map(|_| {
                    m.next_input(&corpus, &mut out);
                    out.clone()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }
}
