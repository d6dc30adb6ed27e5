//! The corpus replay shared by the stable tests `crates/{log,proto,queue}/tests/fuzz_corpus.rs`
//! (included there with `#[path]`): every file under `fuzz/corpus/<target>/` (the minimized
//! corpus, `cargo fuzz cmin`) and `fuzz/regressions/<target>/` (inputs that once failed)
//! goes through the target's check. See `fuzz/README.md`.

use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = rd
        .map(|e| e.expect("read_dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on every committed input of `target`; panics naming the first that fails.
pub fn replay(manifest_dir: &str, target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(manifest_dir).join("../../fuzz");
    let corpus_dir = fuzz.join("corpus").join(target);
    let corpus = inputs(&corpus_dir);
    assert!(
        !corpus.is_empty(),
        "no corpus under {}",
        corpus_dir.display()
    );
    let regressions = inputs(&fuzz.join("regressions").join(target));
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).expect("read corpus file");
        let result = std::panic::catch_unwind(|| check(&data));
        assert!(
            result.is_ok(),
            "{target} check failed on {}",
            path.display()
        );
    }
}
