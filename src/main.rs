//! The `peft-rs` binary: the command line with the built-in regularizers.

#[global_allocator]
static GLOBAL: peft_rs::Jemalloc = peft_rs::Jemalloc;

fn main() {
    peft_rs::cli::exit_with(&peft_rs::regularizers::Registry::builtin())
}
