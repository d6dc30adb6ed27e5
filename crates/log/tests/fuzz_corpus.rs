//! Replays the `log_recovery` fuzz corpus on stable, in the normal test suite: every file
//! under `fuzz/corpus/log_recovery/` (a minimized corpus, `cargo fuzz cmin`) and
//! `fuzz/regressions/log_recovery/` (inputs that once failed) goes through the same check
//! as the fuzz target. See `fuzz/README.md`.

#[path = "../../../fuzz/checks/log_recovery.rs"]
mod check;

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

#[test]
fn replay_log_recovery_corpus() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let corpus = inputs(&fuzz.join("corpus/log_recovery"));
    assert!(
        !corpus.is_empty(),
        "no corpus under {}",
        fuzz.join("corpus/log_recovery").display()
    );
    let regressions = inputs(&fuzz.join("regressions/log_recovery"));
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).expect("read corpus file");
        let result = std::panic::catch_unwind(|| check::check(&data));
        assert!(
            result.is_ok(),
            "log_recovery check failed on {}",
            path.display()
        );
    }
}
