//! Proof that the per-record hot path does not allocate: building a [`Subject`] from a record,
//! claiming it (a key part is borrowed from the key, a regex searches with its pooled scratch
//! space and offsets on the stack) and tallying an owned record. The allocator of this test
//! binary counts the allocations of one thread while a test asks it to; deciding a request of
//! a thousand records must allocate exactly as much as deciding one of ten. Also the split of a
//! batch whose records all have one owner (`codec::split`), which the proxy forwards whole.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use kafka_protocol::records::{Compression, Record};

use crate::codec::produce::{PartitionView, ProduceView, TopicView};
use crate::codec::records::Inflater;
use crate::ownership::{Claim, Subject, Table};
use crate::policy::produce::{Action, decide};
use crate::testkit;

struct Counting;

thread_local! {
    /// Allocations made by this thread since counting started; `None` while not counting.
    static ALLOCATIONS: Cell<Option<usize>> = const { Cell::new(None) };
}

fn count_one() {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = ALLOCATIONS.try_with(|n| {
        if let Some(count) = n.get() {
            n.set(Some(count + 1));
        }
    });
}

// SAFETY: every call is passed on to `System` unchanged; counting touches only a thread-local
// `Cell` without a destructor, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: the caller upholds `alloc`'s contract, which is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// How many allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    ALLOCATIONS.with(|n| n.set(Some(0)));
    f();
    ALLOCATIONS.with(|n| n.replace(None)).unwrap_or(0)
}

const TABLE: &str = r#"
rules:
  - name: by-key
    topics: ["key"]
    by: key
    slots: 1
    owners: { eu: [0] }
  - name: by-header
    topics: ["header"]
    by: header
    header: tenant
    owners: { eu: [tenant-1] }
  - name: by-delimiter
    topics: ["delimiter"]
    by: key_part
    delimiter: "|"
    index: 1
    owners: { eu: [tenant-1] }
  - name: by-pattern
    topics: ["pattern"]
    by: key_part
    pattern: '^[a-z]+/(tenant-[0-9]+)/'
    owners: { eu: [tenant-1] }
"#;

fn table() -> Table {
    let regions = ["eu".to_owned(), "us".to_owned()];
    Table::parse(TABLE, Path::new("ownership.yaml"), &regions).expect("valid table")
}

/// `count` records every rule above gives to eu.
fn owned_batch(count: usize) -> bytes::Bytes {
    let records: Vec<Record> = (0..count)
        .map(|i| {
            let key = format!("app/tenant-1/order-{i}|tenant-1|x");
            testkit::record(
                Some(key.as_bytes()),
                Some(b"value"),
                &[("trace", Some(b"1")), ("tenant", Some(b"tenant-1"))],
            )
        })
        .collect();
    testkit::batch(&records, Compression::None)
}

/// A request writing `records` to partition 0 of `topic`.
fn view<'a>(topic: &'a str, records: &'a [u8]) -> ProduceView<'a> {
    ProduceView {
        transactional_id: None,
        acks: -1,
        timeout_ms: 1000,
        topics: vec![TopicView {
            name: topic,
            partitions: vec![PartitionView {
                index: 0,
                records: Some(records),
            }],
        }],
    }
}

#[test]
fn deciding_a_batch_allocates_nothing_per_record() {
    let table = table();
    let local = table.region_id("eu").expect("eu");
    let mut inflater = Inflater::new(1 << 20);
    let (small, large) = (owned_batch(10), owned_batch(1000));
    for topic in ["key", "header", "delimiter", "pattern"] {
        let (small, large) = (view(topic, &small), view(topic, &large));
        // Warm up: the regex's scratch space is made on first use, then reused.
        let plan = decide(&large, &table, local, &mut inflater);
        assert_eq!(
            plan.partitions[0].action,
            Action::Forward { audited: 0 },
            "{topic}"
        );
        assert_eq!(plan.partitions[0].records, 1000, "{topic}");
        let for_10 = allocations(|| drop(decide(&small, &table, local, &mut inflater)));
        let for_1000 = allocations(|| drop(decide(&large, &table, local, &mut inflater)));
        assert_eq!(
            for_10, for_1000,
            "{topic}: allocations grow with the records"
        );
    }
}

#[test]
fn claiming_a_key_part_allocates_nothing() {
    let table = table();
    let keys: Vec<Vec<u8>> = (0..100)
        .map(|i| format!("app/tenant-{i}/x|tenant-{i}|y").into_bytes())
        .collect();
    for topic in ["delimiter", "pattern"] {
        let rule = table.rule_for_topic(topic).expect("rule");
        let claim = |key: &[u8]| rule.claim(&Subject::topic(topic).with_key(Some(key)));
        // Warm up, as above.
        assert!(matches!(claim(&keys[1]), Some(Claim::Region { .. })));
        let mut owned = 0;
        let counted = allocations(|| {
            for key in &keys {
                owned += usize::from(matches!(claim(key), Some(Claim::Region { .. })));
            }
        });
        assert_eq!(counted, 0, "{topic}");
        assert_eq!(owned, 1, "{topic}: only tenant-1 is listed");
    }
}

#[test]
fn a_batch_with_one_owner_is_not_split_and_allocates_nothing() {
    use crate::codec::split::{Split, split};
    for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let records: Vec<Record> = (0..200)
            .map(|i| testkit::record(Some(format!("key-{i}").as_bytes()), Some(b"v"), &[]))
            .collect();
        let batch = testkit::batch(&records, compression);
        let mut inflater = Inflater::new(1 << 20);
        // Warm up: the inflater's buffer and zstd context are kept between batches.
        assert_eq!(
            split(&batch, &mut inflater, 2, |_, _| 1),
            Ok(Split::Whole { part: 1 })
        );
        let counted = allocations(|| {
            assert!(matches!(
                split(&batch, &mut inflater, 2, |_, _| 1),
                Ok(Split::Whole { part: 1 })
            ));
        });
        assert_eq!(counted, 0, "{compression:?}");
    }
}

/// The counter itself counts: a test that could not fail would prove nothing.
#[test]
fn the_counter_sees_an_allocation() {
    let counted = allocations(|| drop(std::hint::black_box(vec![1u8; 64])));
    assert_eq!(counted, 1);
}
