//! Replays the fuzz corpus (`fuzz/corpus/<target>/*`) through the same checks the libFuzzer
//! targets assert (`fuzz/src/checks.rs`), on stable, in the ordinary test suite: every input that
//! once found something, or that libFuzzer kept for its coverage, stays a regression test.

#[path = "../fuzz/src/checks.rs"]
mod checks;

use std::path::Path;

#[test]
fn every_corpus_file_passes_its_target_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for target in checks::TARGETS {
        let dir = root.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} has no corpus", dir.display());
        for file in &files {
            let data = std::fs::read(file).unwrap();
            let outcome = std::panic::catch_unwind(|| checks::run(target, &data));
            assert!(
                outcome.is_ok(),
                "{target}: {} fails its checks",
                file.display()
            );
        }
        eprintln!("{target}: {} corpus files pass", files.len());
    }
}
