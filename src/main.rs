//! The `peft-rs` binary: every user error ends as one line on stderr and a
//! non-zero exit status.

fn main() {
    if let Err(e) = peft_rs::cli::main() {
        // `{:#}` joins the context chain on one line: "what: why: cause".
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
