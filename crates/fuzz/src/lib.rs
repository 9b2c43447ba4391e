//! Mutation fuzzing on stable Rust, for the harnesses in each crate's `tests/fuzz.rs`.
//!
//! Coverage-guided fuzzers need nightly (`cargo fuzz`) or an outside toolchain (AFL++), and
//! neither is available where CI runs, so this drives the inputs with proptest instead: each
//! input is a committed seed (`fixtures/fuzz/<harness>/`) with a few random mutations (bit
//! flips, interesting integers at any width and byte order, inserted dictionary words, cut,
//! repeated and spliced ranges), or random bytes. A panic fails the harness, after proptest has
//! shrunk the input; the smallest failing input is written to `target/fuzz-failures/` to be
//! committed as a seed. [`BoundedAlloc`], installed as the test binary's allocator, turns any
//! single allocation over [`ALLOC_LIMIT`] into an abort: a crafted header must give an error,
//! not a huge allocation.
//!
//! Budget: `SD_FUZZ_CASES` inputs per harness if set, else `SD_FUZZ_SECONDS` (default 5) of
//! inputs. `SD_FUZZ_SEED` (64 hex digits) replays a run; every run prints its seed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

/// Dictionary words any JSON body harness adds to its own: values at the edges of what JSON
/// and the fields take.
pub const JSON_WORDS: &[&[u8]] = &[
    b"null",
    b"-1",
    b"1e999",
    b"18446744073709551616",
    b"[]",
    b"{}",
    b"\"\"",
    b",",
    b"true",
];

/// The largest single allocation a harness may make: far above what any valid input of the
/// fuzzed sizes needs, far below what a header's claimed sizes would ask for.
pub const ALLOC_LIMIT: usize = 1 << 30;

/// The system allocator, aborting on any allocation over [`ALLOC_LIMIT`].
pub struct BoundedAlloc;

impl BoundedAlloc {
    fn check(size: usize) {
        if size > ALLOC_LIMIT {
            // No allocation here: a fixed message, then abort.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"fuzz: an input made the code ask for one allocation over 1 GiB\n",
            );
            std::process::abort();
        }
    }
}

// SAFETY: forwards to the system allocator unchanged, after a size check.
unsafe impl GlobalAlloc for BoundedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::check(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

/// One change to an input; positions and lengths are taken modulo the input's length.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    /// An interesting integer (index into [`INTERESTING`]) written with this many bytes, big
    /// endian or not.
    Integer(usize, usize, u8, bool),
    Insert(usize, Vec<u8>),
    /// A word of the harness's dictionary.
    Word(usize, usize),
    Delete(usize, usize),
    Truncate(usize),
    /// Copies a range this many times in place.
    Repeat(usize, usize, u8),
    /// A range of another seed, inserted.
    Splice(usize, usize, usize, usize),
}

const INTERESTING: [u64; 18] = [
    0,
    1,
    2,
    7,
    8,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    30_000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 40,
    u64::MAX,
];

fn mutation() -> impl Strategy<Value = Mutation> {
    let pos = any::<usize>();
    prop_oneof![
        (pos, 0u8..8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
        (pos, any::<u8>()).prop_map(|(p, v)| Mutation::SetByte(p, v)),
        (
            pos,
            0..INTERESTING.len(),
            prop_oneof![Just(1u8), Just(2), Just(4), Just(8)],
            any::<bool>()
        )
            .prop_map(|(p, i, w, be)| Mutation::Integer(p, i, w, be)),
        (pos, vec(any::<u8>(), 1..16)).prop_map(|(p, b)| Mutation::Insert(p, b)),
        (pos, any::<usize>()).prop_map(|(p, w)| Mutation::Word(p, w)),
        (pos, 1usize..64).prop_map(|(p, n)| Mutation::Delete(p, n)),
        pos.prop_map(Mutation::Truncate),
        (pos, 1usize..32, 1u8..8).prop_map(|(p, n, k)| Mutation::Repeat(p, n, k)),
        (any::<usize>(), pos, 1usize..64, pos)
            .prop_map(|(s, f, n, p)| Mutation::Splice(s, f, n, p)),
    ]
}

fn apply(input: &mut Vec<u8>, m: &Mutation, seeds: &[Vec<u8>], words: &[&[u8]]) {
    let at = |p: usize, len: usize| if len == 0 { 0 } else { p % (len + 1) };
    match m {
        Mutation::FlipBit(p, b) if !input.is_empty() => {
            let i = p % input.len();
            input[i] ^= 1 << b;
        }
        Mutation::SetByte(p, v) if !input.is_empty() => {
            let i = p % input.len();
            input[i] = *v;
        }
        Mutation::Integer(p, i, w, be) => {
            let v = INTERESTING[*i];
            let bytes = if *be {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            let w = usize::from(*w);
            let bytes = if *be { &bytes[8 - w..] } else { &bytes[..w] };
            let start = at(*p, input.len()).min(input.len().saturating_sub(w));
            for (k, b) in bytes.iter().enumerate() {
                match input.get_mut(start + k) {
                    Some(slot) => *slot = *b,
                    None => input.push(*b),
                }
            }
        }
        Mutation::Insert(p, bytes) => {
            let i = at(*p, input.len());
            input.splice(i..i, bytes.iter().copied());
        }
        Mutation::Word(p, w) if !words.is_empty() => {
            let i = at(*p, input.len());
            input.splice(i..i, words[w % words.len()].iter().copied());
        }
        Mutation::Delete(p, n) if !input.is_empty() => {
            let i = p % input.len();
            let end = (i + n).min(input.len());
            input.drain(i..end);
        }
        Mutation::Truncate(p) => {
            let i = at(*p, input.len());
            input.truncate(i);
        }
        Mutation::Repeat(p, n, k) if !input.is_empty() => {
            let i = p % input.len();
            let end = (i + n).min(input.len());
            let piece = input[i..end].to_vec();
            for _ in 0..*k {
                input.splice(end..end, piece.iter().copied());
            }
        }
        Mutation::Splice(s, f, n, p) if !seeds.is_empty() => {
            let other = &seeds[s % seeds.len()];
            if !other.is_empty() {
                let from = f % other.len();
                let end = (from + n).min(other.len());
                let i = at(*p, input.len());
                input.splice(i..i, other[from..end].iter().copied());
            }
        }
        _ => {}
    }
}

/// The committed seeds of harness `name`, sorted by file name.
fn read_seeds(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn rng_seed() -> [u8; 32] {
    if let Ok(hex) = std::env::var("SD_FUZZ_SEED") {
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = hex
                .get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .expect("SD_FUZZ_SEED: 64 hex digits");
        }
        return seed;
    }
    // The time and the process, so that runs differ unless a seed is given.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut seed = [0u8; 32];
    seed[..16].copy_from_slice(&nanos.to_le_bytes());
    seed[16..20].copy_from_slice(&std::process::id().to_le_bytes());
    seed
}

/// What one harness run did.
#[derive(Debug)]
pub struct Report {
    pub inputs: u64,
    pub seconds: f64,
}

/// Fuzzes `target` with mutations of the seeds in `seeds_dir` (and the words of `dictionary`),
/// for the budget of the environment. Every seed is run unchanged first. Panics, with the
/// smallest failing input saved, if `target` panics on any input.
pub fn fuzz(name: &str, seeds_dir: &Path, dictionary: &[&[u8]], target: impl Fn(&[u8])) -> Report {
    let seeds = read_seeds(seeds_dir);
    assert!(
        !seeds.is_empty(),
        "{name}: no seeds in {}",
        seeds_dir.display()
    );
    let started = Instant::now();
    for (i, s) in seeds.iter().enumerate() {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(s))) {
            let path = save_failure(name, s);
            panic!(
                "{name}: seed {i} fails ({e:?}); saved as {}",
                path.display()
            );
        }
    }
    let cases = env_u64("SD_FUZZ_CASES");
    let budget = Duration::from_secs_f64(
        std::env::var("SD_FUZZ_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5.0),
    );
    let seed = rng_seed();
    let seed_hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
    let chunk = 512u32;
    let config = Config {
        cases: chunk,
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    };
    // A runner counts its cases over its life: a fresh one per chunk, its RNG forked from
    // the run's.
    let mut master = TestRunner::new_with_rng(config.clone(), rng);
    let count = std::cell::Cell::new(0u64);
    let strategy = (0..seeds.len() + 1, vec(mutation(), 0..8));
    let mut inputs = 0u64;
    loop {
        let done = match cases {
            Some(n) => inputs >= n,
            None => started.elapsed() >= budget,
        };
        if done {
            break;
        }
        let mut runner = TestRunner::new_with_rng(config.clone(), master.new_rng());
        let result = runner.run(&strategy, |(which, muts)| {
            count.set(count.get() + 1);
            // One index past the seeds: random bytes (from the inserted pieces alone).
            let mut input = seeds.get(which).cloned().unwrap_or_default();
            for m in &muts {
                apply(&mut input, m, &seeds, dictionary);
            }
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input)));
            match outcome {
                Ok(()) => Ok(()),
                Err(e) => {
                    let text = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    Err(TestCaseError::fail(format!(
                        "panicked: {text}\ninput ({} bytes): {}",
                        input.len(),
                        hex_head(&input)
                    )))
                }
            }
        });
        if let Err(e) = result {
            let message = match &e {
                TestError::Fail(why, (which, muts)) => {
                    let mut input = seeds.get(*which).cloned().unwrap_or_default();
                    for m in muts {
                        apply(&mut input, m, &seeds, dictionary);
                    }
                    let path = save_failure(name, &input);
                    format!("{why}\nsaved as {}", path.display())
                }
                TestError::Abort(why) => why.to_string(),
            };
            panic!("{name}: {message}\n(replay with SD_FUZZ_SEED={seed_hex})");
        }
        inputs = count.get();
    }
    let report = Report {
        inputs,
        seconds: started.elapsed().as_secs_f64(),
    };
    println!(
        "fuzz {name}: {} inputs from {} seeds in {:.1}s, no failure (SD_FUZZ_SEED={seed_hex})",
        report.inputs,
        seeds.len(),
        report.seconds
    );
    report
}

fn hex_head(input: &[u8]) -> String {
    let head: String = input.iter().take(96).map(|b| format!("{b:02x}")).collect();
    if input.len() > 96 {
        format!("{head}...")
    } else {
        head
    }
}

fn save_failure(name: &str, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/fuzz-failures")
        .join(name);
    let _ = std::fs::create_dir_all(&dir);
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    let path = dir.join(format!("crash-{hash:016x}"));
    let _ = std::fs::write(&path, input);
    path
}

/// The seed folder of harness `name`: `fixtures/fuzz/<name>` of the workspace.
pub fn seeds(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/fuzz")
        .join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_in_bounds() {
        let seeds = vec![b"hello world".to_vec(), Vec::new()];
        let mut runner = TestRunner::deterministic();
        let strategy = (0..seeds.len() + 1, vec(mutation(), 0..8));
        runner
            .run(&strategy, |(which, muts)| {
                let mut input = seeds.get(which).cloned().unwrap_or_default();
                for m in &muts {
                    apply(&mut input, m, &seeds, &[b"word"]);
                }
                prop_assert!(input.len() < 4096);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn a_panicking_target_fails_with_the_input_saved() {
        let dir = std::env::temp_dir().join(format!("sd-fuzz-self-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("seed"), b"abc").unwrap();
        let result = std::panic::catch_unwind(|| {
            fuzz("self-test", &dir, &[], |input| {
                assert!(!input.contains(&b'z'), "found z");
            })
        });
        let message = *result.unwrap_err().downcast::<String>().unwrap();
        assert!(
            message.contains("found z") && message.contains("saved as"),
            "{message}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
