//! Replays saved fuzz inputs in a plain `cargo test`: every file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through the target's own
//! checks, in the two tests [`tests!`] writes. Included with `#[path]` by
//! `engine/tests/fuzz_regressions.rs` and `transport/tests/fuzz_regressions.rs`; needs
//! neither cargo-fuzz nor nightly.

use std::path::{Path, PathBuf};

/// The files of `fuzz/<kind>/<target>/` (dotfiles such as `.gitkeep` left out), sorted.
pub fn inputs(manifest_dir: &str, kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(manifest_dir)
        .join("../fuzz")
        .join(kind)
        .join(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// Runs `check` on every file, and fails naming each input that panicked.
pub fn replay(files: &[PathBuf], check: fn(&[u8])) {
    let mut failed = Vec::new();
    for f in files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
        if let Err(e) = std::panic::catch_unwind(|| check(&data)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            let first = msg.lines().next().unwrap_or("").to_owned();
            failed.push(format!("{}: {first}", f.display()));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs failed (the full panic of each is printed above):\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

/// A target's two replay tests, named `corpus` and `regressions`: every file of
/// `fuzz/corpus/<target>/` (at least `corpus_at_least` of them, or the corpus went
/// missing) and every file of `fuzz/regressions/<target>/` through `check`.
macro_rules! tests {
    (
        target = $target:literal,
        check = $check:path,
        corpus_at_least = $min:literal,
        corpus = $corpus:ident,
        regressions = $regressions:ident $(,)?
    ) => {
        #[test]
        fn $corpus() {
            let files = $crate::replay::inputs(env!("CARGO_MANIFEST_DIR"), "corpus", $target);
            assert!(files.len() >= $min, "the corpus went missing: {files:?}");
            $crate::replay::replay(&files, $check);
        }

        #[test]
        fn $regressions() {
            let files = $crate::replay::inputs(env!("CARGO_MANIFEST_DIR"), "regressions", $target);
            $crate::replay::replay(&files, $check);
        }
    };
}
pub(crate) use tests;
