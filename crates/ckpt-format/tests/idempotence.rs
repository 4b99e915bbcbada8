//! Property: write → read → write again gives identical manifests and sections (timestamps
//! aside), for arbitrary memory contents, state and metrics.

use ckpt_format::{
    Checkpoint, CheckpointWriter, DirStore, Layout, Manifest, MemStore, Metrics, Store, PAGE_SIZE,
};
use proptest::prelude::*;

/// Copies a checkpoint into `store` through the public API only.
fn rewrite(from: &Checkpoint, store: &dyn Store) -> Manifest {
    let m = from.manifest();
    let mut w = CheckpointWriter::create(
        store,
        &Layout {
            mem_size: m.memory.mem_size,
        },
    )
    .unwrap();
    // Backwards, to differ from the original order.
    let mut buf = [0u8; PAGE_SIZE];
    for i in (0..from.pages()).rev() {
        from.read_page(i, &mut buf).unwrap();
        from.verify_page(i, &buf).unwrap();
        w.memory().write_page(i, &buf).unwrap();
    }
    w.write_state(from.state_bytes()).unwrap();
    w.set_vm_config(m.vm.clone());
    w.set_options(m.options);
    w.set_metrics(m.metrics.clone());
    w.set_created_unix_ms(m.created_unix_ms);
    w.finish().unwrap()
}

fn sections(c: &Checkpoint) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut mem = vec![0u8; (c.pages() as usize) * PAGE_SIZE];
    c.read_pages(0, &mut mem).unwrap();
    (
        c.state_bytes().to_vec(),
        c.page_index().unwrap().encode(),
        mem,
    )
}

/// A page is zero, or filled from a seed with a pattern.
fn page_strategy() -> impl Strategy<Value = Option<(u8, u16)>> {
    prop_oneof![Just(None), (1u8.., any::<u16>()).prop_map(Some)]
}

fn make_page(p: Option<(u8, u16)>) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    if let Some((fill, at)) = p {
        page.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = fill.wrapping_add((i / 64) as u8));
        page[at as usize % PAGE_SIZE] ^= 0x5a;
    }
    page
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn write_read_write_is_identical(
        pages in proptest::collection::vec(page_strategy(), 1..40),
        state in proptest::collection::vec(any::<u8>(), 0..3000),
        pause_us in any::<u64>(),
        phases in proptest::collection::btree_map("[a-z-]{1,12}", any::<u64>(), 0..4),
        raw in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b): (Box<dyn Store>, Box<dyn Store>) = if raw {
            (Box::new(MemStore::new().unwrap()), Box::new(MemStore::new().unwrap()))
        } else {
            (Box::new(DirStore::new(tmp.path().join("a"))), Box::new(DirStore::new(tmp.path().join("b"))))
        };
        let mem_size = (pages.len() * PAGE_SIZE) as u64;
        let mut w = CheckpointWriter::create(a.as_ref(), &Layout { mem_size }).unwrap();
        for (i, p) in pages.iter().enumerate() {
            w.memory().write_page(i as u64, &make_page(*p)).unwrap();
        }
        w.write_state(&state).unwrap();
        w.set_metrics(Metrics { pause_us, phases_us: phases, ..Default::default() });
        let first = w.finish().unwrap();

        let ca = Checkpoint::open(a.as_ref()).unwrap();
        prop_assert_eq!(ca.manifest(), &first);
        prop_assert_eq!(ca.state_bytes(), state.as_slice());
        let second = rewrite(&ca, b.as_ref());
        let cb = Checkpoint::open(b.as_ref()).unwrap();
        prop_assert_eq!(&second, &first);
        prop_assert_eq!(cb.manifest_checksum(), ca.manifest_checksum());
        prop_assert_eq!(sections(&cb), sections(&ca));
        prop_assert_eq!(ca.page_index().unwrap().zero_pages(), pages.iter().filter(|p| p.is_none()).count() as u64);
        cb.verify_memory(2, &|_| {}).unwrap();
    }
}
