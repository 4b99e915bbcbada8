//! Fuzzing the API bodies: `PUT /checkpoints`, `PUT /rollback` and `PATCH /vm` bodies go
//! through the parser and the store-address check the server uses (see the `fuzzkit` crate for
//! the knobs: `COWVM_FUZZ_SECS=3600 cargo test --release -p cowvm fuzz_api_bodies`).
//!
//! The first byte of an input picks the body type, the rest is the body. An `Err` is fine
//! (whatever it is, it must make a 4xx answer); a panic or a hang is a bug.

use super::{parse_json, store_address};
use crate::api::model::{CheckpointBody, RollbackBody, VmPatch};

fn check_client_error(e: &super::ApiError) {
    assert!(e.status.is_client_error(), "{:?}", e.status);
}

fn body(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => match parse_json::<CheckpointBody>(body) {
            Ok(b) => {
                let _ = b.options();
                if let Err(e) = store_address(&b.out, "out") {
                    check_client_error(&e);
                }
            }
            Err(e) => check_client_error(&e),
        },
        1 => match parse_json::<RollbackBody>(body) {
            Ok(b) => {
                if let Err(e) = store_address(&b.from, "from") {
                    check_client_error(&e);
                }
            }
            Err(e) => check_client_error(&e),
        },
        _ => {
            if let Err(e) = parse_json::<VmPatch>(body) {
                check_client_error(&e);
            }
        }
    }
}

#[test]
fn fuzz_api_bodies() {
    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/api-bodies");
    let report = fuzzkit::run("api-bodies", corpus, body);
    assert!(report.seeds > 0, "the seed corpus is empty");
    assert!(report.iterations > report.seeds as u64);
}
