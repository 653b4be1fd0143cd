//! Generate tunsec's man pages and shell completions from the CLI
//! definition (`tunsec::cli`):
//!
//! ```sh
//! cargo run --example gen-man -- man/ completions/
//! ```
//!
//! writes `man/tunsec.1` and one `man/tunsec-SUBCOMMAND.1` per subcommand,
//! and `completions/tunsec.bash`, `_tunsec` (zsh) and `tunsec.fish`.
//! `man/tunsec.conf.5` is written by hand. The generated files are
//! committed; `tests/generated_docs.rs` regenerates them and fails if
//! they differ, so they cannot go stale.
//!
//! An example rather than a `tunsec generate-man` subcommand: clap_mangen
//! and clap_complete stay dev-dependencies, out of the installed binary,
//! and the binary's command set stays what the man pages describe.

use std::io::{self, Write};
use std::path::Path;

/// Every page's SEE ALSO section.
fn see_also(this: &str, cmd: &clap::Command) -> String {
    let mut refs: Vec<String> = std::iter::once("tunsec".to_string())
        .chain(
            cmd.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(|s| format!("tunsec-{}", s.get_name())),
        )
        .filter(|n| n != this)
        .map(|n| format!("\\fB{}\\fR(1)", n.replace('-', "\\-")))
        .collect();
    refs.push("\\fBtunsec.conf\\fR(5)".into());
    refs.push("\\fBsetkey\\fR(8)".into());
    format!(".SH \"SEE ALSO\"\n{}\n", refs.join(",\n"))
}

fn page(dir: &Path, name: &str, sub: clap::Command, top: &clap::Command) -> io::Result<()> {
    let man = clap_mangen::Man::new(sub)
        .title(name.to_uppercase())
        .manual("tunsec manual")
        .source(format!("tunsec {}", top.get_version().unwrap_or_default()));
    let mut out = Vec::new();
    man.render(&mut out)?;
    out.extend_from_slice(see_also(name, top).as_bytes());
    std::fs::File::create(dir.join(format!("{name}.1")))?.write_all(&out)
}

/// The man pages of section 1 into `dir`.
pub fn man_pages(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut top = tunsec::cli::command().disable_help_subcommand(true);
    top.build();
    for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
        // After build(), a subcommand's display name is "tunsec-NAME".
        let name = format!("tunsec-{}", sub.get_name());
        page(dir, &name, sub.clone().display_name(&name), &top)?;
    }
    page(dir, "tunsec", top.clone(), &top)
}

/// bash, zsh and fish completions into `dir`.
pub fn completions(dir: &Path) -> io::Result<()> {
    use clap_complete::Shell;
    std::fs::create_dir_all(dir)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut tunsec::cli::command(), "tunsec", dir)?;
    }
    Ok(())
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (man, comp) = match &args[..] {
        [m] => (m.as_str(), "completions"),
        [m, c] => (m.as_str(), c.as_str()),
        [] => ("man", "completions"),
        _ => {
            eprintln!("usage: gen-man [MANDIR [COMPLETIONSDIR]]");
            std::process::exit(2);
        }
    };
    man_pages(Path::new(man))?;
    completions(Path::new(comp))?;
    eprintln!("wrote man pages to {man}/ and completions to {comp}/");
    Ok(())
}
