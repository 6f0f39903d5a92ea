//! The `peft-rs` binary: every user error ends as one line on stderr and a
//! non-zero exit status — libtorch failures (an allocation that does not
//! fit, say) included, which tch reports by panicking.

use std::panic;

#[global_allocator]
static GLOBAL: peft_rs::Jemalloc = peft_rs::Jemalloc;

fn main() {
    // A panic prints nothing itself; it is reported below as one line.
    panic::set_hook(Box::new(|_| {}));
    let result = panic::catch_unwind(peft_rs::cli::main);
    let error = match result {
        Ok(Ok(())) => return,
        Ok(Err(e)) => {
            // `{:#}` joins the context chain on one line: "what: why: cause".
            eprintln!("error: {e:#}");
            // Stopped by a signal: the shell's convention, 128 + the signal.
            let code = e
                .downcast_ref::<peft_rs::signals::Interrupted>()
                .map_or(1, |i| 128 + i.signal);
            std::process::exit(code);
        }
        Err(payload) => payload,
    };
    let text = error
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| error.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    eprintln!("error: {}", peft_rs::cli::describe_panic(text));
    std::process::exit(1);
}
