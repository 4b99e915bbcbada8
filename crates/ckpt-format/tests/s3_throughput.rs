//! Throughput probe (ignored by default): N MiB of memory through the S3 store against a plain
//! parallel multipart upload of the same bytes with the same client crate, both to a local
//! SeaweedFS server.
//!
//! `COWVM_S3_PROBE_MIB=256 COWVM_S3_PROBE_CHUNK_MIB=8 cargo test --release -p ckpt-format --test s3_throughput -- --ignored --nocapture`

mod s3_server;

use std::sync::Arc;
use std::time::Instant;

use ckpt_format::{CheckpointWriter, Layout, S3Location, S3Store, PAGE_SIZE};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, WriteMultipart};
use s3_server::{Weed, ACCESS_KEY, BUCKET, SECRET_KEY};

const THREADS: usize = 4;
const RUN_PAGES: usize = 64;
const PART_SIZE: usize = 8 << 20;
const PARTS_IN_FLIGHT: usize = 8;

fn memory(mib: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut m = vec![0u8; mib << 20];
    for w in m.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    m
}

fn mib_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

#[test]
#[ignore = "throughput probe: run explicitly"]
fn s3_store_upload_throughput_against_plain_multipart() {
    let mib: usize = std::env::var("COWVM_S3_PROBE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let chunk_mib: u64 = std::env::var("COWVM_S3_PROBE_CHUNK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let weed = Weed::start();
    let mem = Arc::new(memory(mib));

    // The plain client, and a warm-up upload so that neither run pays for the server's
    // first volume allocation.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = AmazonS3Builder::new()
        .with_bucket_name(BUCKET)
        .with_endpoint(weed.endpoint())
        .with_region("us-east-1")
        .with_access_key_id(ACCESS_KEY)
        .with_secret_access_key(SECRET_KEY)
        .with_allow_http(true)
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..4 {
            let part = mem[..PART_SIZE].to_vec();
            client
                .put(&ObjectPath::from(format!("warm-up/{i}")), part.into())
                .await
                .unwrap();
        }
    });

    // Through the store: pages written by several threads, in runs, interleaved.
    let store = S3Store::new(S3Location::parse(&format!("s3://{BUCKET}/probe")).unwrap())
        .endpoint(weed.endpoint())
        .region("us-east-1")
        .credentials(ACCESS_KEY, SECRET_KEY)
        .chunk_size(chunk_mib << 20)
        .unwrap();
    let start = Instant::now();
    let mut w = CheckpointWriter::create(
        &store,
        &Layout {
            mem_size: mem.len() as u64,
        },
    )
    .unwrap();
    let runs = mem.len() / (RUN_PAGES * PAGE_SIZE);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let writer = Arc::clone(w.memory());
            let mem = Arc::clone(&mem);
            s.spawn(move || {
                for r in (t..runs).step_by(THREADS) {
                    let at = r * RUN_PAGES * PAGE_SIZE;
                    writer
                        .write_pages((r * RUN_PAGES) as u64, &mem[at..at + RUN_PAGES * PAGE_SIZE])
                        .unwrap();
                }
            });
        }
    });
    w.write_state(b"state").unwrap();
    w.finish().unwrap();
    let store_secs = start.elapsed().as_secs_f64();

    // Plain multipart upload of the same bytes, same client crate, same server.
    let plain_secs = rt.block_on(async {
        let start = Instant::now();
        let upload = client
            .put_multipart(&ObjectPath::from("plain/memory"))
            .await
            .unwrap();
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        for part in mem.chunks(PART_SIZE) {
            writer.wait_for_capacity(PARTS_IN_FLIGHT).await.unwrap();
            writer.write(part);
        }
        writer.finish().await.unwrap();
        start.elapsed().as_secs_f64()
    });
    let bytes = mem.len();
    println!(
        "S3 store: {mib} MiB in {store_secs:.2} s = {:.0} MiB/s ({chunk_mib} MiB chunks, {THREADS} writer threads)",
        mib_per_s(bytes, store_secs)
    );
    println!(
        "plain multipart: {mib} MiB in {plain_secs:.2} s = {:.0} MiB/s ({} MiB parts, {PARTS_IN_FLIGHT} in flight)",
        mib_per_s(bytes, plain_secs),
        PART_SIZE >> 20
    );
    println!("ratio store/plain: {:.2}", plain_secs / store_secs);
}
