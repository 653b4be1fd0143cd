//! The committed man pages and shell completions are what
//! `examples/gen-man.rs` makes of the CLI definition today: regenerate
//! them into a temporary directory and compare. If this fails, run
//! `cargo run --example gen-man -- man/ completions/` and commit.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[path = "../examples/gen-man.rs"]
#[allow(dead_code)]
mod gen_man;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The files of `dir` (name -> contents) that `keep` accepts.
fn files(dir: &Path, keep: impl Fn(&str) -> bool) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap())
        .filter(|e| keep(&e.file_name().to_string_lossy()))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect()
}

fn assert_same(what: &str, committed: &Path, fresh: &Path, keep: impl Fn(&str) -> bool + Copy) {
    let want = files(fresh, keep);
    let have = files(committed, keep);
    assert!(!want.is_empty(), "the generator wrote no {what}");
    let names = |m: &BTreeMap<String, String>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&have),
        names(&want),
        "committed {what} are not the generated set: run \
         `cargo run --example gen-man -- man/ completions/` and commit"
    );
    for (name, text) in &want {
        assert!(
            have[name] == *text,
            "{}/{name} is stale: run `cargo run --example gen-man -- man/ completions/` and commit",
            committed.display()
        );
    }
}

#[test]
fn man_pages_are_generated_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    gen_man::man_pages(tmp.path()).unwrap();
    // Section 1 is generated; tunsec.conf.5 is written by hand.
    assert_same("man pages", &Path::new(ROOT).join("man"), tmp.path(), |n| {
        n.ends_with(".1")
    });
    let pages = files(tmp.path(), |_| true);
    for sub in ["run", "setkey", "stats", "pcap", "bench", "check", "ike"] {
        assert!(pages.contains_key(&format!("tunsec-{sub}.1")), "{sub}");
    }
}

#[test]
fn completions_are_generated_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    gen_man::completions(tmp.path()).unwrap();
    let got = files(tmp.path(), |_| true);
    for f in ["tunsec.bash", "_tunsec", "tunsec.fish"] {
        assert!(got.contains_key(f), "no {f}");
    }
    assert_same(
        "completions",
        &Path::new(ROOT).join("completions"),
        tmp.path(),
        |_| true,
    );
}

#[test]
fn the_example_in_tunsec_conf_5_is_valid() {
    let page = std::fs::read_to_string(Path::new(ROOT).join("man/tunsec.conf.5")).unwrap();
    let ex = page
        .split(".SH EXAMPLE\n.nf\n")
        .nth(1)
        .and_then(|r| r.split("\n.fi\n").next())
        .expect("an EXAMPLE section between .nf and .fi");
    let text = ex.replace("\\-", "-");
    let (state, _, warnings) = tunsec::state::State::default()
        .apply_text(&text, "tunsec.conf.5", Duration::ZERO)
        .unwrap_or_else(|e| panic!("the example does not parse: {e}\n{text}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!((state.sad.len(), state.spd.len()), (2, 4));
}
