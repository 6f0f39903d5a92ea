//! Progress bars for long work (generation, merging): drawn on a terminal,
//! hidden otherwise (callers print their own lines).

/// A progress bar on a terminal; otherwise hidden (callers print their own lines).
pub fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} [{{eta}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
