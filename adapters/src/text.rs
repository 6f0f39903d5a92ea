//! Enums spelled on the command line and in files by their `clap::ValueEnum`
//! names: one rule for parsing and printing them everywhere.

/// Implements `FromStr` (the value's name or an alias; an unknown one is an
/// error naming `$flag` and the known names) and `Display` (the name) for a
/// `clap::ValueEnum`.
#[macro_export]
macro_rules! value_enum_text {
    ($t:ty, $flag:literal) => {
        impl ::std::str::FromStr for $t {
            type Err = ::anyhow::Error;
            fn from_str(s: &str) -> ::anyhow::Result<Self> {
                <Self as ::clap::ValueEnum>::from_str(s, false).map_err(|_| {
                    ::anyhow::anyhow!("{} `{s}`: expected {}", $flag, $crate::text::names::<$t>())
                })
            }
        }
        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                let v = ::clap::ValueEnum::to_possible_value(self).expect("every value has a name");
                f.write_str(v.get_name())
            }
        }
    };
}

/// `a, b or c`: the names of a `clap::ValueEnum`'s values.
pub fn names<T: clap::ValueEnum>() -> String {
    let names: Vec<String> = T::value_variants()
        .iter()
        .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_owned()))
        .collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    }
}
